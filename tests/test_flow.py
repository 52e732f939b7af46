"""Flow matching (SD3, Flux) in the one home of the maths: the schedule, the velocity parameterisation, CFG,
and the flow Euler/Heun steps, checked against diffusers' FlowMatch schedulers step for step."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from tolerance import assert_close_at_scale

from diffdistill.denoiser import (
    Denoiser,
    FlowMatchSchedule,
    consistency_output,
    dynamic_shift_mu,
    from_x0_eps,
    to_x0_eps,
)
from diffdistill.errors import UserError
from diffdistill.methods.consistency import ConsistencyConfig, consistency_loss
from diffdistill.methods.progressive import ProgressiveConfig, progressive_loss
from diffdistill.solvers import ddim_step, flow_euler_step, flow_heun_step, sample_loop, trailing_grid

FLUX_CFG = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096, shift=3.0)


def _inference_schedule(sch) -> FlowMatchSchedule:
    """A flow schedule whose training timesteps 0..n-1 are the scheduler's n inference sigmas (ascending)."""
    return FlowMatchSchedule(sch.sigmas[:-1].flip(0).to(torch.float64), 0.0, sch.config.num_train_timesteps)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_sigmas_and_timesteps_match_diffusers(shift):
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    fs = FlowMatchSchedule.from_scheduler(sch)
    torch.testing.assert_close(fs.sigmas.flip(0).float(), sch.sigmas, rtol=0, atol=1e-6)
    t = torch.arange(fs.num_train_timesteps)
    torch.testing.assert_close(fs.model_timestep(t).flip(0), sch.timesteps, rtol=0, atol=1e-3)
    assert fs.model_timestep(torch.tensor([999])).item() == 1000.0  # the top is pure noise, timestep 1000


def test_dynamic_shift_matches_diffusers_set_timesteps_with_mu():
    """Flux: sigmas shifted by mu of the image token count, as FluxPipeline passes it to set_timesteps."""
    sch = FlowMatchEulerDiscreteScheduler(**FLUX_CFG)
    seq = 1024  # a 64x64 latent packed in 2x2 patches
    fs = FlowMatchSchedule.from_scheduler(sch, image_seq_len=seq)
    mu = dynamic_shift_mu(seq, 256, 4096, 0.5, 1.15)
    u = [1.0, 0.75, 0.5, 0.25]
    sch.set_timesteps(sigmas=u, mu=mu)
    mine = fs.sigma_at(torch.tensor([999, 749, 499, 249]))
    torch.testing.assert_close(mine.float(), sch.sigmas[:-1], rtol=0, atol=1e-6)


def test_shift_missing_from_scheduler_config_is_one_line_error():
    sch = FlowMatchEulerDiscreteScheduler()
    cfg = {k: v for k, v in sch.config.items() if k != "shift"}
    fake = type("S", (), {"config": cfg})()
    with pytest.raises(UserError, match="has no 'shift'") as e:
        FlowMatchSchedule.from_scheduler(fake)
    assert "\n" not in str(e.value)


def test_add_noise_matches_scale_noise():
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(8)
    fs = _inference_schedule(sch)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for i in (0, 3, 7):
        ref = sch.scale_noise(x0, sch.timesteps[i:i + 1], eps)
        torch.testing.assert_close(fs.add_noise(x0, eps, torch.tensor([7 - i])), ref)


@pytest.mark.parametrize("pt", ["epsilon", "sample", "flow"])  # v_prediction assumes alpha^2 + sigma^2 = 1 (VP)
def test_round_trips_on_flow_schedule(pt):
    fs = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([3, 250, 600, 990])
    xt = fs.add_noise(x0, eps, t)
    a, s = fs.alpha_sigma(t, like=xt)
    x0_hat, eps_hat = to_x0_eps(from_x0_eps(x0, eps, a, s, pt), xt, a, s, pt)
    assert_close_at_scale(x0_hat, x0, 10.0)  # (x_t - sigma eps) / alpha amplifies by 1/alpha <= ~10 here
    assert_close_at_scale(eps_hat, eps, 10.0)
    if pt == "flow":  # the velocity target of rectified flow, and x_t = x0 + sigma v
        torch.testing.assert_close(from_x0_eps(x0, eps, a, s, "flow"), eps - x0)
        torch.testing.assert_close(xt, x0 + s * (eps - x0))


def _random_velocity_steps(sch, steps, g, mu=None):
    """Pairs (our step, diffusers' step) on the scheduler's own sigmas, with a fresh random velocity each step."""
    sch.set_timesteps(steps, mu=mu) if mu is not None else sch.set_timesteps(steps)
    fs = _inference_schedule(sch)
    x = torch.randn(2, 4, 8, 8, generator=g)
    n = len(sch.timesteps)
    for i, ts in enumerate(sch.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=g)
        ref = sch.step(v, ts, x).prev_sample

        def denoise(xx, tt, v=v):
            a, s = fs.alpha_sigma(tt, like=xx)
            return to_x0_eps(v, xx, a, s, "flow")

        t, s = torch.full((2,), n - 1 - i), torch.full((2,), n - 2 - i)
        yield flow_euler_step(denoise, x, t, s, fs), ddim_step(denoise, x, t, s, fs), ref
        x = ref


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_euler_matches_diffusers_step_for_step(kind):
    cfg = dict(shift=3.0) if kind == "sd3" else FLUX_CFG
    mu = None if kind == "sd3" else dynamic_shift_mu(1024, 256, 4096, 0.5, 1.15)
    g = torch.Generator().manual_seed(2)
    for mine, ddim, ref in _random_velocity_steps(FlowMatchEulerDiscreteScheduler(**cfg), 6, g, mu):
        assert_close_at_scale(mine, ref)
        # DDIM on the flow schedule is the flow Euler step (both land on (1 - sigma_s) x0 + sigma_s eps)
        assert_close_at_scale(ddim, mine)


def _fake_velocity(x, timestep):
    """A smooth, non-trivial velocity field of the sample and the (float, sigma * 1000) timestep."""
    ts = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return 0.6 * torch.tanh(x) + 0.3 * torch.cos(ts / 400.0) * x.flip(-1)


def test_flow_heun_full_loop_matches_diffusers():
    sch = FlowMatchHeunDiscreteScheduler(shift=3.0)
    sch.set_timesteps(5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sample = x.clone()
    for ts in sch.timesteps:
        sample = sch.step(_fake_velocity(sample, ts), ts, sample).prev_sample
    sigmas = sch.sigmas[:-1:2]  # Heun's grid repeats each inner point: [s0, s1, s1, ..., s4, s4, 0] -> s0..s4
    fs = FlowMatchSchedule(sigmas.flip(0).to(torch.float64), 0.0, 1000.0)

    def denoise(xx, tt):
        a, s = fs.alpha_sigma(tt, like=xx)
        return to_x0_eps(_fake_velocity(xx, fs.model_timestep(tt)), xx, a, s, "flow")

    mine = sample_loop(denoise, x, list(range(len(sigmas) - 1, -1, -1)), fs, solver="heun")
    assert_close_at_scale(mine, sample, 2 * sample.abs().max())
    # the same loop through flow_heun_step directly, one grid step at a time
    y = x
    for k in range(len(sigmas) - 1, -1, -1):
        y = flow_heun_step(denoise, y, torch.full((2,), k), torch.full((2,), k - 1), fs)
    torch.testing.assert_close(y, mine)


class _PackedTransformer(torch.nn.Module):
    """A stand-in flow transformer whose output depends on x, the timestep and both parts of a packed
    conditioning (tokens and, as the last row, a pooled vector)."""

    def forward(self, x, timestep, tokens, pooled):
        return 0.5 * x + tokens.mean(dim=(1, 2))[:, None, None, None] + pooled.sum(1)[:, None, None, None] \
            + timestep[:, None, None, None] / 1000


def _packed_call(net, x, timestep, cond, timestep_cond=None):
    return net(x, timestep, cond[:, :-1], cond[:, -1, :8])


def test_flow_denoiser_cfg_batched_equals_two_passes():
    fs = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    den = Denoiser(_PackedTransformer(), fs, "flow", call=_packed_call)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    cond, uncond = torch.randn(2, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    x0_g, eps_g = den.x0_eps(x, t, cond, uncond, guidance_scale=3.0)
    x0_c, eps_c = den.x0_eps(x, t, cond)
    x0_u, eps_u = den.x0_eps(x, t, uncond.expand(2, -1, -1))
    scale = 2.0 * eps_u.abs().max() + 3.0 * eps_c.abs().max()
    assert_close_at_scale(eps_g, eps_u + 3.0 * (eps_c - eps_u), scale)
    assert_close_at_scale(x0_g, x0_u + 3.0 * (x0_c - x0_u), scale)
    # the network saw sigma * 1000, the timestep diffusers' SD3 pipeline passes
    v = den.model_output(x, t, cond)
    ref = _PackedTransformer()(x, fs.sigma_at(t).float() * 1000, cond[:, :-1], cond[:, -1, :8])
    torch.testing.assert_close(v, ref)


def _exact_flow_denoisers(fs, x0):
    """A teacher whose x0 is the one datum ``x0`` (its flow ODE is a straight line to it), and a student that is
    that ODE's exact consistency function: its x0_hat makes c_skip x + c_out x0_hat = x0 at every t > 0."""
    from diffdistill.denoiser import consistency_scalings

    table = fs.sigmas.float() * fs.timestep_scale

    def t_of(ts):  # the training timestep of the sigma * 1000 the network is given
        return (table[None, :] - ts[:, None]).abs().argmin(1)

    def teacher(net, x, ts, cond, tc=None):
        a, s = fs.alpha_sigma(t_of(ts), like=x)
        return from_x0_eps(x0.expand_as(x), (x - a * x0) / s, a, s, "flow")

    def student(net, x, ts, cond, tc=None):
        t = t_of(ts)
        c_skip, c_out = (c.float()[:, None, None, None] for c in consistency_scalings(t))
        x0_hat = (x0 - c_skip * x) / c_out
        a, s = fs.alpha_sigma(t, like=x)
        return from_x0_eps(x0_hat, (x - a * x0_hat) / s, a, s, "flow")

    return Denoiser(None, fs, "flow", call=teacher), Denoiser(None, fs, "flow", call=student)


@pytest.mark.parametrize("solver", ["ddim", "euler", "heun"])
def test_consistency_loss_is_zero_when_student_is_the_exact_consistency_function(solver):
    fs = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    teacher, student = _exact_flow_denoisers(fs, x0)
    cfg = ConsistencyConfig(num_ddim_timesteps=10, solver=solver, loss_type="l2", w_min=2.0, w_max=2.0)
    batch = {"latents": x0.expand(3, -1, -1, -1), "cond": torch.zeros(3, 2, 4), "uncond": torch.zeros(1, 2, 4),
             "n": torch.tensor([1, 5, 9])}  # n >= 1: the target point is inside the flow (sigma > 0)
    loss, _ = consistency_loss(student, teacher, batch, cfg)
    assert loss.item() < 1e-9
    # and it is not zero for a student that is off by a little
    off = Denoiser(None, fs, "flow", call=lambda n, x, ts, c, tc=None: student.call(n, x, ts, c) + 0.01)
    assert consistency_loss(off, teacher, batch, cfg)[0].item() > 1e-6
    # the consistency function of the top point gives the datum
    t = torch.tensor([999])
    x_top = fs.add_noise(x0, torch.randn_like(x0), t)
    torch.testing.assert_close(consistency_output(x_top, student.x0_eps(x_top, t, None)[0], t), x0)


def test_progressive_loss_is_zero_when_one_student_step_equals_two_teacher_steps():
    fs = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    teacher, _ = _exact_flow_denoisers(fs, x0)
    batch = {"latents": x0.expand(2, -1, -1, -1), "cond": torch.zeros(2, 2, 4), "uncond": torch.zeros(1, 2, 4),
             "grid": trailing_grid(1000, 8), "j": torch.tensor([0, 3])}
    loss, _ = progressive_loss(teacher, teacher, batch, ProgressiveConfig(w_min=1.0, w_max=1.0))
    assert loss.item() < 1e-8
    assert not math.isnan(loss.item())
