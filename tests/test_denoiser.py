"""Identities of the parameterisation maths in diffdistill.denoiser, checked against diffusers."""

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline
from tolerance import assert_close_at_scale

from diffdistill.denoiser import (
    Denoiser,
    NoiseSchedule,
    apply_cfg,
    consistency_output,
    consistency_scalings,
    from_x0_eps,
    guidance_embedding,
    to_x0_eps,
)

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _schedule():
    return NoiseSchedule.from_scheduler(DDIMScheduler(**SD_BETAS))


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample"])
def test_conversions_round_trip(pt):
    g = torch.Generator().manual_seed(0)
    sched = _schedule()
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([1, 250, 600, 999])
    xt = sched.add_noise(x0, eps, t)
    alpha, sigma = sched.alpha_sigma(t, like=xt)
    out = from_x0_eps(x0, eps, alpha, sigma, pt)
    x0_hat, eps_hat = to_x0_eps(out, xt, alpha, sigma, pt)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(eps_hat, eps, atol=2e-3, rtol=1e-3)


def test_add_noise_matches_diffusers():
    s = DDIMScheduler(**SD_BETAS)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(_schedule().add_noise(x0, eps, t), s.add_noise(x0, eps, t))


def test_v_target_matches_diffusers_get_velocity():
    s = DDIMScheduler(**SD_BETAS, prediction_type="v_prediction")
    sched = NoiseSchedule.from_scheduler(s)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([3, 400, 998])
    alpha, sigma = sched.alpha_sigma(t, like=x0)
    torch.testing.assert_close(from_x0_eps(x0, eps, alpha, sigma, "v_prediction"), s.get_velocity(x0, eps, t))


def test_guidance_embedding_matches_stable_diffusion_pipeline():
    w = torch.tensor([1.0, 2.5, 7.5])
    for dim in (256, 33):
        ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=dim)
        torch.testing.assert_close(guidance_embedding(w, dim), ref)


def test_cfg_identities():
    u, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(apply_cfg(u, c, 1.0), c)
    torch.testing.assert_close(apply_cfg(u, c, 0.0), u)
    torch.testing.assert_close(apply_cfg(u, c, torch.tensor([1.0, 0.0])), torch.stack([c[0], u[1]]))


def test_consistency_scalings_match_lcm_scheduler_and_boundary():
    lcm = LCMScheduler(**SD_BETAS)
    t = torch.tensor([0, 19, 259, 999])
    c_skip, c_out = consistency_scalings(t)
    for i, ti in enumerate(t.tolist()):
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(ti)
        assert c_skip[i].item() == pytest.approx(ref_skip, rel=1e-12)
        assert c_out[i].item() == pytest.approx(ref_out, rel=1e-12)
    x, x0 = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(consistency_output(x, x0, torch.tensor([0])), x)  # f(x, 0) = x


class _LinearUNet(torch.nn.Module):
    """A stand-in UNet whose output depends on x, t and the text embedding in a known way."""

    def __init__(self, time_cond_proj_dim=None):
        super().__init__()
        self.config = type("C", (), {"time_cond_proj_dim": time_cond_proj_dim})()

    def forward(self, x, t, encoder_hidden_states, timestep_cond=None):
        out = 0.5 * x + encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None] + t[:, None, None, None] / 1000
        return type("O", (), {"sample": out})()


def test_denoiser_cfg_batched_equals_two_passes():
    den = Denoiser(_LinearUNet(), _schedule(), "epsilon")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    cond, uncond = torch.randn(2, 3, 32), torch.randn(1, 3, 32)
    x0_g, eps_g = den.x0_eps(x, t, cond, uncond, guidance_scale=3.0)
    _, eps_c = den.x0_eps(x, t, cond)
    _, eps_u = den.x0_eps(x, t, uncond.expand(2, -1, -1))
    # one batched pass against two: reduction order differs (tests/tolerance.py), weighed |1 - w| and |w| by CFG
    assert_close_at_scale(eps_g, eps_u + 3.0 * (eps_c - eps_u), 2.0 * eps_u.abs().max() + 3.0 * eps_c.abs().max())
    alpha, sigma = den.schedule.alpha_sigma(t, like=x)
    torch.testing.assert_close(x0_g, (x - sigma * eps_g) / alpha)
