"""Adversarial diffusion distillation (Sauer et al. 2023, "ADD"; latent variant Sauer et al. 2024, "LADD").

The student (initialised from the teacher) turns a noised sample x_s, s in a small set of student
timesteps (e.g. 999, 749, 499, 249), into a clean estimate x^ in one UNet pass. Two losses train it:

* adversarial: a discriminator made of small trainable heads on a FROZEN feature network judges
  x^ against real data. Default feature network: the teacher UNet itself on re-noised latents, its
  down-block and mid-block features, conditioned on the pooled text embedding and the UNet's own
  noise-level embedding (LADD). Or an image-space network from a local folder (e.g. DINOv2) on decoded
  images. Hinge loss, R1 penalty on real data;
* distillation: x^ is re-noised at t, the teacher (classifier-free guided) denoises it, and x^ is
  pulled toward that with weight c(t) = alpha_t^2 (ADD's exponential weighting).

The generator output uses the consistency boundary scalings of ``denoiser.py``, so the exported
``LCMScheduler`` (original_inference_steps = number of student timesteps) applies exactly the
training map at each step and re-noises in between, as ADD samples; with guidance_scale <= 1 the
pipeline runs one UNet pass per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import RunConfig, opt
from ..data import has_images
from ..denoiser import TIMESTEP_SCALING, Denoiser, consistency_output, one_step_sample
from ..errors import require, require_at_least
from ..features import FeatureHead, ImageFeatureNetwork, TeacherFeatureNetwork, frozen
from ..solvers import lcm_grid
from .base import DistillMethod
from .guidance import TEACHER_GUIDANCE_RENAMED, teacher_guidance_option
from .regression import RegressionOptions, RegressionPool, RegressionPoolState, regression_loss


@dataclass
class AdversarialConfig(RegressionOptions):
    """Options of adversarial diffusion distillation (``--method add``)."""

    FORMER_OPTIONS: ClassVar[dict[str, str]] = TEACHER_GUIDANCE_RENAMED

    student_timesteps: int = opt(4, "number of student timesteps, evenly spaced: T/K*(k+1)-1 (4 -> 999, 749, 499, 249)")
    feature_network: str = opt("teacher", "'teacher' (LADD: the frozen teacher UNet's features on re-noised latents) "
                                          "or a local folder of an image model loadable with transformers AutoModel")
    adv_weight: float = opt(0.5, "weight of the generator's adversarial loss")
    distill_weight: float = opt(1.0, "weight of the score-distillation loss c(t) |x^ - teacher(x^_t)|^2")
    r1_weight: float = opt(1e-5, "weight of the R1 gradient penalty on real data")
    disc_learning_rate: float = opt(0.0, "discriminator learning rate (0: the student's)")
    teacher_guidance_scale: float = teacher_guidance_option()
    disc_t_min: int = opt(0, "smallest timestep real/fake latents are re-noised to for the discriminator")
    disc_t_max: int = opt(750, "largest timestep real/fake latents are re-noised to for the discriminator")
    pure_noise_at_top: bool = opt(False, "feed the student pure noise at its top timestep T-1, as sampling does, "
                                         "instead of a real latent noised to T-1")
    top_fraction: float = opt(0.0, "probability of drawing the top student timestep (the 1-step path) before the "
                                   "uniform draw over all of them (0: uniform)")
    synthetic_steps: int = opt(20, "DDIM steps of the teacher for synthetic 'real' data when the data has only prompts")

    def __post_init__(self):
        require(self.student_timesteps > 0, f"--student-timesteps must be > 0, got {self.student_timesteps}")
        require_at_least(self, 0, "adv_weight", "distill_weight", "r1_weight", "disc_learning_rate",
                         "teacher_guidance_scale")
        require(self.adv_weight + self.distill_weight > 0, "--adv-weight and --distill-weight cannot both be 0")
        require(0 <= self.disc_t_min <= self.disc_t_max, f"need 0 <= --disc-t-min <= --disc-t-max, got "
                                                         f"{self.disc_t_min}, {self.disc_t_max}")
        require(0 <= self.top_fraction <= 1, f"--top-fraction must be in [0, 1], got {self.top_fraction}")
        require(self.synthetic_steps > 0, f"--synthetic-steps must be > 0, got {self.synthetic_steps}")
        require(bool(self.feature_network), "--feature-network must not be empty")
        super().__post_init__()


class Discriminator(torch.nn.Module):
    """Trainable heads over a frozen feature network (the feature network is not a submodule: never trained)."""

    def __init__(self, channels: list[int], cond_dim: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(FeatureHead(c, cond_dim) for c in channels)

    def forward(self, feats: list[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
        return sum(head(f, cond) for head, f in zip(self.heads, feats)) / len(self.heads)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss E[relu(1 - D(real))] + E[relu(1 + D(fake))]."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_forward(student: Denoiser, batch: dict, grid: torch.Tensor, pure_noise_at_top: bool = False,
                      top_fraction: float = 0.0):
    """x^ = f(x_s, s) for s drawn from the student timesteps (the top one with extra probability
    ``top_fraction``, else uniformly): returns (x^, s).

    With ``pure_noise_at_top`` the input at s = T - 1 is the noise alone, as in sampling, instead of the
    data noised to s (whose small alpha still carries a trace of the real image)."""
    x0, cond = batch["latents"], batch["cond"]
    b = x0.shape[0]
    idx = batch.get("k")
    if idx is None:
        idx = torch.randint(0, grid.shape[0], (b,), device=x0.device)
        idx = torch.where(torch.rand(b, device=x0.device) < top_fraction, grid.shape[0] - 1, idx)
    s = grid.to(x0.device)[idx]
    noise = batch.get("noise")
    noise = torch.randn_like(x0) if noise is None else noise
    x_s = student.schedule.add_noise(x0, noise, s)
    if pure_noise_at_top:
        top = (s == student.schedule.num_train_timesteps - 1)[:, None, None, None]
        x_s = torch.where(top, noise.to(x_s.dtype), x_s)
    x0_pred, _ = student.x0_eps(x_s, s, cond)
    return consistency_output(x_s, x0_pred, s, TIMESTEP_SCALING), s


def distillation_loss(fake: torch.Tensor, teacher: Denoiser, batch: dict, cfg: AdversarialConfig):
    """c(t) |x^ - sg(teacher_cfg(x^_t))|^2 with c(t) = alpha_t^2 (ADD, sec. 3.2), t uniform."""
    b = fake.shape[0]
    t = torch.randint(1, teacher.schedule.num_train_timesteps, (b,), device=fake.device)
    with torch.no_grad():
        x_t = teacher.schedule.add_noise(fake.detach(), torch.randn_like(fake), t)
        target, _ = teacher.x0_eps(x_t, t, batch["cond"], batch["uncond"], guidance_scale=cfg.teacher_guidance_scale)
    alpha, _ = teacher.schedule.alpha_sigma(t, like=fake)
    return (alpha**2 * (fake.float() - target.float()) ** 2).mean()


def _disc_logits(features, disc, latents, t, text):
    feats, cond = features(latents, t, text)
    return disc(feats, cond)


def generator_loss(student: Denoiser, teacher: Denoiser, features, disc, batch: dict, grid, cfg: AdversarialConfig):
    """Generator phase: -D(renoised x^) * adv_weight + distill_weight * distillation loss
    (+ regression_weight * regression onto the teacher's ODE pairs ``reg_*`` when the batch has them)."""
    fake, _ = generator_forward(student, batch, grid, cfg.pure_noise_at_top, cfg.top_fraction)
    logs = {}
    loss = torch.zeros((), device=fake.device)
    if cfg.adv_weight > 0:
        t = torch.randint(cfg.disc_t_min, cfg.disc_t_max + 1, (fake.shape[0],), device=fake.device)
        fake_t = teacher.schedule.add_noise(fake, torch.randn_like(fake), t)
        adv = -_disc_logits(features, disc, fake_t, t, batch["cond"]).mean()
        loss = loss + cfg.adv_weight * adv
        logs["g_adv"] = adv.detach()
    if cfg.distill_weight > 0:
        dist = distillation_loss(fake, teacher, batch, cfg)
        loss = loss + cfg.distill_weight * dist
        logs["g_distill"] = dist.detach()
    if cfg.regression_weight > 0 and "reg_noise" in batch:
        # The one-step path from pure noise (t = T - 1), pulled to the teacher's ODE sample of that noise.
        reg = regression_loss(one_step_sample(student, batch["reg_noise"], batch["reg_cond"]), batch["reg_target"],
                              per_element=True)
        loss = loss + cfg.regression_weight * reg
        logs["g_regression"] = reg.detach()
    logs["loss"] = loss.detach()
    return loss, logs


def discriminator_loss(student: Denoiser, teacher: Denoiser, features, disc, batch: dict, grid, cfg: AdversarialConfig):
    """Discriminator phase: hinge loss on (real, detached fake) plus R1 on the real inputs."""
    with torch.no_grad():
        fake, _ = generator_forward(student, batch, grid, cfg.pure_noise_at_top, cfg.top_fraction)
    real = batch["latents"]
    b = real.shape[0]
    t = torch.randint(cfg.disc_t_min, cfg.disc_t_max + 1, (b,), device=real.device)
    real_t = teacher.schedule.add_noise(real, torch.randn_like(real), t).detach().requires_grad_(cfg.r1_weight > 0)
    fake_t = teacher.schedule.add_noise(fake, torch.randn_like(fake), t)
    real_logits = _disc_logits(features, disc, real_t, t, batch["cond"])
    fake_logits = _disc_logits(features, disc, fake_t, t, batch["cond"])
    d_loss = hinge_d_loss(real_logits, fake_logits)
    logs = {"d_hinge": d_loss.detach(), "d_real": real_logits.mean().detach(), "d_fake": fake_logits.mean().detach()}
    if cfg.r1_weight > 0:
        (grad,) = torch.autograd.grad(real_logits.sum(), real_t, create_graph=True)
        r1 = grad.pow(2).flatten(1).sum(1).mean()
        d_loss = d_loss + cfg.r1_weight * r1
        logs["r1"] = r1.detach()
    logs["loss"] = d_loss.detach()
    return d_loss, logs


class AdversarialDistillation(RegressionPoolState, DistillMethod):
    """``--method add``: ADD / LADD with a generator and a discriminator phase through the shared trainer."""

    name = "add"
    phases = ("discriminator", "generator")

    def __init__(self, cfg: AdversarialConfig, run: RunConfig):
        super().__init__(cfg, run)
        require(run.steps <= cfg.student_timesteps,
                f"--steps ({run.steps}) must not exceed --student-timesteps ({cfg.student_timesteps})")
        self.disc = None
        self.features = None

    def validate(self, teacher) -> None:
        t_train = teacher.schedule.num_train_timesteps
        require(self.cfg.student_timesteps <= t_train, f"--student-timesteps exceeds the teacher's {t_train} timesteps")
        require(self.cfg.disc_t_max < t_train, f"--disc-t-max must be < {t_train}, got {self.cfg.disc_t_max}")
        if self.cfg.feature_network != "teacher":  # load it once now: a bad path fails before any output is written
            ImageFeatureNetwork(self.cfg.feature_network, teacher.vae, teacher.vae.config.scaling_factor)

    def setup(self, teacher) -> None:
        self.teacher = teacher
        self.student = teacher.make_student(start=self.initial_unet(teacher))
        if self.cfg.feature_network == "teacher":
            # A separate frozen copy, so hooks never fire inside the teacher's distillation pass.
            import copy

            unet = copy.deepcopy(teacher.unet).float().requires_grad_(False).eval()
            # R1 differentiates the discriminator's gradient: attention that has a double backward
            self.features = TeacherFeatureNetwork(unet, teacher.denoiser(unet), double_backward=self.cfg.r1_weight > 0)
        else:
            self.features = ImageFeatureNetwork(self.cfg.feature_network, teacher.vae, teacher.vae.config.scaling_factor,
                                                double_backward=self.cfg.r1_weight > 0)
        self.disc = Discriminator(self.features.channels(), self.features.cond_dim(teacher.cond_dim)).to(teacher.unet.device)
        self.grid = lcm_grid(teacher.schedule.num_train_timesteps, self.cfg.student_timesteps)
        self.pool = RegressionPool(self.cfg.regression_pairs, self.cfg.regression_batch_size)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"generator": self.student, "discriminator": self.disc}

    def set_trainable_modules(self, modules) -> None:
        self.student, self.disc = modules["generator"], modules["discriminator"]

    def parameters(self, phase: str):
        module = self.student if phase == "generator" else self.disc
        return [p for p in module.parameters() if p.requires_grad]

    def learning_rate(self, phase: str, default: float) -> float:
        if phase == "discriminator" and self.cfg.disc_learning_rate > 0:
            return self.cfg.disc_learning_rate
        return default

    def state_modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student, "discriminator": self.disc}

    def _prepare(self, batch: dict) -> dict:
        teacher = self.teacher
        if has_images(batch):
            return teacher.encode_batch(batch, "adversarial distillation")
        # LADD's synthetic data: the teacher's own guided samples stand in for real images.
        device = teacher.unet.device
        cond, uncond = teacher.encode_prompts(batch["prompt"], device), teacher.encode_prompts([""], device)
        latents = teacher.sample(cond, uncond, self.cfg.teacher_guidance_scale, self.cfg.synthetic_steps)
        return {"latents": latents, "cond": cond, "uncond": uncond}

    def loss(self, phase: str, batch: dict, step: int):
        prepared = self._prepare(batch)
        student = self.teacher.denoiser(self.student)
        teacher = self.teacher.denoiser()
        if phase == "generator":
            if self.cfg.regression_weight > 0:
                c = self.cfg
                pairs = self.pool.top_up_and_sample(self.teacher, prepared["cond"], prepared["uncond"],
                                                    c.regression_target_guidance(), c.regression_steps,
                                                    c.regression_batch_size)
                prepared = {**prepared, **dict(zip(("reg_noise", "reg_cond", "reg_target"), pairs))}
            # The generator's loss must not put gradients on the heads: freeze them, and bypass the
            # DDP/FSDP wrapper (its reducer would wait for gradients that never come).
            heads = self.unwrap(self.disc)
            with frozen(heads):
                return generator_loss(student, teacher, self.features, heads, prepared, self.grid, self.cfg)
        return discriminator_loss(student, teacher, self.features, self.disc, prepared, self.grid, self.cfg)

    def max_sampling_steps(self) -> int:
        return self.cfg.student_timesteps

    def export_scheduler(self, teacher_scheduler):
        return self.teacher.consistency_scheduler(teacher_scheduler, self.cfg.student_timesteps, TIMESTEP_SCALING)

    def card_details(self) -> dict:
        c = self.cfg
        return {"student timesteps": ", ".join(str(int(t)) for t in self.grid.flip(0))
                + (" (pure noise at the top one, as in sampling)" if c.pure_noise_at_top else "")
                + (f"; the top one drawn with extra probability {c.top_fraction}" if c.top_fraction else ""),
                "feature network": "frozen teacher UNet (LADD)" if c.feature_network == "teacher" else c.feature_network,
                "losses": f"{c.adv_weight} x hinge adversarial + {c.distill_weight} x distillation "
                          f"(teacher guidance {c.teacher_guidance_scale}), R1 {c.r1_weight}"
                          + (f" + regression onto teacher ODE pairs ({c.regression_description()})"
                             if c.regression_weight else "")}
