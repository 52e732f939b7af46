"""The one home of diffusion parameterisation maths in diffdistill.

Everything that turns a network output into a clean-sample or noise estimate lives here, and
training, sampling and export all read it from here:

* the variance-preserving noise schedule x_t = alpha_t * x_0 + sigma_t * eps, read from a
  diffusers scheduler's ``alphas_cumprod`` (``NoiseSchedule``);
* the flow-matching (rectified-flow) process x_t = (1 - sigma) x_0 + sigma eps of SD3 and Flux, read
  from a ``FlowMatchEulerDiscreteScheduler`` config with its static ``shift`` or Flux's dynamic shifting
  (``FlowMatchSchedule``; Esser et al. 2024, sec. 3 and 5.3.2). It is the same affine form
  x_t = a_t x_0 + s_t eps with a = 1 - sigma, s = sigma, so everything below serves both processes;
* conversions between epsilon, v, x0 ("sample") and flow-velocity ("flow": v = eps - x0)
  parameterisations (Salimans & Ho 2022, eq. 2; Lipman et al. 2023);
* classifier-free guidance (Ho & Salimans 2022) and the guidance embedding that diffusers'
  ``StableDiffusionPipeline`` feeds a UNet with ``time_cond_proj_dim`` (it embeds
  ``guidance_scale - 1``);
* consistency-model boundary scalings c_skip, c_out (Song et al. 2023, eq. 7; the discrete form
  used by Latent Consistency Models and diffusers' ``LCMScheduler``);
* ``Denoiser``: a thin wrapper around a diffusers UNet that returns (x0, eps) for any prediction
  type, optionally guided, batching the conditional and unconditional passes into one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

# LCM's boundary-condition constants (Luo et al. 2023, sec. 4.1; diffusers LCMScheduler defaults).
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector (B,) or scalar to broadcast against ``like`` (B, C, H, W)."""
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def table_at(table: torch.Tensor, t: torch.Tensor | int, final: float) -> torch.Tensor:
    """``table[t]`` at integer timesteps t; t < 0 (the step past the first training timestep) gives ``final``."""
    t = torch.as_tensor(t, device=table.device).long()
    v = table[t.clamp(min=0)]
    return torch.where(t < 0, torch.full_like(v, final), v)


class AffineSchedule:
    """What every noise process x_t = alpha_t x_0 + sigma_t eps gives: (alpha, sigma) from ``_alpha_sigma``."""

    def alpha_sigma(self, t: torch.Tensor | int, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t); with ``like`` they are cast and shaped to broadcast against it."""
        alpha, sigma = self._alpha_sigma(t)
        if like is not None:
            alpha, sigma = _bcast(alpha, like), _bcast(sigma, like)
        return alpha, sigma

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0): alpha_t x_0 + sigma_t eps (DDPMScheduler.add_noise on a VP schedule,
        FlowMatchEulerDiscreteScheduler.scale_noise on a flow one)."""
        alpha, sigma = self.alpha_sigma(t, like=x0)
        return alpha * x0 + sigma * noise


@dataclass
class NoiseSchedule(AffineSchedule):
    """A discrete VP schedule: alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]).

    ``final_alphas_cumprod`` is what a timestep < 0 (the step past t=0) means; diffusers' DDIM uses
    ``alphas_cumprod[0]`` when ``set_alpha_to_one=False`` and 1.0 (sigma = 0, the clean sample) otherwise.
    """

    alphas_cumprod: torch.Tensor  # (T,)
    final_alphas_cumprod: float = 1.0

    @classmethod
    def from_scheduler(cls, scheduler, final_alphas_cumprod: float | None = None) -> NoiseSchedule:
        """Read the schedule of any diffusers scheduler that has ``alphas_cumprod`` (DDPM, DDIM, Euler, LCM, ...)."""
        acp = scheduler.alphas_cumprod.detach().to(torch.float64).clone()
        if final_alphas_cumprod is None:
            final = getattr(scheduler, "final_alpha_cumprod", None)
            final_alphas_cumprod = float(final) if final is not None else 1.0
        return cls(acp, float(final_alphas_cumprod))

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of discrete training timesteps."""
        return int(self.alphas_cumprod.shape[0])

    def alphas_cumprod_at(self, t: torch.Tensor | int) -> torch.Tensor:
        """alphas_cumprod at integer timesteps; t < 0 gives ``final_alphas_cumprod``."""
        return table_at(self.alphas_cumprod, t, self.final_alphas_cumprod)

    def _alpha_sigma(self, t):
        acp = self.alphas_cumprod_at(t)
        return acp.sqrt(), (1.0 - acp).sqrt()

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network is given at training timesteps t: a UNet of a discrete schedule takes t itself."""
        return t

    def with_clean_end(self) -> NoiseSchedule:
        """The same schedule with the step past t = 0 going to the clean sample (alpha = 1), as Euler presets do."""
        return NoiseSchedule(self.alphas_cumprod, final_alphas_cumprod=1.0)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The static timestep shift shift * sigma / (1 + (shift - 1) sigma) (Esser et al. 2024, eq. 23; SD3)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                     max_shift: float) -> float:
    """Flux's resolution-dependent mu: linear in the image token count from base_shift to max_shift
    (diffusers' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def time_shift(mu: float, sigmas: torch.Tensor, kind: str = "exponential") -> torch.Tensor:
    """Dynamic shifting of sigmas by mu: e^mu / (e^mu + 1/sigma - 1) ("exponential", Flux; the static shift
    with shift = e^mu) or mu / (mu + 1/sigma - 1) ("linear")."""
    m = math.exp(mu) if kind == "exponential" else mu
    return m / (m + (1 / sigmas - 1))


@dataclass
class FlowMatchSchedule(AffineSchedule):
    """The flow-matching process x_t = (1 - sigma_t) x_0 + sigma_t eps on T discrete training timesteps.

    ``sigmas[t]`` is the noise level of training timestep t (ascending in t; t < 0 gives ``final_sigma``,
    0: the clean sample); the network is given ``sigma * timestep_scale`` as its timestep, as diffusers' SD3
    and Flux pipelines pass ``FlowMatchEulerDiscreteScheduler.timesteps``. Integer timesteps keep the
    interface of ``NoiseSchedule`` (grids, ``add_noise``, ``alpha_sigma``), so methods need not know which
    process they train on.
    """

    sigmas: torch.Tensor  # (T,) float64, ascending
    final_sigma: float = 0.0
    timestep_scale: float = 1000.0

    @classmethod
    def from_scheduler(cls, scheduler, image_seq_len: int | None = None) -> FlowMatchSchedule:
        """The training sigmas of a ``FlowMatchEulerDiscreteScheduler`` config: (t + 1) / T, shifted statically
        by ``shift`` or, with ``use_dynamic_shifting``, by mu of ``image_seq_len`` tokens (Flux)."""
        from .errors import require

        cfg = scheduler.config
        require("shift" in cfg or cfg.get("use_dynamic_shifting", False),
                f"the {type(scheduler).__name__} config has no 'shift' (a flow-matching teacher's timestep shift)")
        n = int(cfg.get("num_train_timesteps", 1000))
        u = torch.arange(1, n + 1, dtype=torch.float64) / n
        if cfg.get("use_dynamic_shifting", False):
            require(image_seq_len is not None, "dynamic shifting needs the image token count (image_seq_len)")
            mu = dynamic_shift_mu(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                  cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
            sig = time_shift(mu, u, cfg.get("time_shift_type", "exponential"))
        else:
            sig = shift_sigmas(u, float(cfg["shift"]))
        return cls(sig, 0.0, float(n))

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of discrete training timesteps."""
        return int(self.sigmas.shape[0])

    def sigma_at(self, t: torch.Tensor | int) -> torch.Tensor:
        """sigma at integer timesteps; t < 0 gives ``final_sigma``."""
        return table_at(self.sigmas, t, self.final_sigma)

    def _alpha_sigma(self, t):
        sigma = self.sigma_at(t)
        return 1.0 - sigma, sigma

    def with_clean_end(self) -> FlowMatchSchedule:
        """Itself: the step past the first training timestep already goes to sigma = 0."""
        return self

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t * timestep_scale (float32): the timestep diffusers' flow pipelines give the transformer."""
        t = torch.as_tensor(t)
        return (self.sigma_at(t) * self.timestep_scale).to(device=t.device, dtype=torch.float32)


def to_x0_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a network output of ``prediction_type`` at x_t into (x0, eps) estimates."""
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sigma * eps) / alpha
    elif prediction_type == "v_prediction":
        # v = alpha * eps - sigma * x0  =>  x0 = alpha x_t - sigma v,  eps = sigma x_t + alpha v
        x0 = alpha * x_t - sigma * model_output
        eps = sigma * x_t + alpha * model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - alpha * x0) / sigma
    elif prediction_type == "flow":
        # velocity v = eps - x0 on the flow schedule (alpha = 1 - sigma): x0 = x_t - sigma v, eps = x_t + alpha v
        x0 = x_t - sigma * model_output
        eps = x_t + alpha * model_output
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    return x0, eps


def from_x0_eps(
    x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The network output of ``prediction_type`` that corresponds to the pair (x0, eps)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def apply_cfg(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance uncond + w (cond - uncond), diffusers' convention (w = 1: no guidance)."""
    w = _bcast(guidance_scale, cond) if torch.is_tensor(guidance_scale) else guidance_scale
    return uncond + w * (cond - uncond)


def guidance_embedding(guidance_scale: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The UNet ``timestep_cond`` for a guidance scale w: a sinusoidal embedding of (w - 1) * 1000.

    This is the convention of diffusers' StableDiffusionPipeline (it embeds ``guidance_scale - 1``
    with ``get_guidance_scale_embedding``, VDM-style), so a student distilled for w samples with
    ``guidance_scale=w`` in plain diffusers. Returns (B, dim).
    """
    w = (torch.as_tensor(guidance_scale).reshape(-1).to(torch.float32) - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def consistency_scalings(
    t: torch.Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundary scalings (c_skip, c_out) at discrete timesteps t, so f(x, t) = c_skip x + c_out x0_hat.

    c_skip(0) = 1 and c_out(0) = 0 make f the identity at t = 0 (the consistency boundary condition);
    ``timestep_scaling`` sharpens the transition (LCM uses 10), exactly as LCMScheduler does.
    """
    s = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_output(
    x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, timestep_scaling: float = TIMESTEP_SCALING
) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat: the consistency function's output at timesteps t."""
    c_skip, c_out = consistency_scalings(t, timestep_scaling=timestep_scaling)
    return _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * x0_hat


def unet_call(net, x_t: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
              timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
    """The raw output of a diffusers ``UNet2DConditionModel`` (SD 1.x/2.x): cond is its text embedding (B, L, D)."""
    return net(x_t, timestep, encoder_hidden_states=cond, timestep_cond=timestep_cond).sample


class Denoiser:
    """A diffusers network seen as a denoiser: (x_t, t, conditioning) -> (x0, eps) estimates.

    ``guidance_scale`` set and the network has no guidance embedding: classifier-free guidance with the
    conditional and unconditional passes batched into one call. If the UNet has ``time_cond_proj_dim``,
    the guidance scale is fed as its embedding instead (one pass).

    ``call(net, x_t, timestep, cond, timestep_cond)`` runs the network: ``unet_call`` by default; a teacher
    adapter (``teachers/``) gives its family's call (SDXL's added conditions, SD3/Flux transformers). The
    conditioning is opaque here: only its batch dimension is concatenated. The network is given
    ``schedule.model_timestep(t)`` (t itself on a discrete VP schedule, sigma * 1000 on a flow schedule).
    """

    def __init__(self, unet, schedule, prediction_type: str, call=unet_call, guidance_input: bool = False):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.call = call
        # A guidance-distilled network (Flux-dev) takes the guidance scale itself as an input: one pass, the
        # scale handed to ``call`` as ``timestep_cond`` (B,), never classifier-free guidance.
        self.guidance_input = guidance_input

    @property
    def guidance_embedding_dim(self) -> int | None:
        """The UNet's ``time_cond_proj_dim`` (None when it has no guidance embedding)."""
        # DDP keeps the model in .module, torch.compile in ._orig_mod; FSDP2 shards in place (config kept).
        # (accelerate's extract_model_from_parallel costs ~2 ms, too much for every denoiser call.)
        unet = getattr(self.unet, "module", self.unet)
        unet = getattr(unet, "_orig_mod", unet)
        return getattr(getattr(unet, "config", None), "time_cond_proj_dim", None)

    def model_output(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw network output; a guidance embedding is fed when the UNet has one and a scale is given."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        timestep_cond = None
        dim = self.guidance_embedding_dim
        if self.guidance_input:
            w = guidance_scale if guidance_scale is not None else torch.ones(x_t.shape[0])
            timestep_cond = torch.as_tensor(w, dtype=torch.float32).reshape(-1).expand(x_t.shape[0]).to(x_t.device)
        elif dim is not None:
            w = guidance_scale if guidance_scale is not None else torch.ones(x_t.shape[0])
            w = torch.as_tensor(w, dtype=torch.float32).reshape(-1).expand(x_t.shape[0])
            timestep_cond = guidance_embedding(w, dim).to(device=x_t.device, dtype=x_t.dtype)
        return self.call(self.unet, x_t, self.schedule.model_timestep(t), cond, timestep_cond)

    def x0_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) at (x_t, t); classifier-free guided when ``uncond`` and ``guidance_scale`` are given."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        alpha, sigma = self.schedule.alpha_sigma(t, like=x_t)
        w = None if guidance_scale is None else torch.as_tensor(guidance_scale, dtype=torch.float32)
        if uncond is None or w is None or self.guidance_input or self.guidance_embedding_dim is not None:
            out = self.model_output(x_t, t, cond, w)
            return to_x0_eps(out, x_t, alpha, sigma, self.prediction_type)
        # CFG: one batched call of 2B, (uncond, cond); guidance is applied to x0 and eps alike,
        # which is the same as guiding the raw output because the conversion is affine in it.
        if uncond.shape[0] != cond.shape[0]:
            uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
        ts = self.schedule.model_timestep(torch.cat([t, t]))
        out = self.call(self.unet, torch.cat([x_t, x_t]), ts, torch.cat([uncond, cond]), None)
        out_u, out_c = out.chunk(2)
        guided = apply_cfg(out_u, out_c, w.to(x_t.device) if w.ndim else float(w))
        return to_x0_eps(guided, x_t, alpha, sigma, self.prediction_type)


def scheduler_prediction_type(scheduler) -> str:
    """The prediction type a diffusers scheduler was configured with (validated)."""
    pt = scheduler.config.get("prediction_type", "epsilon")
    if pt not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {pt!r}; expected one of {PREDICTION_TYPES}")
    return pt


def one_step_sample(denoiser: Denoiser, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """A one-step student's sample: pure noise at t = T - 1 -> f = c_skip z + c_out x0_hat, the map the
    exported LCMScheduler preset applies in one step (DMD/SDS generators, ADD's 1-step path)."""
    t = torch.full((noise.shape[0],), denoiser.schedule.num_train_timesteps - 1, device=noise.device)
    x0, _ = denoiser.x0_eps(noise, t, cond)
    return consistency_output(noise, x0, t, TIMESTEP_SCALING)
