"""The pure solvers agree step for step with diffusers' own schedulers."""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from diffdistill.denoiser import NoiseSchedule, to_x0_eps
from diffdistill.solvers import ddim_step, euler_step, heun_step, sample_loop

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _fake_model(x, t):
    """A smooth, non-trivial 'network output' as a function of the VP sample and (float) timestep."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return 0.7 * torch.tanh(x) + 0.2 * torch.cos(t / 300.0) * x.flip(-1)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers(pt):
    sch = DDIMScheduler(**SD, prediction_type=pt, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sch.set_timesteps(10)
    sched = NoiseSchedule.from_scheduler(sch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ts = sch.timesteps.tolist()
    for i, t in enumerate(ts):
        out = torch.randn(2, 4, 8, 8, generator=g)
        ref = sch.step(out, t, x).prev_sample
        s = ts[i + 1] if i + 1 < len(ts) else t - 1000 // 10

        def denoise(xx, tt, out=out):
            a, sg = sched.alpha_sigma(tt, like=xx)
            return to_x0_eps(out, xx, a, sg, pt)

        mine = ddim_step(denoise, x, torch.full((2,), t), torch.full((2,), s), sched)
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
        x = ref


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_euler_matches_diffusers(pt):
    sch = EulerDiscreteScheduler(**SD, prediction_type=pt, timestep_spacing="leading", steps_offset=1)
    sch.set_timesteps(8)
    sched = NoiseSchedule.from_scheduler(sch, final_alphas_cumprod=1.0)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g) * sch.init_noise_sigma  # VE-scaled, as diffusers keeps it
    ts = sch.timesteps.long().tolist()
    for i, t in enumerate(ts):
        x_vp = sch.scale_model_input(sample, sch.timesteps[i])
        out = torch.randn(2, 4, 8, 8, generator=g)
        ref = sch.step(out, sch.timesteps[i], sample).prev_sample
        s = ts[i + 1] if i + 1 < len(ts) else -1

        def denoise(xx, tt, out=out):
            a, sg = sched.alpha_sigma(tt, like=xx)
            return to_x0_eps(out, xx, a, sg, pt)

        mine_vp = euler_step(denoise, x_vp, torch.full((2,), t), torch.full((2,), s), sched)
        alpha_s, _ = sched.alpha_sigma(torch.full((2,), s), like=mine_vp)
        torch.testing.assert_close(mine_vp / alpha_s, ref, atol=1e-4, rtol=1e-4)
        sample = ref


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_heun_full_loop_matches_diffusers(pt):
    sch = HeunDiscreteScheduler(**SD, prediction_type=pt, timestep_spacing="leading", steps_offset=1)
    sch.set_timesteps(5)
    sched = NoiseSchedule.from_scheduler(sch, final_alphas_cumprod=1.0)
    x_init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sample = x_init * sch.init_noise_sigma
    for t in sch.timesteps:
        model_in = sch.scale_model_input(sample, t)
        sample = sch.step(_fake_model(model_in, t), t, sample).prev_sample

    def denoise(xx, tt):
        a, sg = sched.alpha_sigma(tt, like=xx)
        return to_x0_eps(_fake_model(xx, tt), xx, a, sg, pt)

    grid = sch.timesteps[::2].round().long().tolist()  # Heun's timesteps repeat each grid point
    # the first sample is x_T scaled to VP: init_noise_sigma * alpha_T
    x = x_init * sch.init_noise_sigma * sched.alpha_sigma(grid[0])[0].float()
    mine = sample_loop(denoise, x, grid, sched, solver="heun")
    torch.testing.assert_close(mine, sample, atol=2e-4, rtol=2e-4)


def test_heun_exact_when_x0_is_constant():
    """With a denoiser that always returns the same x0, the PF-ODE solution is exact for any solver."""
    sched = NoiseSchedule.from_scheduler(DDIMScheduler(**SD), final_alphas_cumprod=1.0)
    x0 = torch.randn(1, 4, 8, 8)
    eps = torch.randn(1, 4, 8, 8)
    xt = sched.add_noise(x0, eps, torch.tensor([900]))

    def denoise(xx, tt):
        a, sg = sched.alpha_sigma(tt, like=xx)
        return x0.expand_as(xx), (xx - a * x0) / sg

    for step in (ddim_step, euler_step, heun_step):
        xs = step(denoise, xt, torch.tensor([900]), torch.tensor([300]), sched)
        torch.testing.assert_close(xs, sched.add_noise(x0, eps, torch.tensor([300])), atol=1e-4, rtol=1e-4)
