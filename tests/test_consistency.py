"""Consistency distillation: loss identities, guidance-embedding convention, export scalings, LoRA round trip."""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_close_at_scale

from diffdistill.config import RunConfig
from diffdistill.denoiser import Denoiser, consistency_output, guidance_embedding, to_x0_eps
from diffdistill.errors import UserError
from diffdistill.methods.consistency import (
    ConsistencyConfig,
    ConsistencyDistillation,
    consistency_distance,
    consistency_loss,
)
from diffdistill.solvers import ddim_step, lcm_grid
from diffdistill.teachers import load_teacher


def _method(teacher_path, **kw):
    teacher = load_teacher(teacher_path)
    m = ConsistencyDistillation(ConsistencyConfig(w_min=1.0, w_max=3.0, **kw), RunConfig(output="unused", steps=4))
    m.setup(teacher)
    return m, teacher


def _batch(teacher, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = teacher.encode_prompts([f"a handwritten digit {k}" for k in range(b)])
    return {"latents": torch.randn(b, 4, 8, 8, generator=g), "cond": cond, "uncond": teacher.encode_prompts([""]),
            "noise": torch.randn(b, 4, 8, 8, generator=g), "w": torch.linspace(1.0, 3.0, b)}


def test_distance_zero_at_equality_and_huber_limits():
    a = torch.randn(2, 4, 8, 8)
    assert consistency_distance(a, a, "l2", 1e-3).item() == 0.0
    assert consistency_distance(a, a, "huber", 1e-3).item() == 0.0
    d = torch.full((1, 4), 3.0)  # |d| >> c: pseudo-Huber ~ |d| - c (robust, linear tails)
    assert consistency_distance(d, torch.zeros_like(d), "huber", 1e-3).item() == pytest.approx(3.0 - 1e-3, rel=1e-5)
    assert consistency_distance(d, torch.zeros_like(d), "l2", 1e-3).item() == pytest.approx(9.0)


def test_grid_matches_lcm_scheduler_timesteps():
    from diffusers import LCMScheduler

    grid = set(lcm_grid(1000, 50).tolist())
    s = LCMScheduler(num_train_timesteps=1000, original_inference_steps=50)
    for n in (1, 2, 4, 8):
        s.set_timesteps(n)
        assert set(s.timesteps.tolist()) <= grid  # the exported preset only visits trained timesteps


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd_v"])
def test_boundary_step_target_is_teacher_ddim_step(fixture, request):
    """At the first grid point (t = k - 1 -> s = 0) the target is the teacher's guided DDIM step itself,
    because f(x, 0) = x; this pins the epsilon AND v-prediction conversions of the target."""
    m, teacher = _method(request.getfixturevalue(fixture), loss_type="l2", ema_decay=0.0)
    batch = _batch(teacher)
    batch["n"] = torch.zeros(4, dtype=torch.long)
    student = Denoiser(m.student, teacher.schedule, teacher.prediction_type)
    loss, _ = consistency_loss(student, teacher.denoiser(), batch, m.cfg)

    k = 1000 // 50
    t, s = torch.full((4,), k - 1), torch.zeros(4, dtype=torch.long)
    x_t = teacher.schedule.add_noise(batch["latents"], batch["noise"], t)
    with torch.no_grad():
        def guided(x, tt):
            return teacher.denoiser().x0_eps(x, tt, batch["cond"], batch["uncond"], batch["w"])

        target = ddim_step(guided, x_t, t, s, teacher.schedule)
        x0_online, _ = student.x0_eps(x_t, t, batch["cond"], guidance_scale=batch["w"])
        online = consistency_output(x_t, x0_online, t)
    assert loss.item() == pytest.approx(((online - target) ** 2).mean().item(), rel=1e-4)


def test_loss_is_zero_for_a_perfect_consistency_function():
    """For a one-point data distribution an x0-predictor that always answers that point is exact: every
    teacher ODE step stays on the trajectory and f(x, t) = x0* at every t > 0, so the loss vanishes."""
    from diffdistill.denoiser import NoiseSchedule

    x0_star = torch.randn(1, 4, 8, 8)

    class Oracle(torch.nn.Module):
        config = type("C", (), {"time_cond_proj_dim": None})()

        def forward(self, x, t, encoder_hidden_states, timestep_cond=None):
            return type("O", (), {"sample": x0_star.expand_as(x)})()

    acp = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    den = Denoiser(Oracle(), NoiseSchedule(acp), "sample")
    # A huge timestep scaling makes c_skip ~ 0 and c_out ~ 1 away from t = 0.
    cfg = ConsistencyConfig(w_min=1.0, w_max=4.0, loss_type="l2", ema_decay=0.0, timestep_scaling=1e6)
    b = 6
    batch = {"latents": x0_star.expand(b, -1, -1, -1), "cond": torch.randn(b, 2, 8), "uncond": torch.zeros(1, 2, 8),
             "n": torch.arange(1, b + 1)}
    loss, _ = consistency_loss(den, den, batch, cfg)
    assert loss.item() < 1e-10
    # ... and it is not zero for a student that answers something else.
    wrong = Denoiser(Oracle(), NoiseSchedule(acp), "epsilon")
    assert consistency_loss(wrong, den, batch, cfg)[0].item() > 1e-3


def test_guidance_embedding_reaches_unet_exactly_as_the_pipeline_feeds_it(tiny_sd):
    """A student trained with teacher guidance w must sample with guidance_scale=w in plain diffusers:
    the UNet must receive the same timestep_cond in training (Denoiser) and in StableDiffusionPipeline."""
    from diffusers import LCMScheduler

    from diffdistill.export import build_pipeline

    m, teacher = _method(tiny_sd)
    seen = []
    hook = m.student.time_embedding.cond_proj.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    w = 2.5
    Denoiser(m.student, teacher.schedule, "epsilon").x0_eps(torch.randn(1, 4, 8, 8), torch.tensor([999]),
                                                            teacher.encode_prompts(["a handwritten digit 1"]),
                                                            guidance_scale=torch.tensor([w]))
    pipe = build_pipeline(teacher, m.student, LCMScheduler.from_config(teacher.scheduler.config))
    with torch.no_grad():
        pipe("a handwritten digit 1", num_inference_steps=1, guidance_scale=w, output_type="latent")
    hook.remove()
    assert len(seen) == 2  # one UNet pass per step: no unconditional pass
    torch.testing.assert_close(seen[0], seen[1])
    torch.testing.assert_close(seen[0], guidance_embedding(torch.tensor([w]), 256))


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_exported_lcm_scheduler_applies_training_scalings(pt, tiny_sd, tiny_sd_v):
    """LCMScheduler.step (one-step sampling, no noise) must equal c_skip x + c_out x0_hat from denoiser.py."""
    path = tiny_sd if pt == "epsilon" else tiny_sd_v
    m, teacher = _method(path, timestep_scaling=7.0)
    sched = m.export_scheduler(teacher.scheduler)
    assert sched.config.prediction_type == pt
    sched.set_timesteps(4)
    for t in sched.timesteps.tolist():
        x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        sched._step_index = len(sched.timesteps) - 1  # last step: the scheduler adds no noise
        ref = sched.step(out, t, x).denoised
        alpha, sigma = teacher.schedule.alpha_sigma(torch.tensor([t, t]), like=x)
        x0, _ = to_x0_eps(out, x, alpha, sigma, pt)
        mine = consistency_output(x, x0, torch.tensor([t, t]), timestep_scaling=7.0)
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)


def test_target_network_ema_update(tiny_sd):
    m, teacher = _method(tiny_sd, ema_decay=0.5)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.target.parameters()]
    m.after_step(1)
    for b, t, s in zip(before, m.target.parameters(), m.student.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)


def test_lora_export_round_trip(tiny_sd, tmp_path):
    """The diffusers-format LoRA loads with pipe.load_lora_weights and reproduces the student exactly;
    the fused UNet of the exported pipeline matches too."""
    from diffusers import StableDiffusionPipeline

    from diffdistill.export import export_lora

    m, teacher = _method(tiny_sd, lora_rank=4, ema_decay=0.0)
    with torch.no_grad():  # make the LoRA non-trivial (B is zero-initialised)
        for n, p in m.student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    state = m.lora_state_dict(lambda x: x)
    export_lora(teacher, state, tmp_path / "lora", m.export_scheduler(teacher.scheduler), 2, "a handwritten digit 3")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert saved and all(k.startswith("unet.") for k in saved)  # diffusers layout, not raw PEFT keys
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 499])
    cond = teacher.encode_prompts(["a handwritten digit 3"] * 2)
    with torch.no_grad():
        ref = m.student(x, t, encoder_hidden_states=cond).sample
        got = pipe.unet(x, t, encoder_hidden_states=cond).sample
        fused = m.fused_lora_unet(lambda x: x)(x, t, encoder_hidden_states=cond).sample
        base = teacher.unet(x, t, encoder_hidden_states=cond).sample
    # W x + B (A x) against diffusers' own LoRA layers and against (W + B A) x: float32 sums in another order
    assert_close_at_scale(got, ref)
    assert_close_at_scale(fused, ref)
    assert (ref - base).abs().max() > 1e-3  # the LoRA really changes the output


@pytest.mark.parametrize("kw,msg", [
    (dict(w_min=5.0, w_max=2.0), "--w-min"),
    (dict(loss_type="l3"), "--loss-type"),
    (dict(lora_rank=0), "--lora-rank"),
    (dict(lora_rank=-2), "--lora-rank"),
    (dict(solver="rk4"), "--solver"),
    (dict(num_ddim_timesteps=0), "--num-ddim-timesteps"),
    (dict(lora_rank=4, ema_decay=0.9), "--ema-decay"),
])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(UserError, match=msg):
        ConsistencyConfig(**kw)


def test_export_from_a_half_precision_teacher_is_float32_and_loads(tiny_sd, tmp_path):
    """Under mixed precision the teacher's VAE and text encoder are held in half precision; the export
    must still be one dtype (float32) so that plain diffusers samples the guidance-embedding student."""
    from safetensors.torch import load_file

    from diffdistill.export import export_pipeline
    from diffdistill.students import GUIDANCE_EMBED_DIM, student_from_teacher

    teacher = load_teacher(tiny_sd, dtype=torch.bfloat16)
    student = student_from_teacher(teacher.unet, GUIDANCE_EMBED_DIM)
    m = ConsistencyDistillation(ConsistencyConfig(w_min=1.0, w_max=3.0), RunConfig(output="unused", steps=2))
    m.setup(teacher)
    out = export_pipeline(teacher, student, m.export_scheduler(teacher.scheduler), tmp_path / "pipe", 2, 1.5, {}, "a digit 1")
    dtypes = {t.dtype for f in out.glob("*/*.safetensors") for t in load_file(str(f)).values()}
    assert dtypes == {torch.float32}
    assert teacher.pipe.text_encoder.dtype == torch.bfloat16  # the training copy is untouched


def test_export_takes_the_trainer_student_ema_over_the_target_when_asked(tiny_sd):
    teacher = load_teacher(tiny_sd)
    plain = ConsistencyDistillation(ConsistencyConfig(w_min=1.0, w_max=3.0), RunConfig(output="unused", steps=4))
    plain.setup(teacher)
    assert plain.export_unet(lambda m: m) is plain.target
    run = RunConfig(output="unused", steps=4)
    run.train.student_ema_decay = 0.999
    slow = ConsistencyDistillation(ConsistencyConfig(w_min=1.0, w_max=3.0), run)
    slow.setup(teacher)
    assert slow.export_unet(lambda m: m) is slow.student  # the trainer swaps the EMA weights in for export


@pytest.mark.slow
@pytest.mark.parametrize("w_range", [(1.5, 1.5), (1.0, 3.0)])
def test_single_guidance_scale_is_baked_in_and_pipeline_ignores_guidance_scale(w_range, tiny_sd, tmp_path):
    """w_min == w_max: the student trains without a guidance embedding and the export adds a zero one,
    so plain diffusers gives the same latents at guidance_scale 1.5 and at its default 7.5 (one pass per step).
    With a range, the same run teaches the embedding and the two calls differ."""
    from diffusers import DiffusionPipeline

    from diffdistill.cli import main

    out = tmp_path / "run"
    args = ["distill", "--method", "lcm", "--teacher", tiny_sd, "--output", str(out), "--max-train-steps", "3",
            "--batch-size", "4", "--checkpointing-steps", "2", "--validation-steps", "0", "--benchmark-samples", "0",
            "--steps", "2", "--num-ddim-timesteps", "10", "--w-min", str(w_range[0]), "--w-max", str(w_range[1]),
            "--lr-warmup-steps", "0", "--learning-rate", "1e-3", "--student-ema-decay", "0"]
    assert main(args) == 0
    pipe = DiffusionPipeline.from_pretrained(str(out / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    cond_proj = pipe.unet.time_embedding.cond_proj.weight
    latents = {}
    for g in (1.5, 7.5):
        with torch.no_grad():
            latents[g] = pipe("a handwritten digit 4", num_inference_steps=2, guidance_scale=g, output_type="latent",
                              generator=torch.Generator().manual_seed(0)).images
    if w_range[0] == w_range[1]:
        assert cond_proj.abs().max().item() == 0.0
        torch.testing.assert_close(latents[1.5], latents[7.5], rtol=0, atol=0)
        assert "baked in" in (out / "pipeline" / "README.md").read_text()
    else:
        assert cond_proj.abs().max().item() > 0.0
        assert (latents[1.5] - latents[7.5]).abs().max().item() > 1e-6
