"""Adversarial diffusion distillation: a few real training steps, losses, export grid, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from diffdistill.config import build_run_config
from diffdistill.errors import UserError
from diffdistill.methods.adversarial import AdversarialConfig, hinge_d_loss
from diffdistill.solvers import lcm_grid


def _run(teacher, out, **kw):
    values = {"method": "add", "teacher": teacher, "output": str(out), "steps": 2, "batch_size": 2,
              "max_train_steps": 3, "checkpointing_steps": 0, "validation_steps": 0, "lr_warmup_steps": 0,
              "learning_rate": 1e-3, "benchmark_samples": 0, "r1_weight": 1e-2, **kw}
    return build_run_config({}, values)


def test_hinge_loss_identities():
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0  # confident and right
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 2.0


def test_student_grid_and_export_preset_agree(tiny_sd):
    from diffdistill.methods.adversarial import AdversarialDistillation
    from diffdistill.teachers import load_teacher

    assert lcm_grid(1000, 4).tolist() == [249, 499, 749, 999]
    teacher = load_teacher(tiny_sd)
    run = _run(tiny_sd, "x", steps=4)
    m = AdversarialDistillation(AdversarialConfig(), run)
    m.setup(teacher)
    sched = m.export_scheduler(teacher.scheduler)
    for n in (1, 2, 4):
        sched.set_timesteps(n)
        assert set(sched.timesteps.tolist()) <= set(m.grid.tolist())  # only trained timesteps are visited
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [999]


def test_pure_noise_at_the_top_student_timestep():
    """With pure_noise_at_top the student's input at s = T - 1 is the noise itself (as at sampling time);
    at the other timesteps, and without the option, it is the real latent noised to s."""
    from diffusers import DDPMScheduler

    from diffdistill.denoiser import NoiseSchedule
    from diffdistill.methods.adversarial import generator_forward

    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                          beta_end=0.012))
    seen = []

    class Spy:
        def __init__(self):
            self.schedule = schedule

        def x0_eps(self, x, t, cond):
            seen.append(x.clone())
            return x, x

    grid = lcm_grid(1000, 4)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    batch = {"latents": x0, "cond": torch.zeros(4, 7, 16), "noise": noise, "k": torch.tensor([3, 2, 1, 3])}
    generator_forward(Spy(), batch, grid, pure_noise_at_top=True)
    generator_forward(Spy(), batch, grid)
    s = grid[batch["k"]]
    noised = schedule.add_noise(x0, noise, s)
    top = s == 999
    assert torch.equal(seen[0][top], noise[top]) and torch.equal(seen[0][~top], noised[~top])
    assert torch.equal(seen[1], noised) and not torch.equal(seen[1][top], noise[top])
    # top_fraction 1: every sample takes the 1-step path
    _, s_all = generator_forward(Spy(), {"latents": x0, "cond": batch["cond"]}, grid, top_fraction=1.0)
    assert s_all.tolist() == [999] * 4


@pytest.mark.slow
def test_few_steps_train_heads_not_feature_network(tiny_sd, tmp_path):
    from diffdistill.data import build_dataset
    from diffdistill.methods import get_method
    from diffdistill.teachers import load_teacher
    from diffdistill.trainer import Trainer

    # with the optional regression term: a pool of 3 teacher pairs, 2 added per generator step
    run = _run(tiny_sd, tmp_path, regression_weight=0.5, regression_steps=2, regression_pairs=3,
               regression_batch_size=2)
    spec = get_method("add")
    method = spec.method_cls(spec.config_cls(**run.method_args), run)
    trainer = Trainer(run, method, load_teacher(tiny_sd), tmp_path, build_dataset(run.data, 32))
    trainer._setup()
    feat_before = copy.deepcopy(method.features.state_dict())
    disc_before = copy.deepcopy(method.disc.state_dict())
    student_before = copy.deepcopy(method.student.state_dict())
    logs = []
    real_loss = method.loss

    def spy(phase, batch, step):
        loss, lg = real_loss(phase, batch, step)
        logs.append((phase, lg))
        return loss, lg

    method.loss = spy
    trainer._setup = lambda: None  # already set up
    trainer.fit()
    phases = {p for p, _ in logs}
    assert phases == {"generator", "discriminator"}
    for _, lg in logs:
        assert all(torch.isfinite(torch.tensor(v)) for v in lg.values())
    assert any("r1" in lg for _, lg in logs) and any("g_adv" in lg for _, lg in logs)
    assert all(torch.equal(v, method.features.state_dict()[k]) for k, v in feat_before.items())
    assert any(not torch.equal(v, method.disc.state_dict()[k]) for k, v in disc_before.items())
    assert any(not torch.equal(v, method.student.state_dict()[k]) for k, v in student_before.items())
    header = (tmp_path / "logs.csv").read_text().splitlines()[0]
    assert "discriminator/r1" in header and "generator/g_adv" in header and "generator/g_distill" in header
    assert "generator/g_regression" in header and len(method.pool) == 3


@pytest.mark.slow
def test_add_end_to_end_with_prompt_only_data_and_plain_diffusers(tiny_sd, tmp_path):
    from diffusers import DiffusionPipeline

    from diffdistill.distill import run_distill

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 1\na handwritten digit 2\n")
    summary = run_distill(_run(tiny_sd, tmp_path / "run", dataset=str(prompts), synthetic_steps=2, max_train_steps=2))
    pipe = DiffusionPipeline.from_pretrained(summary["pipeline"])
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    for n in (1, 2, 4):
        calls: list[int] = []
        hook = pipe.unet.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(1))
        img = pipe("a handwritten digit 3", num_inference_steps=n, guidance_scale=1.0, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
        hook.remove()
        assert len(calls) == n and torch.isfinite(img).all()
        # Guidance is baked into the student: diffusers' default guidance_scale (7.5) gives the same images.
        default = pipe("a handwritten digit 3", num_inference_steps=n, output_type="pt",
                       generator=torch.Generator().manual_seed(0)).images
        torch.testing.assert_close(default, img, rtol=0, atol=0)
    assert json.loads((Path(summary["pipeline"]) / "diffdistill.json").read_text())["guidance_baked"] is True


@pytest.mark.slow
def test_image_feature_network_from_a_local_folder(tiny_sd, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from diffdistill.distill import run_distill

    folder = tmp_path / "tiny-dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(str(folder))
    summary = run_distill(_run(tiny_sd, tmp_path / "run", feature_network=str(folder), max_train_steps=1))
    assert summary["train_steps"] == 1


@pytest.mark.parametrize("kw,msg", [
    (dict(adv_weight=-1.0), "--adv-weight"),
    (dict(r1_weight=-0.1), "--r1-weight"),
    (dict(regression_weight=-1.0), "--regression-weight"),
    (dict(regression_pairs=0), "--regression-pairs"),
    (dict(top_fraction=1.5), "--top-fraction"),
    (dict(student_timesteps=0), "--student-timesteps"),
    (dict(disc_t_min=10, disc_t_max=5), "--disc-t-min"),
])
def test_bad_config(kw, msg):
    with pytest.raises(UserError, match=msg):
        AdversarialConfig(**kw)


def test_bad_feature_network_and_steps(tiny_sd, tmp_path):
    from diffdistill.distill import run_distill

    with pytest.raises(UserError, match="not 'teacher' and not a local model folder"):
        run_distill(_run(tiny_sd, tmp_path / "a", feature_network="dinov2-giant"))
    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    with pytest.raises(UserError, match="cannot load a model offline"):
        run_distill(_run(tiny_sd, tmp_path / "b", feature_network=str(notmodel)))
    with pytest.raises(UserError, match="--student-timesteps"):
        run_distill(_run(tiny_sd, tmp_path / "c", steps=8))
    assert not any((tmp_path / d).exists() for d in "abc")
