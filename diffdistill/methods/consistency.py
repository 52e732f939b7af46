"""Latent consistency distillation (Song et al. 2023 "Consistency Models"; Luo et al. 2023 "Latent
Consistency Models"), full UNet or LoRA (Luo et al. 2023 "LCM-LoRA").

The student f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t) is trained to give the same answer at
two neighbouring points of one teacher ODE trajectory: x_t, and x_s obtained from x_t by one
classifier-free-guided teacher solver step over k = T / N timesteps ("skipping step" on an N-point
DDIM grid). The target f_target(x_s, s) comes from an EMA copy of the student (or the student
itself under stop-gradient when ``ema_decay = 0``, as in iCT / LCM-LoRA).

Guidance is distilled: the full student gets a guidance embedding (``time_cond_proj_dim``) fed
exactly as StableDiffusionPipeline feeds it (the embedding of ``guidance_scale - 1``), so a student
trained on teacher CFG at scale w samples with ``guidance_scale=w`` in one UNet pass per step.
With a single scale (``w_min == w_max``) the guidance is baked in instead, as for a LoRA student: the
student trains without a guidance embedding, and the export gives it an inert one (zero), so the
pipeline makes one pass per step and gives the same images whatever ``guidance_scale`` a caller passes
(diffusers' default 7.5 included).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..config import RunConfig, opt
from ..denoiser import TIMESTEP_SCALING, Denoiser, consistency_output
from ..errors import require
from ..solvers import SOLVERS, get_solver, lcm_grid
from ..students import GUIDANCE_EMBED_DIM
from .base import DistillMethod
from .guidance import GuidanceRangeOptions

LOSS_TYPES = ("l2", "huber")


@dataclass
class ConsistencyConfig(GuidanceRangeOptions):
    """Options of consistency distillation (``--method lcm``)."""

    num_ddim_timesteps: int = opt(50, "points N of the DDIM grid the student is trained on (skipping step T/N)")
    solver: str = opt("ddim", f"teacher ODE solver for the step t_(n+k) -> t_n: {', '.join(SOLVERS)}")
    ema_decay: float = opt(0.95, "EMA decay of the target network (0: the student itself, stop-gradient)")
    loss_type: str = opt("huber", f"distance between online and target outputs: {', '.join(LOSS_TYPES)}")
    huber_c: float = opt(0.001, "c of the pseudo-Huber loss sqrt(d^2 + c^2) - c")
    lora_rank: int | None = opt(None, "train a LoRA of this rank on the frozen teacher instead of the full UNet")
    lora_alpha: float = opt(0.0, "LoRA alpha (0: equal to the rank)")
    timestep_scaling: float = opt(TIMESTEP_SCALING, "timestep scaling of the boundary scalings c_skip, c_out")

    @property
    def fixed_guidance(self) -> bool:
        """One teacher guidance scale (w_min == w_max): guidance is baked into the student."""
        return self.w_min == self.w_max

    def __post_init__(self):
        require(self.num_ddim_timesteps > 0, f"--num-ddim-timesteps must be > 0, got {self.num_ddim_timesteps}")
        require(self.solver in SOLVERS, f"--solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        super().__post_init__()
        require(0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        require(self.loss_type in LOSS_TYPES, f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        require(self.huber_c > 0, f"--huber-c must be > 0, got {self.huber_c}")
        require(self.lora_rank is None or self.lora_rank > 0, f"--lora-rank must be > 0, got {self.lora_rank}")
        require(self.lora_alpha >= 0, f"--lora-alpha must be >= 0, got {self.lora_alpha}")
        require(self.timestep_scaling > 0, f"--timestep-scaling must be > 0, got {self.timestep_scaling}")
        require(self.lora_rank is None or self.ema_decay == 0,
                "--ema-decay must be 0 with --lora-rank (LCM-LoRA's target is the student itself)")


def consistency_distance(a: torch.Tensor, b: torch.Tensor, loss_type: str, huber_c: float) -> torch.Tensor:
    """Mean l2 or pseudo-Huber distance sqrt(|a-b|^2 + c^2) - c (Song & Dhariwal 2023, eq. 9), elementwise."""
    d2 = (a.float() - b.float()) ** 2
    if loss_type == "l2":
        return d2.mean()
    return (torch.sqrt(d2 + huber_c**2) - huber_c).mean()


def consistency_loss(student: Denoiser, teacher: Denoiser, batch: dict, cfg: ConsistencyConfig,
                     target: Denoiser | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Consistency-distillation loss on one batch.

    batch: ``latents`` (B, C, h, w) clean scaled latents, ``cond`` (B, L, D), ``uncond`` (1 or B, L, D);
    optional fixed draws ``n`` (B,) grid indices, ``noise`` like latents, ``w`` (B,) guidance scales.
    ``target`` defaults to the student itself (stop-gradient).
    """
    x0, cond, uncond = batch["latents"], batch["cond"], batch["uncond"]
    b, device = x0.shape[0], x0.device
    schedule = teacher.schedule
    k = schedule.num_train_timesteps // cfg.num_ddim_timesteps
    n = batch.get("n")
    if n is None:
        n = torch.randint(0, cfg.num_ddim_timesteps, (b,), device=device)
    t = lcm_grid(schedule.num_train_timesteps, cfg.num_ddim_timesteps).to(device)[n]  # (B,) (n + 1) k - 1
    s = (t - k).clamp(min=0)  # one skipping step earlier; t_0 - k is clamped to the boundary t = 0
    noise = batch.get("noise")
    if noise is None:
        noise = torch.randn_like(x0)
    w = batch.get("w")
    if w is None:
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, device=device)
    x_t = schedule.add_noise(x0, noise, t)

    x0_online, _ = student.x0_eps(x_t, t, cond, guidance_scale=w)
    f_online = consistency_output(x_t, x0_online, t, cfg.timestep_scaling)

    with torch.no_grad():
        def guided_teacher(x, tt):
            return teacher.x0_eps(x, tt, cond, uncond, guidance_scale=w)

        x_s = get_solver(cfg.solver, schedule)(guided_teacher, x_t, t, s, schedule)
        tgt = target if target is not None else student
        x0_target, _ = tgt.x0_eps(x_s, s, cond, guidance_scale=w)
        f_target = consistency_output(x_s, x0_target, s, cfg.timestep_scaling)

    loss = consistency_distance(f_online, f_target, cfg.loss_type, cfg.huber_c)
    logs = {"loss": loss.detach(), "t_mean": t.float().mean().detach(), "w_mean": w.float().mean().detach()}
    return loss, logs


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * online, parameter by parameter."""
    # Not diffusers' EMAModel (which the trainer uses for --student-ema-decay): EMAModel warms its decay up as
    # min(decay, n / (n + 9)) at its n-th update, so the target would follow the student more closely over the
    # first updates and every trained LCM would change. The consistency target keeps the constant decay of the
    # LCM recipe (--ema-decay, 0.95) from the first step.
    for pt, po in zip(target.parameters(), online.parameters()):
        pt.lerp_(po.detach().to(pt.dtype), 1.0 - decay)


class ConsistencyDistillation(DistillMethod):
    """``--method lcm``: latent consistency distillation with guidance embedding, full or LoRA."""

    name = "lcm"

    def __init__(self, cfg: ConsistencyConfig, run: RunConfig):
        super().__init__(cfg, run)
        self.target = None

    @property
    def lora(self) -> bool:
        return self.cfg.lora_rank is not None

    def default_guidance_scale(self) -> float:
        if self.lora:
            return 1.0  # guidance is baked into a LoRA student; scale 1 also skips the CFG pass
        return self.cfg.middle_guidance_scale()

    def needs_images(self) -> str | None:
        return "consistency distillation"

    def validate(self, teacher) -> None:
        t_train = teacher.schedule.num_train_timesteps
        require(self.cfg.num_ddim_timesteps <= t_train,
                f"--num-ddim-timesteps ({self.cfg.num_ddim_timesteps}) exceeds the teacher's {t_train} train timesteps")
        require(self.run.steps <= self.cfg.num_ddim_timesteps,
                f"--steps ({self.run.steps}) must not exceed --num-ddim-timesteps ({self.cfg.num_ddim_timesteps})")
        self.cfg.require_trainable_guidance(teacher, baked=self.lora)
        require(not (self.lora and self.run.student_from),
                "--lora-rank with --student-from is not supported yet (the LoRA would belong to the --student-from "
                "pipeline, not to the teacher it is exported for); train the full UNet")

    def setup(self, teacher) -> None:
        self.teacher = teacher
        if self.lora:
            from peft import LoraConfig

            self.student = teacher.make_student(start=self.initial_unet(teacher))
            self.student.requires_grad_(False)
            rank = self.cfg.lora_rank
            lora_cfg = LoraConfig(r=rank, lora_alpha=self.cfg.lora_alpha or rank, init_lora_weights="gaussian",
                                  target_modules=teacher.lora_targets)
            self.student.add_adapter(lora_cfg)
            for p in self.student.parameters():  # LoRA weights train in fp32 even under mixed precision
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            # One scale: baked in, no embedding to learn (export_pipeline adds an inert one).
            embed_dim = None if self.cfg.fixed_guidance else GUIDANCE_EMBED_DIM
            self.student = teacher.make_student(embed_dim, start=self.initial_unet(teacher))
            if self.cfg.ema_decay > 0:
                self.target = copy.deepcopy(self.student).requires_grad_(False).eval()

    def sharding_problem(self) -> str | None:
        if self.lora:
            return ("a LoRA student is not supported under FSDP (its trainable weights are small: use DDP, "
                    "--sharding none)")
        return None

    def loss(self, phase: str, batch: dict, step: int):
        student = self.teacher.denoiser(self.student)
        target = self.teacher.denoiser(self.target) if self.target is not None else None
        return consistency_loss(student, self.teacher.denoiser(), self.teacher.encode_batch(batch, self.needs_images()),
                                self.cfg, target)

    def after_step(self, step: int) -> None:
        if self.target is not None:
            ema_update(self.target, self.unwrap(self.student), self.cfg.ema_decay)

    def state_modules(self) -> dict[str, torch.nn.Module]:
        mods = {"student": self.student}
        if self.target is not None:
            mods["target"] = self.target
        return mods

    def export_unet(self, unwrap) -> torch.nn.Module:
        if self.lora:
            return self.fused_lora_unet(unwrap)
        # LCM exports the EMA target network (the smoothed consistency function), unless the trainer keeps
        # its own, usually slower, EMA of the student (--student-ema-decay): then the student holds it here.
        if self.target is not None and self.run.train.student_ema_decay == 0:
            return unwrap(self.target)
        return unwrap(self.student)

    def fused_lora_unet(self, unwrap) -> torch.nn.Module:
        """A plain UNet2DConditionModel equal to teacher + LoRA (merged by peft, no adapter layers left)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        merged = copy.deepcopy(unwrap(self.student))
        for module in merged.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        state = {k.replace(".base_layer.", "."): v for k, v in merged.state_dict().items() if "lora_" not in k}
        fused = self.teacher.make_student(start=self.initial_unet(self.teacher))
        fused.load_state_dict(state)
        return fused.eval().requires_grad_(False)

    def max_sampling_steps(self) -> int:
        return self.cfg.num_ddim_timesteps

    def export_scheduler(self, teacher_scheduler):
        return self.teacher.consistency_scheduler(teacher_scheduler, self.cfg.num_ddim_timesteps, self.cfg.timestep_scaling)

    def lora_state_dict(self, unwrap):
        if not self.lora:
            return None
        from peft.utils import get_peft_model_state_dict

        # PEFT's lora_A/lora_B names, which save_lora_weights prefixes with "unet." and load_lora_weights
        # reads back. (convert_state_dict_to_diffusers would rename only the attention layers to the old
        # lora.down/lora.up scheme, a mixed file whose attention LoRAs load_lora_weights silently drops.)
        return get_peft_model_state_dict(unwrap(self.student))

    def card_details(self) -> dict:
        c = self.cfg
        net = type(self.teacher.unet).__name__ if self.teacher is not None else "UNet"
        if self.lora:
            student = f"LoRA rank {c.lora_rank} on the teacher {net}"
        elif c.fixed_guidance:
            student = f"full {net}; guidance w = {c.w_min} baked in"
        else:
            student = f"full UNet with a {GUIDANCE_EMBED_DIM}-d guidance embedding (time_cond_proj_dim)"
        return {
            "student": student,
            "DDIM grid": f"{c.num_ddim_timesteps} points, teacher solver {c.solver}",
            "teacher guidance sampled": f"w = {c.w_min}" if c.fixed_guidance else f"w in [{c.w_min}, {c.w_max}]",
            "target network": f"EMA decay {c.ema_decay}" if c.ema_decay > 0 else "the student (stop-gradient)",
            "loss": c.loss_type + (f" (c = {c.huber_c})" if c.loss_type == "huber" else ""),
        }
