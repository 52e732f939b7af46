"""Score distillation: SDS for any differentiable generator (Poole et al. 2022, DreamFusion), and a one-step
student trained by distribution matching (Wang et al. 2023 "VSD"; Yin et al. 2024 "DMD", "DMD2").

SDS pushes a generator's output x = g(theta) along w(t) (eps_teacher(x_t, t, y; guidance) - eps) without
back-propagating through the teacher UNet. It is known to over-saturate and to collapse modes.

Distribution matching replaces the injected noise eps by a second, "fake" score network trained online
on the generator's own samples, so the update is the difference of two scores,
    grad = (x0_fake(x_t) - x0_real(x_t)) / mean|x - x0_real(x_t)|      (DMD, eq. 7-8 with its weighting)
which moves the generator's distribution toward the teacher's instead of every sample toward a mode.
The fake score network is trained with the usual denoising loss on detached generator samples, in its
own optimiser phase of the shared trainer (DMD2 updates it more often than the generator).

DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation") is a recipe of these options: no
regression term, ``fake_updates`` > 1 (two time-scale), the GAN head on the fake score network's bottleneck
(``gan_weight``), and for 2-4-step students (``--steps`` > 1) backward simulation (its sec. 4.5):
the student is trained at the timesteps of its own schedule, and its input at t_k is what the student itself
(no gradient) produces from pure noise through the earlier steps, exactly as the exported LCMScheduler samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import RunConfig, opt
from ..denoiser import TIMESTEP_SCALING, AffineSchedule, Denoiser, consistency_output, one_step_sample, unet_call
from ..errors import require, require_at_least
from ..features import FeatureHead, FeatureTaps, frozen, stage_channels, stage_modules, stage_pick
from ..solvers import lcm_grid
from .base import DistillMethod
from .guidance import TEACHER_GUIDANCE_RENAMED, teacher_guidance_option
from .regression import RegressionOptions, RegressionPool, RegressionPoolState, regression_loss

WEIGHTINGS = ("uniform", "sigma2", "dreamfusion")


class DifferentiableGenerator(torch.nn.Module):
    """Anything that maps its parameters (and optionally noise and text) to latents (B, C, h, w).

    Subclass it and implement ``forward(noise, cond) -> latents`` to plug your own renderer (a NeRF, a
    3D Gaussian rasteriser, ...) into ``diffdistill sds`` (``sds_gradient``); the output shape must match the teacher's latents.
    """

    def forward(self, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class LatentGenerator(DifferentiableGenerator):
    """The classic 2D SDS setting: the latents themselves are the parameters (one per image)."""

    def __init__(self, shape: tuple[int, ...], init_std: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        self.latents = torch.nn.Parameter(torch.randn(shape, generator=generator) * init_std)

    def forward(self, noise: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.latents


class OneStepUNetGenerator(DifferentiableGenerator):
    """A few-step UNet student f(x_t, t) = c_skip x_t + c_out x0_hat (denoiser.py), the map the exported
    LCMScheduler applies at each step; ``forward`` is its one-step use: pure noise at t = T - 1 -> latents."""

    def __init__(self, unet, schedule, prediction_type: str, call=unet_call):
        super().__init__()
        self.unet = unet
        self.denoiser = Denoiser(unet, schedule, prediction_type, call=call)

    def at(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """f(x_t, t): the student's clean sample from x_t at timesteps t (B,)."""
        x0, _ = self.denoiser.x0_eps(x_t, t, cond)
        return consistency_output(x_t, x0, t, TIMESTEP_SCALING)

    def forward(self, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return one_step_sample(self.denoiser, noise, cond)


def student_timestep_grid(num_train_timesteps: int, n: int) -> torch.Tensor:
    """The few-step student's timesteps, descending (4 of 1000: 999, 749, 499, 249): the grid LCMScheduler
    samples with ``original_inference_steps = n`` (``solvers.lcm_grid``); n = 1 is the one-step T - 1."""
    return lcm_grid(num_train_timesteps, n).flip(0)


def backward_simulate(student_fn, noise: torch.Tensor, timesteps: torch.Tensor, k: torch.Tensor,
                      schedule: AffineSchedule, renoise: list[torch.Tensor] | None = None) -> torch.Tensor:
    """DMD2's backward simulation (Yin et al. 2024, sec. 4.5): the student's input at ``timesteps[k]`` per sample.

    Starting from pure noise (B, C, h, w) at timesteps[0], each earlier step applies the student,
    x0 = student_fn(x, t) (no gradient), and re-noises it to the next timestep with fresh noise,
    x = alpha_s x0 + sigma_s eps (``NoiseSchedule.add_noise``), as LCMScheduler.step does at sampling. ``k`` (B,)
    holds each sample's step index (0: the noise itself); ``renoise[i]`` is the noise of step i (default: fresh
    Gaussian). Runs only as many student calls as the largest k needs."""
    b = noise.shape[0]
    k = torch.as_tensor(k, device=noise.device).reshape(b)
    x, out = noise, noise
    with torch.no_grad():
        for i in range(int(k.max()) if b else 0):
            t = torch.full((b,), int(timesteps[i]), device=noise.device)
            x0 = student_fn(x, t)
            eps = torch.randn_like(x0) if renoise is None else renoise[i]
            x = schedule.add_noise(x0, eps, torch.full((b,), int(timesteps[i + 1]), device=noise.device))
            out = torch.where((k == i + 1)[:, None, None, None], x, out)
    return out


def sds_weight(schedule, t: torch.Tensor, like: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(t): uniform 1, sigma_t^2, or DreamFusion's sigma_t^2 / alpha_t (its eq. 3 in VP form)."""
    alpha, sigma = schedule.alpha_sigma(t, like=like)
    if weighting == "uniform":
        return torch.ones_like(alpha)
    if weighting == "sigma2":
        return sigma**2
    if weighting == "dreamfusion":
        return sigma**2 / alpha
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")


def inject_gradient(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient w.r.t. x is exactly ``grad`` (summed over the batch): 0.5|x - sg(x - grad)|^2."""
    target = (x - grad).detach()
    return 0.5 * ((x.float() - target.float()) ** 2).sum()


def sds_gradient(x: torch.Tensor, teacher: Denoiser, cond, uncond, guidance_scale: float, t: torch.Tensor,
                 noise: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(t) (eps_teacher(x_t, t, y; CFG) - eps), computed without a graph through the teacher."""
    with torch.no_grad():
        x_t = teacher.schedule.add_noise(x.detach(), noise, t)
        _, eps_hat = teacher.x0_eps(x_t, t, cond, uncond, guidance_scale=guidance_scale)
        return sds_weight(teacher.schedule, t, x, weighting) * (eps_hat - noise)


@dataclass
class ScoreConfig(RegressionOptions):
    """Options both one-step score methods take (``--method dmd``: ``DMDConfig``, ``--method sds``: ``SDSConfig``)."""

    FORMER_OPTIONS: ClassVar[dict[str, str]] = TEACHER_GUIDANCE_RENAMED

    teacher_guidance_scale: float = teacher_guidance_option()
    t_min: int = opt(20, "smallest timestep sampled for the score")
    t_max: int = opt(980, "largest timestep sampled for the score")
    t_max_end: int = opt(-1, "anneal t_max linearly to this value over the run (-1: no annealing)")

    def __post_init__(self):
        require_at_least(self, 0, "teacher_guidance_scale")
        check_timestep_range(self.t_min, self.t_max, self.t_max_end)
        super().__post_init__()


@dataclass
class DMDConfig(ScoreConfig):
    """Options of distribution matching (``--method dmd``): the fake score network and DMD2's GAN head."""

    fake_learning_rate: float = opt(0.0, "learning rate of the fake score network (0: the generator's)")
    fake_updates: int = opt(1, "fake-score updates per generator update (two time-scale; DMD2 uses 5)")
    gan_weight: float = opt(0.0, "DMD2: weight of the generator's GAN loss (a classifier head on the fake score "
                                 "network's mid-block features) against the distribution-matching loss averaged per "
                                 "latent element, as in DMD2 (3e-3 ImageNet, 5e-3 SDXL; 0: off; needs images in the data)")
    gan_disc_weight: float = opt(0.01, "DMD2: weight of the head's real/fake classification loss in the fake score "
                                       "network's update")

    def __post_init__(self):
        require_at_least(self, 0, "fake_learning_rate", "gan_weight", "gan_disc_weight")
        require_at_least(self, 1, "fake_updates")
        super().__post_init__()


@dataclass
class SDSConfig(ScoreConfig):
    """Options of plain score distillation sampling (``--method sds``)."""

    weighting: str = opt("dreamfusion", f"SDS weighting w(t): {', '.join(WEIGHTINGS)}")

    def __post_init__(self):
        require(self.weighting in WEIGHTINGS, f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        super().__post_init__()


def sample_timesteps(cfg, b: int, progress: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform timesteps in [t_min, t_max(progress)], t_max annealed linearly toward t_max_end (-1: fixed).

    ``cfg`` is any config with ``t_min``, ``t_max``, ``t_max_end`` (ScoreConfig's, SDSOptimizeConfig)."""
    t_max = cfg.t_max if cfg.t_max_end < 0 else round(cfg.t_max + (cfg.t_max_end - cfg.t_max) * progress)
    return torch.randint(cfg.t_min, t_max + 1, (b,), generator=generator).to(device)


def check_timestep_range(t_min: int, t_max: int, t_max_end: int) -> None:
    """0 <= t_min <= t_max, and t_max_end either -1 or inside [t_min, t_max] (one-line UserErrors)."""
    require(0 <= t_min <= t_max, f"need 0 <= --t-min <= --t-max, got {t_min}, {t_max}")
    require(t_max_end == -1 or t_min <= t_max_end <= t_max,
            f"--t-max-end must be -1 or in [--t-min, --t-max], got {t_max_end}")


def dmd_gradient(x: torch.Tensor, teacher: Denoiser, fake: Denoiser, cond, uncond, cfg: ScoreConfig,
                 t: torch.Tensor, x_t: torch.Tensor | None = None, fake_x0: torch.Tensor | None = None) -> torch.Tensor:
    """DMD's distribution-matching gradient (x0_fake - x0_real) / mean|x - x0_real|, per sample.

    ``x_t`` (x noised to t) and ``fake_x0`` (the fake network's x0 there) may be given when the caller
    already ran the fake network on them (the GAN term does); they are used detached."""
    with torch.no_grad():
        x_t = teacher.schedule.add_noise(x.detach(), torch.randn_like(x), t) if x_t is None else x_t.detach()
        real, _ = teacher.x0_eps(x_t, t, cond, uncond, guidance_scale=cfg.teacher_guidance_scale)
        fake_x0 = fake.x0_eps(x_t, t, cond)[0] if fake_x0 is None else fake_x0.detach()
        norm = (x.detach() - real).abs().flatten(1).mean(1).clamp(min=1e-5)[:, None, None, None]
        return (fake_x0 - real) / norm


def fake_score_loss(fake: Denoiser, samples: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Denoising loss of the fake score network on (detached) generator samples, in epsilon space."""
    noise = torch.randn_like(samples)
    x_t = fake.schedule.add_noise(samples.detach(), noise, t)
    _, eps = fake.x0_eps(x_t, t, cond)
    return ((eps.float() - noise.float()) ** 2).mean()


def generator_loss(x: torch.Tensor, grad: torch.Tensor, gan: torch.Tensor | None = None,
                   gan_weight: float = 0.0) -> torch.Tensor:
    """The generator's distribution-matching loss with ``grad`` injected (summed per sample, averaged over the
    batch: the scale DMD's regression weight is set against), plus DMD2's GAN term at ``gan_weight``.

    DMD2 weighs its GAN loss against the distribution-matching loss averaged over every latent element
    (3e-3 on ImageNet, 5e-3 on SDXL); the per-sample sum here is that mean times the elements per sample, so
    the GAN term is scaled by the same count: the gradient is the paper's times a constant (which Adam does
    not see) and ``gan_weight`` means what the paper's weight means, whatever the latent size."""
    loss = inject_gradient(x, grad) / x.shape[0]
    if gan is not None:
        loss = loss + gan_weight * x[0].numel() * gan
    return loss


def gan_head_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the classifier: softplus(-D(real)) + softplus(D(fake)) (DMD2)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's side of it: softplus(-D(G(z)))."""
    return F.softplus(-fake_logits).mean()


class ScoreDistillation(RegressionPoolState, DistillMethod):
    """``--method sds`` / ``--method dmd``: a one-step UNet student trained by SDS or distribution matching."""

    name = "sds"
    use_fake_score = False

    def __init__(self, cfg: SDSConfig | DMDConfig, run: RunConfig):
        super().__init__(cfg, run)
        if not self.use_fake_score:
            require(run.steps == 1, f"--method {self.name} trains a one-step generator: --steps must be 1, got {run.steps}")
        self.phases = ("fake_score",) * cfg.fake_updates + ("generator",) if self.use_fake_score else ("generator",)
        self.fake = None

    def needs_images(self) -> str | None:
        return f"--method {self.name} with --gan-weight > 0" if self.use_fake_score and self.cfg.gan_weight > 0 else None

    def validate(self, teacher) -> None:
        t_train = teacher.schedule.num_train_timesteps
        require(self.cfg.t_max < t_train, f"--t-max must be < {t_train} (the teacher's timesteps), got {self.cfg.t_max}")
        require(self.run.steps <= t_train, f"--steps must be <= {t_train} (the teacher's timesteps), got {self.run.steps}")

    def setup(self, teacher) -> None:
        self.teacher = teacher
        self.student = teacher.make_student(start=self.initial_unet(teacher))
        if self.use_fake_score:
            self.fake = teacher.make_student()
        self.head = None
        if self.use_fake_score and self.cfg.gan_weight > 0:
            self.tap = FeatureTaps(stage_modules(self.fake, ["mid"]), always=True, pick=stage_pick(self.fake))
            self.head = FeatureHead(stage_channels(self.fake, ["mid"])[0], teacher.cond_dim).to(teacher.unet.device)
        self.grid = student_timestep_grid(teacher.schedule.num_train_timesteps, self.run.steps).to(
            teacher.unet.device)
        # no regression term, no pool (DMD2): nothing is computed, held or checkpointed for it
        self.pool = (RegressionPool(self.cfg.regression_pairs, self.cfg.regression_batch_size)
                     if self.cfg.regression_weight > 0 else None)

    def trainable_modules(self):
        mods = {"generator": self.student}
        if self.fake is not None:
            mods["fake_score"] = self.fake
        if self.head is not None:
            mods["gan_head"] = self.head
        return mods

    def set_trainable_modules(self, modules) -> None:
        self.student = modules["generator"]
        self.fake = modules.get("fake_score")
        self.head = modules.get("gan_head")

    def parameters(self, phase: str):
        if phase == "generator":
            return [p for p in self.student.parameters() if p.requires_grad]
        # the fake score network and the GAN head (when on) share the critic's optimiser
        modules = [self.fake] + ([self.head] if self.head is not None else [])
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def learning_rate(self, phase: str, default: float) -> float:
        if phase == "fake_score" and self.cfg.fake_learning_rate > 0:
            return self.cfg.fake_learning_rate
        return default

    def state_modules(self):
        mods = {"student": self.student}
        if self.fake is not None:
            mods["fake_score"] = self.fake
        if self.head is not None:
            mods["gan_head"] = self.head
        return mods

    def _generator(self) -> OneStepUNetGenerator:
        return OneStepUNetGenerator(self.student, self.teacher.schedule, self.teacher.prediction_type,
                                    call=self.teacher.net_call)

    def _student_inputs(self, noise: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{t_k}, t_k): each sample's input and timestep, k uniform over the student's timesteps, the input
        by backward simulation from ``noise`` (one step: the noise at T - 1)."""
        n = self.grid.shape[0]  # one step: no draw, so a one-step run's random stream is as before
        k = (torch.randint(0, n, (noise.shape[0],), device=noise.device) if n > 1
             else torch.zeros(noise.shape[0], dtype=torch.long, device=noise.device))
        gen = self._generator()
        x_in = backward_simulate(lambda x, t: gen.at(x, t, cond), noise, self.grid, k, self.teacher.schedule)
        return x_in, self.grid[k]

    def loss(self, phase: str, batch: dict, step: int):
        device = self.teacher.unet.device
        cond, uncond = self.teacher.encode_prompts(batch["prompt"], device), self.teacher.encode_prompts([""], device)
        b = cond.shape[0]
        noise = torch.randn((b, *self.teacher.latent_shape), device=cond.device)
        progress = step / max(self.run.train.max_train_steps - 1, 1)
        t = sample_timesteps(self.cfg, b, progress, cond.device)
        teacher = self.teacher.denoiser()
        x_in, t_in = self._student_inputs(noise, cond)
        if phase == "fake_score":
            with torch.no_grad():
                samples = self._generator().at(x_in, t_in, cond)
            fake = self.teacher.denoiser(self.fake)
            if self.head is None:
                loss = fake_score_loss(fake, samples, cond, t)
                return loss, {"loss": loss.detach()}
            return self._fake_score_and_head_loss(fake, samples, batch, cond, t)
        # Generator phase; the fake network is read without gradients and bypassing its DDP wrapper.
        reg = None
        if self.cfg.regression_weight > 0:
            reg = self.pool.top_up_and_sample(self.teacher, cond, uncond, self.cfg.regression_target_guidance(),
                                              self.cfg.regression_steps, self.cfg.regression_batch_size)
            # the pairs start from pure noise: the student's first (top) timestep
            top = self.grid[:1].expand(reg[0].shape[0])
            x_all = self._generator().at(torch.cat([x_in, reg[0]]), torch.cat([t_in, top]), torch.cat([cond, reg[1]]))
            x, x_reg = x_all[:b], x_all[b:]
        else:
            x = self._generator().at(x_in, t_in, cond)
        gan = None
        if self.use_fake_score:
            fake_net = self.unwrap(self.fake)
            fake = self.teacher.denoiser(fake_net)
            x_t = fake_x0 = None
            if self.head is not None:
                x_t = self.teacher.schedule.add_noise(x, torch.randn_like(x), t)
                fake_x0, gan = self._generator_gan_loss(fake, x_t, t, cond)
            grad = dmd_gradient(x, teacher, fake, cond, uncond, self.cfg, t, x_t=x_t, fake_x0=fake_x0)
        else:
            grad = sds_gradient(x, teacher, cond, uncond, self.cfg.teacher_guidance_scale, t, torch.randn_like(x),
                                self.cfg.weighting)
        loss = generator_loss(x, grad, gan, self.cfg.gan_weight if gan is not None else 0.0)  # SDS has no GAN term
        logs = {"grad_norm": grad.flatten(1).norm(dim=1).mean().detach()}
        if gan is not None:
            logs["gan"] = gan.detach()
        if reg is not None:
            r = regression_loss(x_reg, reg[2])
            loss = loss + self.cfg.regression_weight * r
            logs["regression"] = r.detach()
            logs["regression_pairs"] = float(len(self.pool))
        logs["loss"] = loss.detach()
        return loss, logs

    def _fake_score_and_head_loss(self, fake: Denoiser, samples: torch.Tensor, batch: dict, cond, t):
        """DMD2's critic update: the fake network's denoising loss on generator samples plus the head's
        real/fake classification of its mid-block features, in one batched pass (one DDP forward)."""
        real = self.teacher.encode_batch(batch, self.needs_images())["latents"]
        b = samples.shape[0]
        noise = torch.randn_like(samples)
        x_t = torch.cat([fake.schedule.add_noise(samples.detach(), noise, t),
                         fake.schedule.add_noise(real, torch.randn_like(real), t)])
        _, eps = fake.x0_eps(x_t, torch.cat([t, t]), torch.cat([cond, cond]))
        denoise = ((eps[:b].float() - noise.float()) ** 2).mean()
        logits = self.head(self.tap.features["mid"], torch.cat([cond, cond]).mean(1))
        head = gan_head_loss(logits[b:], logits[:b])
        loss = denoise + self.cfg.gan_disc_weight * head
        return loss, {"loss": loss.detach(), "denoise": denoise.detach(), "gan_head": head.detach(),
                      "d_real": logits[b:].mean().detach(), "d_fake": logits[:b].mean().detach()}

    def _generator_gan_loss(self, fake: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor):
        """(fake network's x0 at x_t, generator GAN loss): the graph runs through the frozen critic to x_t.

        The critic's parameters are switched off while its graph is built, so the generator's backward
        leaves no gradients on them (and the DDP wrappers are bypassed)."""
        head = self.unwrap(self.head)
        with frozen(fake.unet, head):
            fake_x0, _ = fake.x0_eps(x_t, t, cond)
            gan = gan_generator_loss(head(self.tap.features["mid"], cond.mean(1)))
        return fake_x0, gan

    def max_sampling_steps(self) -> int:
        return self.run.steps

    def export_scheduler(self, teacher_scheduler):
        # The student's timesteps (one: t = T - 1) with the same boundary scalings as OneStepUNetGenerator.at;
        # between steps LCMScheduler (SD) and FlowMatchEuler with stochastic_sampling (SD3, Flux) re-noise with
        # fresh noise, as backward_simulate does in training.
        return self.teacher.consistency_scheduler(teacher_scheduler, self.run.steps, TIMESTEP_SCALING)

    def card_details(self) -> dict:
        c = self.cfg
        n = self.run.steps
        generator = ("one-step UNet student (t = T-1 -> x0), LCMScheduler preset with 1 step" if n == 1 else
                     f"{n}-step UNet student at timesteps {', '.join(str(int(t)) for t in self.grid)}, trained on "
                     f"its own samples (DMD2 backward simulation), LCMScheduler preset with up to {n} steps")
        d = {"generator": generator, "teacher guidance": c.teacher_guidance_scale, "timesteps": f"[{c.t_min}, {c.t_max}]"}
        if self.use_fake_score:
            d["update"] = f"distribution matching, fake score updated {c.fake_updates}x per generator step"
            if c.gan_weight:
                d["gan"] = (f"generator weight {c.gan_weight} (against the distribution-matching loss per latent "
                            f"element, as in DMD2), classifier head on the fake score network's mid-block "
                            f"features (weight {c.gan_disc_weight} in its update)")
        else:
            d["update"] = f"SDS, weighting {c.weighting}"
        if c.regression_weight:  # both methods train it (ScoreConfig)
            d["regression"] = c.regression_description()
        return d


class DistributionMatchingDistillation(ScoreDistillation):
    """``--method dmd``: the one-step student with a fake score network (DMD / DMD2)."""

    name = "dmd"
    use_fake_score = True

    def sharding_problem(self) -> str | None:
        if self.cfg.gan_weight > 0:  # its generator loss switches the critic's requires_grad mid-step (``frozen``)
            return "DMD2's GAN head (--gan-weight > 0) is not supported under FSDP yet; use DDP (--sharding none)"
        return None

