"""Pure probability-flow ODE steps between two discrete timesteps of a VP or a flow-matching schedule.

Every solver has one signature, ``step(denoise, x, t, s, schedule) -> x_s``: it moves the VP sample
``x`` (B, C, H, W) at timesteps ``t`` (B,) to timesteps ``s`` (B,) with s < t, calling
``denoise(x, t) -> (x0, eps)`` (see ``denoiser.Denoiser.x0_eps``). A timestep s < 0 means "past
t = 0", i.e. ``schedule.final_alphas_cumprod``. Teacher targets in training and the reference
samplers in tests use these functions; ``tests/test_solvers.py`` checks them step for step against
diffusers' DDIMScheduler, EulerDiscreteScheduler and HeunDiscreteScheduler, and the flow steps against
FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler.

On a flow-matching schedule (``denoiser.FlowMatchSchedule``, x = (1 - sigma) x0 + sigma eps) the ODE is
dx/dsigma = v = eps - x0, and ``ddim_step`` is exactly its Euler step (``flow_euler_step``): both land on
(1 - sigma_s) x0 + sigma_s eps. The VE-coordinate ``euler_step``/``heun_step`` divide by alpha, which is 0 at
sigma = 1; ``solver_for`` gives the flow steps their names there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .denoiser import FlowMatchSchedule, NoiseSchedule

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _ve_sigma(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor):
    """(alpha_t, sigma_t / alpha_t): the VP scale and the variance-exploding noise level at t."""
    alpha, sigma = schedule.alpha_sigma(t, like=like)
    return alpha, sigma / alpha


def ddim_step(denoise: DenoiseFn, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0): x_s = alpha_s x0 + sigma_s eps."""
    x0, eps = denoise(x, t)
    alpha_s, sigma_s = schedule.alpha_sigma(s, like=x)
    return alpha_s * x0 + sigma_s * eps


def euler_step(denoise: DenoiseFn, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Euler on the PF-ODE dy/dsigma = (y - x0) / sigma in VE coordinates y = x / alpha (Karras et al. 2022, eq. 3).

    Between two grid points it is algebraically the same move as DDIM; it is kept as its own function
    because diffusers' EulerDiscreteScheduler is the reference it is tested against.
    """
    alpha_t, sig_t = _ve_sigma(schedule, t, x)
    alpha_s, sig_s = _ve_sigma(schedule, s, x)
    x0, _ = denoise(x, t)
    y = x / alpha_t
    d = (y - x0) / sig_t
    return (y + (sig_s - sig_t) * d) * alpha_s


def heun_step(denoise: DenoiseFn, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Heun's second-order step (Karras et al. 2022, alg. 1); plain Euler where sigma_s = 0."""
    alpha_t, sig_t = _ve_sigma(schedule, t, x)
    alpha_s, sig_s = _ve_sigma(schedule, s, x)
    x0, _ = denoise(x, t)
    y = x / alpha_t
    d = (y - x0) / sig_t
    y_euler = y + (sig_s - sig_t) * d
    s_eval = torch.as_tensor(s, device=x.device).clamp(min=0)  # a final step (s < 0) is masked below
    x0_s, _ = denoise(y_euler * alpha_s, s_eval)
    d_s = (y_euler - x0_s) / sig_s.clamp(min=1e-12)
    y_heun = y + (sig_s - sig_t) * 0.5 * (d + d_s)
    return torch.where(sig_s > 0, y_heun, y_euler) * alpha_s


def flow_euler_step(denoise: DenoiseFn, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, schedule) -> torch.Tensor:
    """Euler on the flow ODE dx/dsigma = v, v = eps - x0 (FlowMatchEulerDiscreteScheduler.step)."""
    _, sig_t = schedule.alpha_sigma(t, like=x)
    _, sig_s = schedule.alpha_sigma(s, like=x)
    x0, eps = denoise(x, t)
    return x + (sig_s - sig_t) * (eps - x0)


def flow_heun_step(denoise: DenoiseFn, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, schedule) -> torch.Tensor:
    """Heun's second-order step on the flow ODE (FlowMatchHeunDiscreteScheduler); plain Euler where sigma_s = 0."""
    _, sig_t = schedule.alpha_sigma(t, like=x)
    _, sig_s = schedule.alpha_sigma(s, like=x)
    x0, eps = denoise(x, t)
    v = eps - x0
    x_euler = x + (sig_s - sig_t) * v
    x0_s, eps_s = denoise(x_euler, torch.as_tensor(s, device=x.device).clamp(min=0))  # s < 0 is masked below
    x_heun = x + (sig_s - sig_t) * 0.5 * (v + (eps_s - x0_s))
    return torch.where(sig_s > 0, x_heun, x_euler)


SOLVERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": ddim_step, "euler": euler_step, "heun": heun_step}
# The same names on a flow-matching schedule: DDIM is the flow Euler step there (module docstring).
FLOW_SOLVERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": ddim_step, "euler": flow_euler_step,
                                                        "heun": flow_heun_step}


def get_solver(name: str, schedule=None) -> Callable[..., torch.Tensor]:
    """Look up a solver step by name (ddim, euler, heun) for ``schedule``'s process (VP when None)."""
    table = FLOW_SOLVERS if is_flow(schedule) else SOLVERS
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; expected one of {sorted(SOLVERS)}") from None


def is_flow(schedule) -> bool:
    """True for a flow-matching schedule (x = (1 - sigma) x0 + sigma eps)."""
    return isinstance(schedule, FlowMatchSchedule)


def sample_loop(
    denoise: DenoiseFn, x: torch.Tensor, timesteps: list[int], schedule: NoiseSchedule, solver: str = "ddim"
) -> torch.Tensor:
    """Integrate from timesteps[0] down through each grid point and past t = 0 (s = -1 at the end)."""
    step = get_solver(solver, schedule)
    b = x.shape[0]
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x = step(denoise, x, torch.full((b,), t, device=x.device), torch.full((b,), s, device=x.device), schedule)
    return x


# --------------------------------------------------------------------------------------------------
# Timestep grids and the scheduler preset that samples on them
# --------------------------------------------------------------------------------------------------

def lcm_grid(num_train_timesteps: int, n: int) -> torch.Tensor:
    """The n-point grid t_i = (i + 1) * (T // n) - 1, ascending: LCMScheduler's grid for
    ``original_inference_steps=n``, on which consistency students (LCM) and ADD students train."""
    return torch.arange(1, n + 1) * (num_train_timesteps // n) - 1


def trailing_grid(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """diffusers' trailing timesteps for ``steps`` steps, descending, plus -1 (the clean end): (steps + 1,)."""
    ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64) - 1
    return torch.tensor([*ts.tolist(), -1])


def scheduler_from_config(cls, config, **overrides):
    """``cls.from_config(config, **overrides)`` with only the keys ``cls`` accepts: a PNDM teacher's
    ``skip_prk_steps`` (or any other class's own keys) never reaches the exported scheduler_config.json,
    where diffusers would warn about "unexpected config attributes" at every load."""
    accepted = set(cls._get_init_keys(cls))
    return cls.from_config({k: v for k, v in dict(config).items() if k in accepted}, **overrides)


def lcm_scheduler(teacher_scheduler, original_inference_steps: int, timestep_scaling: float, prediction_type: str):
    """The ``LCMScheduler`` preset of a student trained on ``lcm_grid(T, original_inference_steps)`` with the
    consistency boundary scalings at ``timestep_scaling`` (``denoiser.consistency_output``): it applies the
    training map at each sampling step and re-noises in between."""
    from diffusers import LCMScheduler

    return scheduler_from_config(LCMScheduler, teacher_scheduler.config, original_inference_steps=original_inference_steps,
                                 timestep_scaling=timestep_scaling, prediction_type=prediction_type,
                                 clip_sample=False)
