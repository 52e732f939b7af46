"""Score distillation: the injected SDS gradient equals its formula; DMD/SDS one-step students; `diffdistill sds`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tolerance import REORDER_REL, assert_close_at_scale

from diffdistill.cli import main
from diffdistill.config import build_run_config
from diffdistill.denoiser import Denoiser
from diffdistill.errors import UserError
from diffdistill.methods.regression import RegressionPool, regression_loss
from diffdistill.methods.score import (
    DMDConfig,
    LatentGenerator,
    SDSConfig,
    dmd_gradient,
    inject_gradient,
    sds_gradient,
    sds_weight,
)


def test_injected_gradient_equals_the_sds_formula(tiny_sd):
    """d/dx of the injected loss must be w(t) (eps_hat(x_t) - eps) and nothing flows into the teacher."""
    from diffdistill.teachers import load_teacher

    teacher = load_teacher(tiny_sd)
    den = teacher.denoiser()
    gen = LatentGenerator((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    cond = teacher.encode_prompts(["a handwritten digit 1"] * 3)
    uncond = teacher.encode_prompts([""])
    t, noise = torch.tensor([100, 500, 900]), torch.randn(3, 4, 8, 8)
    x = gen()
    g = sds_gradient(x, den, cond, uncond, 3.0, t, noise, "dreamfusion")
    inject_gradient(x, g).backward()
    # the formula, written out independently
    with torch.no_grad():
        x_t = teacher.schedule.add_noise(x.detach(), noise, t)
        eps_u = teacher.unet(x_t, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
        eps_c = teacher.unet(x_t, t, encoder_hidden_states=cond).sample
        eps_hat = eps_u + 3.0 * (eps_c - eps_u)
        acp = teacher.schedule.alphas_cumprod[t].float()[:, None, None, None]
        expected = (1 - acp) / acp.sqrt() * (eps_hat - noise)
    # The injected gradient comes from one batched (uncond, cond) pass, the formula from two separate passes:
    # they differ by float32 reduction order (tests/tolerance.py). Per unit of weight (the weight, up to ~5 at
    # t = 900, only scales both sides), the summed terms are eps_u and eps_c, which CFG at w = 3 weighs by
    # |1 - w| and |w|: that is the scale of the rounding.
    weight = (1 - acp) / acp.sqrt()
    scale = abs(1 - 3.0) * eps_u.abs().max() + 3.0 * eps_c.abs().max()
    assert_close_at_scale(gen.latents.grad / weight, expected / weight, scale)
    # ... far below what a wrong guidance scale would change (w = 3 against 2: eps_c - eps_u itself)
    assert (eps_c - eps_u).abs().max() > 100 * REORDER_REL * scale
    assert all(p.grad is None for p in teacher.unet.parameters())


def test_sds_weightings():
    from diffusers import DDPMScheduler

    from diffdistill.denoiser import NoiseSchedule

    sched = NoiseSchedule.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    x, t = torch.zeros(1, 1, 1, 1), torch.tensor([500])
    a, s = sched.alpha_sigma(t, like=x)
    assert sds_weight(sched, t, x, "uniform").item() == 1.0
    assert sds_weight(sched, t, x, "sigma2").item() == pytest.approx((s**2).item())


def test_dmd_gradient_vanishes_when_fake_equals_real(tiny_sd):
    """If the fake score equals the (unguided) teacher, generator and teacher distributions match: no update."""
    from diffdistill.teachers import load_teacher

    teacher = load_teacher(tiny_sd)
    den = teacher.denoiser()
    cond = teacher.encode_prompts(["a handwritten digit 2"] * 2)
    cfg = DMDConfig(teacher_guidance_scale=1.0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 700])
    x_t = teacher.schedule.add_noise(x, torch.randn_like(x), t)
    g = dmd_gradient(x, den, Denoiser(teacher.unet, teacher.schedule, "epsilon"), cond, teacher.encode_prompts([""]),
                     cfg, t, x_t=x_t)
    # Real (CFG at w = 1: one pass batched with the unconditional half) and fake (a pass alone) are the same UNet:
    # they differ by float32 reduction order only (tests/tolerance.py), in eps, which x0 = (x_t - sigma eps) / alpha
    # scales by sigma / alpha, and dmd_gradient divides by mean |x - x0|.
    with torch.no_grad():
        x0, eps = den.x0_eps(x_t, t, cond)
    alpha, sigma = teacher.schedule.alpha_sigma(t, like=x)
    norm = (x - x0).abs().flatten(1).mean(1)[:, None, None, None]
    scale = (sigma / alpha * eps.abs().amax(dim=(1, 2, 3), keepdim=True) / norm).max()
    assert_close_at_scale(g, torch.zeros_like(g), scale)
    other = Denoiser(torch.nn.Module(), teacher.schedule, "epsilon")
    other.unet = lambda x, t, encoder_hidden_states, timestep_cond=None: type("O", (), {"sample": torch.zeros_like(x)})()
    other.unet.config = type("C", (), {"time_cond_proj_dim": None})()
    assert dmd_gradient(torch.randn(2, 4, 8, 8), den, other, cond, teacher.encode_prompts([""]), cfg,
                        torch.tensor([300, 700])).abs().max().item() > 1e-3


def test_regression_pool_fills_once_and_keeps_pairs_together():
    """The pool takes pairs until it holds ``size`` (never more) and samples rows whole: a row's noise,
    text and target stay the pair they were stored as."""
    pool = RegressionPool(size=5, fill=2)
    assert len(pool) == 0 and not pool.full()
    for start in (0, 3, 6):  # 3 + 3 + 3 offered, 5 kept
        ids = torch.arange(start, start + 3, dtype=torch.float32)
        pool.add(ids[:, None, None, None].expand(3, 4, 8, 8), ids[:, None, None].expand(3, 7, 16),
                 -ids[:, None, None, None].expand(3, 4, 8, 8))
    assert len(pool) == 5 and pool.full()
    assert pool.noise[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    noise, cond, target = pool.sample(64)
    assert noise.shape == (64, 4, 8, 8) and cond.shape == (64, 7, 16)
    assert torch.equal(noise[:, 0, 0, 0], cond[:, 0, 0]) and torch.equal(noise, -target)
    assert set(noise[:, 0, 0, 0].tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_regression_loss_is_zero_at_the_target_and_its_gradient_is_the_residual():
    target = torch.randn(3, 4, 8, 8)
    assert regression_loss(target.clone(), target).item() == 0.0
    x = (target + torch.randn_like(target)).requires_grad_(True)
    regression_loss(x, target).backward()
    torch.testing.assert_close(x.grad, (x.detach() - target) / 3)
    # per element: the same loss divided by the size of one sample
    torch.testing.assert_close(regression_loss(x, target, per_element=True) * 4 * 8 * 8, regression_loss(x, target))


def test_generator_loss_weighs_the_gan_term_as_dmd2_does_whatever_the_latent_size():
    """DMD2's generator loss is 0.5 * mean((x - sg(x - grad))^2) + w * gan: the GAN weight is set against the
    distribution-matching loss averaged per latent element. Ours sums per sample; its gradient must be the
    paper's times one constant, so that the ratio of the two terms (what --gan-weight means) is the paper's."""
    from diffdistill.methods.score import generator_loss, inject_gradient

    torch.manual_seed(0)
    for shape in [(3, 4, 8, 8), (2, 16, 4, 4), (2, 4, 16, 16)]:
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape)
        w = torch.randn(x[0].numel())

        def gan_of(x, w=w):
            return torch.nn.functional.softplus(-(x.flatten(1) @ w)).mean()

        ours = torch.autograd.grad(generator_loss(x, grad, gan_of(x), 3e-3), x)[0]
        paper = torch.autograd.grad(0.5 * torch.nn.functional.mse_loss(x, (x - grad).detach()) + 3e-3 * gan_of(x), x)[0]
        # one constant between them: the elements per sample, C * h * w
        torch.testing.assert_close(ours, paper * x[0].numel(), rtol=1e-5, atol=1e-6)
        # without the GAN term: the injected gradient, summed per sample, averaged over the batch
        plain = torch.autograd.grad(generator_loss(x, grad), x)[0]
        torch.testing.assert_close(plain, grad / shape[0])
        torch.testing.assert_close(generator_loss(x, grad), inject_gradient(x, grad) / shape[0])


def test_gan_losses():
    from diffdistill.methods.score import gan_generator_loss, gan_head_loss

    big = torch.full((3,), 30.0)
    assert gan_head_loss(big, -big).item() < 1e-10  # confident and right
    assert gan_head_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item())
    assert gan_generator_loss(big).item() < 1e-10 and gan_generator_loss(-big).item() == pytest.approx(30.0)
    # at known logits: softplus(-1) + softplus(-1) for (real 1, fake -1); the generator's log(1 + e^-2) at 2
    sp = torch.log1p(torch.exp(torch.tensor(-1.0))).item()
    assert gan_head_loss(torch.tensor([1.0, 1.0]), torch.tensor([-1.0])).item() == pytest.approx(2 * sp)
    assert gan_generator_loss(torch.tensor([2.0])).item() == pytest.approx(torch.log1p(torch.exp(torch.tensor(-2.0))).item())


def _run(teacher, out, method, **kw):
    values = {"method": method, "teacher": teacher, "output": str(out), "steps": 1, "batch_size": 2,
              "max_train_steps": 2, "checkpointing_steps": 0, "validation_steps": 0, "lr_warmup_steps": 0,
              "benchmark_samples": 0, **kw}
    return build_run_config({}, values)


def _method_and_trainer(run, out):
    """The run's method and a Trainer around it on the tiny teacher and the digits data, as ``run_distill`` builds
    them (not yet set up)."""
    from diffdistill.data import build_dataset
    from diffdistill.methods import get_method
    from diffdistill.teachers import load_teacher
    from diffdistill.trainer import Trainer

    spec = get_method(run.method)
    method = spec.method_cls(spec.config_cls(**run.method_args), run)
    return method, Trainer(run, method, load_teacher(run.teacher), out, build_dataset(run.data, 32))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dmd", "sds"])
def test_one_step_students_train_and_export(method, tiny_sd, tmp_path):
    from diffusers import DiffusionPipeline

    from diffdistill.distill import run_distill

    extra = ({"fake_updates": 2, "regression_weight": 0.5, "regression_steps": 2, "regression_pairs": 3,
              "regression_batch_size": 2} if method == "dmd" else {})
    summary = run_distill(_run(tiny_sd, tmp_path / "run", method, **extra))
    header = (tmp_path / "run" / "logs.csv").read_text().splitlines()[0]
    if method == "dmd":
        assert "fake_score/loss" in header and "generator/regression" in header
    pipe = DiffusionPipeline.from_pretrained(summary["pipeline"])
    pipe.set_progress_bar_config(disable=True)
    calls: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    img = pipe("a handwritten digit 5", num_inference_steps=1, guidance_scale=1.0, output_type="pt").images
    assert len(calls) == 1 and torch.isfinite(img).all()


@pytest.mark.parametrize("cls,kw,msg", [
    (DMDConfig, dict(teacher_guidance_scale=-1.0), "--teacher-guidance-scale"),
    (SDSConfig, dict(teacher_guidance_scale=-1.0), "--teacher-guidance-scale"),
    (SDSConfig, dict(t_min=10, t_max=5), "--t-min"),
    (SDSConfig, dict(weighting="magic"), "--weighting"),
    (DMDConfig, dict(fake_updates=0), "--fake-updates"),
])
def test_bad_score_config(cls, kw, msg):
    with pytest.raises(UserError, match=msg):
        cls(**kw)


def test_dmd_and_sds_take_only_their_own_options():
    """DMD has no SDS weighting and SDS no fake score network: each config holds only what its method reads."""
    dmd, sds = ({f.name for f in dataclasses.fields(c)} for c in (DMDConfig, SDSConfig))
    assert {"fake_updates", "fake_learning_rate", "gan_weight", "gan_disc_weight"} <= dmd - sds
    assert sds - dmd == {"weighting"}
    for cls, other in ((SDSConfig, "fake_updates"), (DMDConfig, "weighting")):
        with pytest.raises(TypeError):
            cls(**{other: 2})


def test_score_methods_reject_bad_runs(tiny_sd, tmp_path):
    from diffdistill.distill import run_distill

    with pytest.raises(UserError, match="--steps must be 1"):  # dmd takes more: backward simulation
        run_distill(_run(tiny_sd, tmp_path / "a", "sds", steps=4))
    with pytest.raises(UserError, match="--t-max must be < 1000"):
        run_distill(_run(tiny_sd, tmp_path / "b", "dmd", t_max=1000))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(UserError, match=r"prompt file .*empty\.txt is empty"):  # not just the path's own "empty"
        run_distill(_run(tiny_sd, tmp_path / "c", "dmd", dataset=str(empty)))
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.slow
def test_sds_command_writes_result_and_progress(tiny_sd, tmp_path, capsys, monkeypatch):
    # The classifier's own reading is tested in test_eval.py; here a stand-in with a known verdict checks what the
    # command makes of it: the decoded images go in, the prompt's digit (7) is the label, accuracy is the share.
    seen = []

    def verdict(images):
        seen.append(images)
        return torch.nn.functional.one_hot(torch.tensor([7, 2]), 10).float()

    monkeypatch.setattr("diffdistill.eval.digits_classifier.load_digits_classifier", lambda *a, **k: verdict)
    out = tmp_path / "sds"
    assert main(["sds", "--teacher", tiny_sd, "--prompt", "a handwritten digit 7", "--output", str(out),
                 "--iters", "4", "--num-images", "2", "--snapshots", "2"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert (out / "result.png").is_file() and (out / "progress.png").is_file()
    assert result["predicted_digits"] == [7, 2] and result["accuracy"] == 0.5
    assert len(seen) == 1 and seen[0].shape == (2, 3, 32, 32)  # the two decoded results, once
    capsys.readouterr()
    assert main(["sds", "--teacher", tiny_sd, "--prompt", " ", "--output", str(tmp_path / "x")]) == 2
    assert "--prompt must not be empty" in capsys.readouterr().err
    assert main(["sds", "--teacher", tiny_sd, "--prompt", "a", "--output", str(tmp_path / "x"),
                 "--teacher-guidance-scale", "-2"]) == 2
    assert "--teacher-guidance-scale must be >= 0" in capsys.readouterr().err
    # the former name is refused with one line naming the new one (not silently ignored)
    assert main(["sds", "--teacher", tiny_sd, "--prompt", "a", "--output", str(tmp_path / "x"),
                 "--guidance-scale", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use --teacher-guidance-scale" in err
    assert not (tmp_path / "x").exists()


def test_regression_targets_are_sampled_at_their_own_guidance(tiny_sd, tmp_path):
    """--regression-guidance-scale: the pool's targets are the teacher's ODE samples of the stored noise at that
    scale, whatever the real score's guidance; -1 (the default) samples them at --teacher-guidance-scale."""
    reg = dict(regression_weight=1.0, regression_steps=2, regression_pairs=2, regression_batch_size=2)
    targets = {}
    for g in (-1.0, 3.0):
        run = _run(tiny_sd, tmp_path / str(g), "dmd", teacher_guidance_scale=1.0, regression_guidance_scale=g, **reg)
        method, trainer = _method_and_trainer(run, tmp_path / str(g))
        trainer._setup()
        method.loss("generator", next(trainer._batch_stream()), 0)
        pool, teacher = method.pool, method.teacher
        uncond = teacher.encode_prompts([""], pool.cond.device)
        expected = teacher.sample(pool.cond, uncond, 1.0 if g == -1 else g, 2, pool.noise)
        assert_close_at_scale(pool.target, expected, expected.abs().max())
        targets[g] = (pool.noise, pool.cond, pool.target)
    # the same noise and prompts (same seed), different targets: the scale reached the teacher
    assert torch.equal(targets[-1.0][0], targets[3.0][0]) and torch.equal(targets[-1.0][1], targets[3.0][1])
    assert (targets[-1.0][2] - targets[3.0][2]).abs().max() > 1e-3
    assert "at guidance 3.0" in method.card_details()["regression"]
    with pytest.raises(UserError, match="--regression-guidance-scale must be >= 0") as e:
        DMDConfig(regression_guidance_scale=-0.5)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_dmd2_gan_term_trains_the_head_and_leaves_the_critic_alone_in_the_generator_step(tiny_sd, tmp_path):
    """With --gan-weight the critic phase trains the fake network and the head on real and generated
    features; the generator phase back-propagates through them to the generator only."""
    import copy

    method, trainer = _method_and_trainer(_run(tiny_sd, tmp_path, "dmd", gan_weight=0.5, max_train_steps=2), tmp_path)
    trainer._setup()
    batch = next(trainer._batch_stream())
    before = {name: copy.deepcopy(m.state_dict()) for name, m in method.trainable_modules().items()}
    loss, logs = method.loss("generator", batch, 0)
    loss.backward()
    assert "gan" in logs and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    assert all(p.grad is None for p in [*method.fake.parameters(), *method.head.parameters()])
    method.student.zero_grad(set_to_none=True)
    loss, logs = method.loss("fake_score", batch, 0)
    loss.backward()
    assert {"denoise", "gan_head", "d_real", "d_fake"} <= set(logs)
    assert all(p.grad is not None for p in method.head.parameters())
    assert all(p.grad is None for p in method.student.parameters())
    method.fake.zero_grad(set_to_none=True)
    method.head.zero_grad(set_to_none=True)
    trainer._setup = lambda: None  # already set up
    trainer.fit()
    for name, module in method.trainable_modules().items():
        assert any(not torch.equal(v, module.state_dict()[k]) for k, v in before[name].items()), name
    header = (tmp_path / "logs.csv").read_text().splitlines()[0]
    assert "generator/gan" in header and "fake_score/gan_head" in header


def _ddpm_schedule():
    from diffusers import DDPMScheduler

    from diffdistill.denoiser import NoiseSchedule

    return NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))


def test_backward_simulation_with_an_exact_student_reproduces_the_forward_noised_input():
    """A student that returns the true x0 makes each simulated input the data noised to t_k with that step's noise;
    k = 0 is the pure noise itself, and only as many student calls are made as the largest k needs."""
    from diffdistill.methods.score import backward_simulate, student_timestep_grid

    schedule = _ddpm_schedule()
    grid = student_timestep_grid(1000, 4)
    assert grid.tolist() == [999, 749, 499, 249]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    renoise = [torch.randn(4, 2, 3, 3, generator=g) for _ in range(3)]
    seen = []

    def exact(x, t):
        seen.append(t.tolist())
        return x0

    k = torch.tensor([0, 1, 2, 3])
    out = backward_simulate(exact, noise, grid, k, schedule, renoise)
    torch.testing.assert_close(out[0], noise[0], rtol=0, atol=0)
    for i in (1, 2, 3):
        want = schedule.add_noise(x0, renoise[i - 1], torch.full((4,), int(grid[i])))
        torch.testing.assert_close(out[i], want[i])
    assert seen == [[999] * 4, [749] * 4, [499] * 4]
    seen.clear()
    backward_simulate(exact, noise, grid, torch.tensor([0, 1, 1, 0]), schedule, renoise)
    assert len(seen) == 1
    assert not backward_simulate(exact, noise, grid, torch.zeros(4, dtype=torch.long), schedule).equal(x0)


def test_backward_simulation_follows_the_exported_lcm_scheduler_step_for_step():
    """The inputs the student is trained on are the states the exported LCMScheduler preset passes through when it
    samples with the same model and the same noise: training and inference cannot drift apart."""
    from diffusers import DDPMScheduler

    from diffdistill.denoiser import TIMESTEP_SCALING, consistency_output, to_x0_eps
    from diffdistill.methods.score import backward_simulate, student_timestep_grid
    from diffdistill.solvers import lcm_scheduler

    schedule = _ddpm_schedule()
    n = 4
    sched = lcm_scheduler(DDPMScheduler(num_train_timesteps=1000), n, TIMESTEP_SCALING, "epsilon")
    sched.set_timesteps(n)
    grid = student_timestep_grid(1000, n)
    assert sched.timesteps.tolist() == grid.tolist()

    def eps_model(x, t):  # any deterministic "network": epsilon prediction
        return 0.3 * x + (t.float() / 1000)[:, None, None, None]

    def student(x, t):
        alpha, sigma = schedule.alpha_sigma(t, like=x)
        x0, _ = to_x0_eps(eps_model(x, t), x, alpha, sigma, "epsilon")
        return consistency_output(x, x0, t, TIMESTEP_SCALING).to(x.dtype)

    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    states, x = [noise], noise
    for t in sched.timesteps[:-1]:
        x = sched.step(eps_model(x, torch.full((2,), int(t))), t, x, generator=g).prev_sample
        states.append(x)
    g = torch.Generator().manual_seed(7)
    renoise = [torch.randn(noise.shape, generator=g, dtype=torch.float64) for _ in range(n - 1)]
    for k in range(n):
        out = backward_simulate(student, noise, grid, torch.full((2,), k), schedule, renoise)
        torch.testing.assert_close(out, states[k], rtol=1e-5, atol=1e-6)  # LCMScheduler's alphas are float32


def test_ttur_steps_the_fake_score_fake_updates_times_per_generator_update(tiny_sd, tmp_path):
    """Two time-scale: with --fake-updates 3 and 2 micro-batches, every optimiser step runs the fake score's phase
    3 times (each over both micro-batches) before the generator's once; each optimiser counts its own updates."""
    run = _run(tiny_sd, tmp_path, "dmd", fake_updates=3, max_train_steps=2, gradient_accumulation_steps=2,
               batch_size=1)
    method, trainer = _method_and_trainer(run, tmp_path)
    assert method.phases == ("fake_score",) * 3 + ("generator",)
    calls = []
    loss = method.loss
    method.loss = lambda phase, batch, step: (calls.append(phase), loss(phase, batch, step))[1]
    trainer.fit()
    per_step = ["fake_score"] * 6 + ["generator"] * 2
    assert calls == per_step * 2
    assert method.pool is None and method.extra_state() == {}  # no regression term: no pool at all
    for phase, updates in (("fake_score", 6), ("generator", 2)):
        states = trainer.optimizers[phase].state_dict()["state"].values()
        assert {int(s["step"]) for s in states} == {updates}, phase


@pytest.mark.parametrize("kw,msg", [
    (dict(fake_updates=0), "--fake-updates must be >= 1"),
    (dict(gan_weight=-1e-3), "--gan-weight must be >= 0"),
])
def test_dmd2_options_fail_in_one_line(kw, msg):
    with pytest.raises(UserError, match=msg) as e:
        DMDConfig(**kw)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_dmd2_four_step_student_trains_by_backward_simulation_and_exports_four_steps(tiny_sd, tmp_path):
    """The DMD2 recipe (no regression, TTUR, GAN head, --steps 4): the export is an LCMScheduler on the
    student's timesteps that samples in 4 (or 2) UNet calls, and the checkpoint holds no regression pool."""
    from diffusers import DiffusionPipeline

    from diffdistill.distill import run_distill

    summary = run_distill(_run(tiny_sd, tmp_path / "run", "dmd", steps=4, fake_updates=2,
                               gan_weight=3e-3, checkpointing_steps=2))
    assert not list((tmp_path / "run").rglob("method_state_*.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(summary["pipeline"])
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.scheduler.config.original_inference_steps == 4
    calls: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(int(a[1].reshape(-1)[0])))
    for steps, want in ((4, [999, 749, 499, 249]), (2, [999, 499])):
        calls.clear()
        img = pipe("a handwritten digit 5", num_inference_steps=steps, guidance_scale=1.0, output_type="pt").images
        assert calls == want and torch.isfinite(img).all()
