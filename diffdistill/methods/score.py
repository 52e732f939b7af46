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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import RunConfig, opt
from ..denoiser import TIMESTEP_SCALING, Denoiser, one_step_sample
from ..errors import require, require_at_least
from ..features import FeatureHead, FeatureTaps, frozen, unet_stage_modules
from ..solvers import lcm_scheduler
from ..students import student_from_teacher
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
    """A one-step student: pure noise at t = T - 1 -> latents, f = c_skip z + c_out x0_hat (denoiser.py)."""

    def __init__(self, unet, schedule, prediction_type: str):
        super().__init__()
        self.unet = unet
        self.denoiser = Denoiser(unet, schedule, prediction_type)

    def forward(self, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return one_step_sample(self.denoiser, noise, cond)


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
    fake_updates: int = opt(1, "fake-score updates per generator update (DMD2 uses 5)")
    gan_weight: float = opt(0.0, "DMD2: weight of the generator's GAN loss, from a classifier head on the fake score "
                                 "network's mid-block features (0: off; needs images in the data)")
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
        require(run.steps == 1, f"--method {self.name} trains a one-step generator: --steps must be 1, got {run.steps}")
        self.phases = ("fake_score",) * cfg.fake_updates + ("generator",) if self.use_fake_score else ("generator",)
        self.fake = None

    def needs_images(self) -> str | None:
        return f"--method {self.name} with --gan-weight > 0" if self.use_fake_score and self.cfg.gan_weight > 0 else None

    def validate(self, teacher) -> None:
        t_train = teacher.schedule.num_train_timesteps
        require(self.cfg.t_max < t_train, f"--t-max must be < {t_train} (the teacher's timesteps), got {self.cfg.t_max}")

    def setup(self, teacher) -> None:
        self.teacher = teacher
        self.student = student_from_teacher(self.initial_unet(teacher))
        if self.use_fake_score:
            self.fake = student_from_teacher(teacher.unet)
        self.head = None
        if self.use_fake_score and self.cfg.gan_weight > 0:
            self.tap = FeatureTaps(unet_stage_modules(self.fake, ["mid"]), always=True)
            text_dim = teacher.pipe.text_encoder.config.hidden_size
            self.head = FeatureHead(self.fake.config.block_out_channels[-1], text_dim).to(teacher.unet.device)
        self.pool = RegressionPool(self.cfg.regression_pairs, self.cfg.regression_batch_size)

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
        return OneStepUNetGenerator(self.student, self.teacher.schedule, self.teacher.prediction_type)

    def loss(self, phase: str, batch: dict, step: int):
        device = self.teacher.unet.device
        cond, uncond = self.teacher.encode_prompts(batch["prompt"], device), self.teacher.encode_prompts([""], device)
        b = cond.shape[0]
        noise = torch.randn((b, *self.teacher.latent_shape), device=cond.device)
        progress = step / max(self.run.train.max_train_steps - 1, 1)
        t = sample_timesteps(self.cfg, b, progress, cond.device)
        teacher = self.teacher.denoiser()
        if phase == "fake_score":
            with torch.no_grad():
                samples = self._generator()(noise, cond)
            fake = Denoiser(self.fake, self.teacher.schedule, self.teacher.prediction_type)
            if self.head is None:
                loss = fake_score_loss(fake, samples, cond, t)
                return loss, {"loss": loss.detach()}
            return self._fake_score_and_head_loss(fake, samples, batch, cond, t)
        # Generator phase; the fake network is read without gradients and bypassing its DDP wrapper.
        reg = None
        if self.cfg.regression_weight > 0:
            reg = self.pool.top_up_and_sample(self.teacher, cond, uncond, self.cfg.teacher_guidance_scale,
                                              self.cfg.regression_steps, self.cfg.regression_batch_size)
            x_all = self._generator()(torch.cat([noise, reg[0]]), torch.cat([cond, reg[1]]))
            x, x_reg = x_all[:b], x_all[b:]
        else:
            x = self._generator()(noise, cond)
        gan = None
        if self.use_fake_score:
            fake_net = self.unwrap(self.fake)
            fake = Denoiser(fake_net, self.teacher.schedule, self.teacher.prediction_type)
            x_t = fake_x0 = None
            if self.head is not None:
                x_t = self.teacher.schedule.add_noise(x, torch.randn_like(x), t)
                fake_x0, gan = self._generator_gan_loss(fake, x_t, t, cond)
            grad = dmd_gradient(x, teacher, fake, cond, uncond, self.cfg, t, x_t=x_t, fake_x0=fake_x0)
        else:
            grad = sds_gradient(x, teacher, cond, uncond, self.cfg.teacher_guidance_scale, t, torch.randn_like(x),
                                self.cfg.weighting)
        loss = inject_gradient(x, grad) / b
        logs = {"grad_norm": grad.flatten(1).norm(dim=1).mean().detach()}
        if gan is not None:
            loss = loss + self.cfg.gan_weight * gan
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
        head = getattr(self.head, "module", self.head)
        with frozen(fake.unet, head):
            fake_x0, _ = fake.x0_eps(x_t, t, cond)
            gan = gan_generator_loss(head(self.tap.features["mid"], cond.mean(1)))
        return fake_x0, gan

    def max_sampling_steps(self) -> int:
        return 1

    def export_scheduler(self, teacher_scheduler):
        # One step from t = T - 1 with the same boundary scalings as OneStepUNetGenerator.
        return lcm_scheduler(teacher_scheduler, 1, TIMESTEP_SCALING, self.teacher.prediction_type)

    def card_details(self) -> dict:
        c = self.cfg
        d = {"generator": "one-step UNet student (t = T-1 -> x0), LCMScheduler preset with 1 step",
             "teacher guidance": c.teacher_guidance_scale, "timesteps": f"[{c.t_min}, {c.t_max}]"}
        if self.use_fake_score:
            d["update"] = f"distribution matching, fake score updated {c.fake_updates}x per generator step"
            if c.gan_weight:
                d["gan"] = (f"generator weight {c.gan_weight}, classifier head on the fake score network's mid-block "
                            f"features (weight {c.gan_disc_weight} in its update)")
        else:
            d["update"] = f"SDS, weighting {c.weighting}"
        if c.regression_weight:  # both methods train it (ScoreConfig)
            d["regression"] = (f"weight {c.regression_weight}, {c.regression_pairs} pairs of noise and the "
                               f"teacher's {c.regression_steps}-step DDIM sample")
        return d


class DistributionMatchingDistillation(ScoreDistillation):
    """``--method dmd``: the one-step student with a fake score network (DMD / DMD2)."""

    name = "dmd"
    use_fake_score = True

