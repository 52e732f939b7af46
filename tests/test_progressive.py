"""Progressive distillation: grids, targets, stage mechanics, exports and mid-stage resume."""

from __future__ import annotations

import pytest
import torch

from diffdistill.config import RunConfig, build_run_config
from diffdistill.denoiser import Denoiser, NoiseSchedule, to_x0_eps
from diffdistill.errors import UserError
from diffdistill.methods.progressive import (
    ProgressiveConfig,
    ProgressiveDistillation,
    halving_plan,
    one_step_target,
    progressive_loss,
)
from diffdistill.solvers import ddim_step, trailing_grid

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _schedule():
    from diffusers import DDPMScheduler

    return NoiseSchedule.from_scheduler(DDPMScheduler(**SD), final_alphas_cumprod=1.0)


def test_halving_plan_and_bad_targets():
    assert halving_plan(64, 4) == [32, 16, 8, 4]
    assert halving_plan(64, 1) == [32, 16, 8, 4, 2, 1]
    with pytest.raises(UserError, match="nearest valid values: 2, 4"):
        halving_plan(64, 3)
    with pytest.raises(UserError, match="at least one halving stage"):
        halving_plan(8, 8)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_exported_scheduler_visits_exactly_the_training_grid_of_every_stage(pt, tiny_sd, tiny_sd_v):
    from diffdistill.teachers import load_teacher

    teacher = load_teacher(tiny_sd if pt == "epsilon" else tiny_sd_v)
    method = ProgressiveDistillation(ProgressiveConfig(start_steps=64), RunConfig(output="x", steps=1))
    method.setup(teacher)
    sched = method.export_scheduler(teacher.scheduler)
    assert sched.config.prediction_type == pt
    for stage in method.stages:
        n = stage.student_steps
        sched.set_timesteps(n)
        grid = trailing_grid(1000, n)
        assert sched.timesteps.round().long().tolist() == grid[:-1].tolist(), n
        assert float(sched.sigmas[-1]) == 0.0  # the last step lands on the clean sample (alpha = 1)
        # the teacher's grid of that stage contains the student's grid (every other point)
        assert trailing_grid(1000, 2 * n)[::2].tolist() == grid.tolist()


def test_exported_euler_step_equals_the_trained_ddim_step(tiny_sd):
    """The student is trained on DDIM steps t_j -> t_(j+1); the exported Euler preset must take the same step."""
    from diffdistill.teachers import load_teacher

    teacher = load_teacher(tiny_sd)
    method = ProgressiveDistillation(ProgressiveConfig(start_steps=32), RunConfig(output="x", steps=2))
    method.setup(teacher)
    sched = method.export_scheduler(teacher.scheduler)
    for n in (16, 4, 2):
        sched.set_timesteps(n)
        grid = trailing_grid(1000, n)
        sample = torch.randn(2, 4, 8, 8) * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            x_vp = sched.scale_model_input(sample, t)
            out = torch.randn(2, 4, 8, 8)
            sample = sched.step(out, t, sample).prev_sample
            tt, ss = torch.full((2,), int(grid[i])), torch.full((2,), int(grid[i + 1]))

            def denoise(x, t_, out=out):
                a, s = method.schedule.alpha_sigma(t_, like=x)
                return to_x0_eps(out, x, a, s, "epsilon")

            mine = ddim_step(denoise, x_vp, tt, ss, method.schedule)
            alpha_s, _ = method.schedule.alpha_sigma(ss, like=mine)
            torch.testing.assert_close(mine / alpha_s, sample, atol=2e-4, rtol=2e-4)


def test_one_step_target_reproduces_the_two_step_result():
    sched = _schedule()
    z_t, z_s = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t, s = torch.tensor([999, 499, 249]), torch.tensor([499, -1, 124])
    x_tilde = one_step_target(z_t, z_s, t, s, sched)

    def denoise(x, tt):
        a, sg = sched.alpha_sigma(tt, like=x)
        return x_tilde, (x - a * x_tilde) / sg

    torch.testing.assert_close(ddim_step(denoise, z_t, t, s, sched), z_s, atol=1e-4, rtol=1e-4)


def test_loss_zero_for_exact_teacher_and_student():
    """A one-point data set answered exactly: two teacher steps = one student step, so the loss is 0."""
    x0_star = torch.randn(1, 4, 8, 8)

    class Oracle(torch.nn.Module):
        config = type("C", (), {"time_cond_proj_dim": None})()

        def forward(self, x, t, encoder_hidden_states, timestep_cond=None):
            return type("O", (), {"sample": x0_star.expand_as(x)})()

    den = Denoiser(Oracle(), _schedule(), "sample")
    batch = {"latents": x0_star.expand(4, -1, -1, -1), "cond": torch.randn(4, 2, 8), "uncond": torch.zeros(1, 2, 8),
             "grid": trailing_grid(1000, 8), "j": torch.tensor([0, 1, 2, 3])}
    loss, _ = progressive_loss(den, den, batch, ProgressiveConfig())
    assert loss.item() < 1e-8
    wrong = Denoiser(Oracle(), _schedule(), "epsilon")
    assert progressive_loss(wrong, den, batch, ProgressiveConfig())[0].item() > 1e-3


def _tiny_run(teacher, out, **kw):
    values = {"method": "progressive", "teacher": teacher, "output": str(out), "steps": 2, "batch_size": 2,
              "checkpointing_steps": 2, "validation_steps": 0, "lr_warmup_steps": 0, "learning_rate": 1e-4,
              "benchmark_samples": 0, "start_steps": 8, "iters_per_stage": 2, "guidance_iters": 2, **kw}
    return build_run_config({}, values)


@pytest.mark.slow
def test_stages_are_exported_and_sample_with_plain_diffusers(tiny_sd, tmp_path):
    from diffusers import DiffusionPipeline

    from diffdistill.distill import run_distill

    summary = run_distill(_tiny_run(tiny_sd, tmp_path / "run", log_every=1))
    assert summary["train_steps"] == 2 + 2 * 2  # guidance stage + halvings 8 -> 4 -> 2
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "logs.csv").open()))
    # the halving stages' log keys, first seen at step 3, became columns of the whole file
    assert [r["student_steps"] for r in rows] == ["", "", "4.0", "4.0", "2.0", "2.0"]
    names = sorted(p.split("/")[-1] for p in summary["stages"])
    assert names == ["2_steps", "4_steps", "8_steps"]
    for name, n in (("8_steps", 8), ("4_steps", 4), ("2_steps", 2), (None, 2)):
        folder = tmp_path / "run" / ("stages/" + name if name else "pipeline")
        pipe = DiffusionPipeline.from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        calls: list[int] = []
        pipe.unet.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(1))
        img = pipe("a handwritten digit 4", num_inference_steps=n, output_type="pt").images
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        assert len(calls) == n and torch.isfinite(img).all()  # guidance distilled: one pass per step


@pytest.mark.slow
def test_resume_mid_stage_is_exact(tiny_sd, tmp_path):
    from safetensors.torch import load_file

    from diffdistill.data import build_dataset
    from diffdistill.methods import get_method
    from diffdistill.teachers import load_teacher
    from diffdistill.trainer import Trainer, TrainingInterrupted, list_checkpoints

    def trainer_for(out, stop_after=None, resume=""):
        # A per-stage linear LR schedule with warm-up: resuming mid-stage must land on the same LR too.
        run = _tiny_run(tiny_sd, out, checkpointing_steps=100, resume_from_checkpoint=resume, iters_per_stage=3,
                        lr_scheduler="linear", lr_warmup_steps=1)
        spec = get_method("progressive")
        method = spec.method_cls(spec.config_cls(**run.method_args), run)
        run.train.max_train_steps = method.total_steps()
        tr = Trainer(run, method, load_teacher(tiny_sd), out, build_dataset(run.data, 32), run_id="one-run")
        if stop_after is not None:
            real = method.loss

            def loss(phase, batch, step):
                if step == stop_after:
                    tr._stop_signal = 15  # as if SIGTERM arrived during this step
                return real(phase, batch, step)

            method.loss = loss
        return tr

    trainer_for(tmp_path / "ref").fit()
    with pytest.raises(TrainingInterrupted):
        trainer_for(tmp_path / "cut", stop_after=3).fit()  # step 4 of 8: inside the first halving stage
    assert list_checkpoints(tmp_path / "cut" / "checkpoints")[-1].name == "checkpoint-4"
    trainer_for(tmp_path / "cut", resume="latest").fit()
    a = load_file(str(tmp_path / "ref/checkpoints/checkpoint-8/model_student.safetensors"))
    b = load_file(str(tmp_path / "cut/checkpoints/checkpoint-8/model_student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule_starts_over_at_every_stage(tiny_sd):
    from diffdistill.methods import get_method
    from diffdistill.trainer import segmented_lr_scheduler

    run = _tiny_run(tiny_sd, "unused", iters_per_stage=4, guidance_iters=2)
    spec = get_method("progressive")
    method = spec.method_cls(spec.config_cls(**run.method_args), run)
    assert method.lr_segments() == [(0, 2), (2, 4), (6, 4)]  # guidance (8 steps), then 4 and 2 steps
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = segmented_lr_scheduler("linear", opt, 1, method.lr_segments())
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # warm-up of 1 step (factor 0), then linear decay to 0 over the rest of each stage
    expect = [0, 1] + [0, 1, 2 / 3, 1 / 3] * 2
    assert lrs == pytest.approx(expect)


def test_time_limit_mid_run_exports_the_current_stage_with_its_own_step_count(tiny_sd, tmp_path):
    import json

    from diffdistill.distill import run_distill

    summary = run_distill(_tiny_run(tiny_sd, tmp_path / "run", max_train_minutes=1e-9))
    assert (summary["train_steps"], summary["stopped_by"]) == (1, "max_train_minutes")  # inside the guidance stage
    info = json.loads((tmp_path / "run" / "pipeline" / "diffdistill.json").read_text())
    assert info["num_inference_steps"] == 8  # the guidance stage's student samples in 8 steps, not --steps 2
    card = (tmp_path / "run" / "pipeline" / "README.md").read_text()
    assert "early, by --max-train-minutes, at step 1" in card


def test_halving_stage_teacher_is_not_guided_again_when_the_guidance_is_baked_in(tiny_sd3, one_thread):
    """SD3's MMDiT has no guidance embedding: the guidance stage bakes one scale into the student, and the later
    stages' teacher (that student) must be called once, conditionally; a CFG pass on top would compound the
    guidance at every halving."""
    from diffdistill.teachers import load_teacher

    teacher = load_teacher(tiny_sd3)
    cfg = ProgressiveConfig(start_steps=4, guidance_iters=1, iters_per_stage=1, w_min=1.5, w_max=1.5)
    method = ProgressiveDistillation(cfg, RunConfig(teacher=tiny_sd3, steps=2))
    method.validate(teacher)
    method.setup(teacher)
    method.before_step(0)
    with torch.no_grad():  # a stage teacher that differs from the original teacher
        for p in method.student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    method.before_step(1)  # the halving stage 4 -> 2 starts: its teacher is the student as it is now
    assert method.current.kind == "halve"
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "prompt": ["a handwritten digit 1", ""]}
    torch.manual_seed(3)
    loss, _ = method.loss("train", batch, 1)

    student = teacher.denoiser(method.student, method.schedule)
    stage_teacher = teacher.denoiser(method.stage_teacher, method.schedule)

    def manual(uncond_given: bool):
        torch.manual_seed(3)
        prepared = teacher.encode_batch(batch, "progressive distillation")
        prepared["grid"] = trailing_grid(1000, 4)
        if not uncond_given:
            prepared["uncond"] = None
        return progressive_loss(student, stage_teacher, prepared, cfg)[0]

    assert loss.item() == pytest.approx(manual(False).item(), rel=1e-5)
    assert abs(manual(True).item() - loss.item()) > 1e-3 * loss.item()  # guided again: another target
