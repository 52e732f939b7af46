"""Progressive distillation (Salimans & Ho 2022) with guidance distillation (Meng et al. 2023).

Stage 0 (optional, ``guidance_iters > 0``): a student with a guidance embedding learns, in one UNet
pass, the teacher's classifier-free-guided x0 prediction for w sampled in [w_min, w_max].
Stages 1..k: the student starts from the previous stage's model and learns to match TWO DDIM steps of
its (frozen) previous self with ONE of its own, on grids N -> N/2 -> ... -> ``--steps``.

Grids are diffusers' ``trailing`` spacing, t_j = round(T - j T / N) - 1, ending past t = 0 at the
clean sample (alpha = 1), so a student step from t_j to t_(j+1) is exactly one step of the exported
``EulerDiscreteScheduler(timestep_spacing="trailing")``: between two grid points the Euler step on
the VE ODE is algebraically the DDIM step (see solvers.euler_step), and unlike DDIMScheduler it steps
to the true next grid point even when N does not divide T (N = 16, 32, 64 with T = 1000).

Student parameterisation: the student keeps the teacher's prediction type (epsilon for SD 1.5 and
digits-SD) because it starts from the teacher's weights, and a v- or x0-parameterised copy of an
epsilon network would start out wrong. The regression target is computed in x0 space (the paper's
eq. 8) and weighted by the truncated SNR max(alpha^2 / sigma^2, 1) (its eq. 9), which keeps the
high-noise end, where 1/alpha amplifies epsilon errors, well conditioned. SD's schedule has
alpha_T = 0.068 > 0, so x0 = (z - sigma eps) / alpha is defined everywhere.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..config import RunConfig, opt
from ..denoiser import Denoiser, NoiseSchedule
from ..errors import UserError, require
from ..solvers import ddim_step, trailing_grid
from ..students import GUIDANCE_EMBED_DIM
from .base import DistillMethod
from .guidance import GuidanceRangeOptions


@dataclass
class ProgressiveConfig(GuidanceRangeOptions):
    """Options of progressive distillation (``--method progressive``)."""

    start_steps: int = opt(64, "sampling steps of the teacher grid the first halving stage starts from")
    iters_per_stage: int = opt(300, "optimiser steps of each halving stage")
    guidance_iters: int = opt(300, "optimiser steps of stage 0, guidance distillation (0: skip it)")
    min_weight: float = opt(1.0, "truncated-SNR weighting: weight max(SNR, min_weight) of the x0 loss")

    def __post_init__(self):
        require(self.start_steps >= 2, f"--start-steps must be >= 2, got {self.start_steps}")
        require(self.iters_per_stage > 0, f"--iters-per-stage must be > 0, got {self.iters_per_stage}")
        require(self.guidance_iters >= 0, f"--guidance-iters must be >= 0, got {self.guidance_iters}")
        super().__post_init__()
        require(self.min_weight > 0, f"--min-weight must be > 0, got {self.min_weight}")


@dataclass
class Stage:
    """One stage of the schedule: guidance distillation or one halving N_teacher -> N_student."""

    index: int
    kind: str  # "guidance" | "halve"
    student_steps: int
    first_iter: int
    iters: int

    @property
    def name(self) -> str:
        return f"{self.student_steps}_steps"


def halvings(start: int) -> list[int]:
    """Every step count reachable by halving ``start``: 64 -> [32, 16, 8, 4, 2, 1]."""
    out, n = [], start
    while n % 2 == 0:
        n //= 2
        out.append(n)
    return out


def halving_plan(start: int, target: int) -> list[int]:
    """Student step counts start/2, start/4, ..., target; a UserError naming the nearest valid targets otherwise."""
    require(target < start, f"--steps ({target}) must be smaller than --start-steps ({start}): "
                            "progressive distillation needs at least one halving stage")
    valid = halvings(start)
    if target not in valid:
        nearest = sorted(sorted(valid, key=lambda v: (abs(v - target), v))[:2])
        raise UserError(f"--steps {target} is not reachable by halving from --start-steps {start}; "
                        f"nearest valid values: {', '.join(map(str, nearest)) or 'none (start is odd)'}")
    return valid[: valid.index(target) + 1]


def one_step_target(z_t: torch.Tensor, z_s: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                    schedule: NoiseSchedule) -> torch.Tensor:
    """The x0 whose single DDIM step from z_t at t lands on z_s at s (Salimans & Ho 2022, eq. 8)."""
    a_t, s_t = schedule.alpha_sigma(t, like=z_t)
    a_s, s_s = schedule.alpha_sigma(s, like=z_t)
    ratio = s_s / s_t
    return (z_s - ratio * z_t) / (a_s - ratio * a_t)


def x0_weight(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor, min_weight: float) -> torch.Tensor:
    """Truncated-SNR weight max(alpha_t^2 / sigma_t^2, min_weight) (Salimans & Ho 2022, eq. 9)."""
    alpha, sigma = schedule.alpha_sigma(t, like=like)
    return torch.clamp(alpha**2 / sigma**2, min=min_weight)


def _guidance_and_noised(batch: dict, cfg: ProgressiveConfig, sched: NoiseSchedule, t: torch.Tensor):
    """The batch's guidance scales w (B,) (drawn in [w_min, w_max] unless given) and z_t = q(z_t | x0)."""
    x0 = batch["latents"]
    w = batch.get("w")
    if w is None:
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(x0.shape[0], device=x0.device)
    noise = batch.get("noise")
    return w, sched.add_noise(x0, torch.randn_like(x0) if noise is None else noise, t)


def guidance_distillation_loss(student: Denoiser, teacher: Denoiser, batch: dict, cfg: ProgressiveConfig):
    """Stage 0: the w-conditioned student's x0 matches the teacher's CFG x0 at scale w (one pass vs two)."""
    x0, cond, uncond = batch["latents"], batch["cond"], batch["uncond"]
    b, sched = x0.shape[0], teacher.schedule
    t = batch.get("t")
    if t is None:
        t = torch.randint(0, sched.num_train_timesteps, (b,), device=x0.device)
    w, z_t = _guidance_and_noised(batch, cfg, sched, t)
    with torch.no_grad():
        target, _ = teacher.x0_eps(z_t, t, cond, uncond, guidance_scale=w)
    pred, _ = student.x0_eps(z_t, t, cond, guidance_scale=w)
    weight = x0_weight(sched, t, pred, cfg.min_weight)
    loss = (weight * (pred.float() - target.float()) ** 2).mean()
    return loss, {"loss": loss.detach()}


def progressive_loss(student: Denoiser, teacher: Denoiser, batch: dict, cfg: ProgressiveConfig):
    """One halving stage: match two teacher DDIM steps t -> mid -> s with one student step t -> s.

    batch: ``latents``, ``cond``, ``uncond``, ``grid`` = trailing_grid(T, 2N) (the teacher's grid; the
    student's is every other point); optional ``j`` (B,) student step indices, ``w``, ``noise``.
    The target x~ solves z_s = alpha_s x~ + sigma_s (z_t - alpha_t x~) / sigma_t (paper, eq. 8).
    """
    x0, cond, grid = batch["latents"], batch["cond"], batch["grid"].to(batch["latents"].device)
    uncond = batch.get("uncond")  # None: the teacher is not guided again (a student with its guidance baked in)
    b, sched = x0.shape[0], teacher.schedule
    n_student = (grid.shape[0] - 1) // 2
    j = batch.get("j")
    if j is None:
        j = torch.randint(0, n_student, (b,), device=x0.device)
    t, mid, s = grid[2 * j], grid[2 * j + 1], grid[2 * j + 2]
    w, z_t = _guidance_and_noised(batch, cfg, sched, t)
    with torch.no_grad():
        def denoise(x, tt):
            return teacher.x0_eps(x, tt, cond, uncond, guidance_scale=w)

        z_mid = ddim_step(denoise, z_t, t, mid, sched)
        z_s = ddim_step(denoise, z_mid, mid, s, sched)
        target = one_step_target(z_t, z_s, t, s, sched)
    pred, _ = student.x0_eps(z_t, t, cond, guidance_scale=w)
    weight = x0_weight(sched, t, pred, cfg.min_weight)
    loss = (weight * (pred.float() - target.float()) ** 2).mean()
    return loss, {"loss": loss.detach()}


class ProgressiveDistillation(DistillMethod):
    """``--method progressive``: guidance distillation, then halving stages down to ``--steps``."""

    name = "progressive"

    def __init__(self, cfg: ProgressiveConfig, run: RunConfig):
        super().__init__(cfg, run)
        plan = halving_plan(cfg.start_steps, run.steps)
        self.stages: list[Stage] = []
        it = 0
        if cfg.guidance_iters:
            self.stages.append(Stage(0, "guidance", cfg.start_steps, it, cfg.guidance_iters))
            it += cfg.guidance_iters
        for n in plan:
            self.stages.append(Stage(len(self.stages), "halve", n, it, cfg.iters_per_stage))
            it += cfg.iters_per_stage
        self._total_steps = it
        self.current: Stage | None = None
        self.stage_teacher = None

    def needs_images(self) -> str | None:
        return "progressive distillation"

    def default_guidance_scale(self) -> float:
        return self.cfg.middle_guidance_scale()

    def validate(self, teacher) -> None:
        self.cfg.require_trainable_guidance(teacher)

    def total_steps(self) -> int:
        """The guidance stage plus every halving stage: the run's length, whatever --max-train-steps says."""
        return self._total_steps

    def setup(self, teacher) -> None:
        self.teacher = teacher
        # Exact clean end: the schedule goes past t = 0 to alpha = 1, as the exported Euler preset does.
        self.schedule = teacher.schedule.with_clean_end()
        self.student = teacher.make_student(GUIDANCE_EMBED_DIM if teacher.guidance_embedding else None,
                                            start=self.initial_unet(teacher))
        self.stage_teacher = copy.deepcopy(self.student).requires_grad_(False).eval()

    def stage_at(self, step: int) -> Stage:
        """The stage that optimiser step ``step`` (0-based) belongs to."""
        return next(s for s in self.stages if s.first_iter <= step < s.first_iter + s.iters)

    def before_step(self, step: int) -> list[dict]:
        finished = []
        new = self.stage_at(step) if step < self._total_steps else None
        if self.current is not None and new is not self.current:
            finished.append(self._stage_export(self.current))
        if new is not None and new is not self.current:
            # The frozen teacher of a halving stage is the student as it is now (end of the previous stage).
            student = self.unwrap(self.student)
            self.stage_teacher.load_state_dict(student.state_dict())
            self.current = new
        return finished

    def lr_segments(self) -> list[tuple[int, int]]:
        # Every stage is a fresh distillation problem: its LR schedule (e.g. linear decay to 0, as in
        # Salimans & Ho) runs over the stage alone.
        return [(s.first_iter, s.iters) for s in self.stages]

    def sampling_steps(self) -> int:
        return self.current.student_steps if self.current is not None else self.run.steps

    def on_resume(self, step: int) -> None:
        # The checkpoint holds the stage teacher of the stage the last finished step belonged to.
        self.current = self.stage_at(step - 1) if step > 0 else None

    def _stage_export(self, stage: Stage) -> dict:
        student = self.unwrap(self.student)
        return {"name": stage.name, "unet": copy.deepcopy(student).eval(), "steps": stage.student_steps,
                "scheduler": self.export_scheduler(self.teacher.scheduler)}

    def loss(self, phase: str, batch: dict, step: int):
        stage = self.current
        prepared = self.teacher.encode_batch(batch, self.needs_images())
        student = self.teacher.denoiser(self.student, self.schedule)
        if stage.kind == "guidance":
            teacher = self.teacher.denoiser(schedule=self.schedule)
            return guidance_distillation_loss(student, teacher, prepared, self.cfg)
        if stage.index == 0:  # no guidance stage: the first teacher is the original one, with CFG
            teacher = self.teacher.denoiser(schedule=self.schedule)
        else:
            # The stage teacher is an earlier student: guided already (by its guidance embedding, or baked in
            # where the network has none, as SD3's), so it gets no CFG pass on top.
            teacher = self.teacher.denoiser(self.stage_teacher, self.schedule)
            prepared = {**prepared, "uncond": None}
        prepared["grid"] = trailing_grid(self.schedule.num_train_timesteps, 2 * stage.student_steps)
        loss, logs = progressive_loss(student, teacher, prepared, self.cfg)
        return loss, {**logs, "stage": float(stage.index), "student_steps": float(stage.student_steps)}

    def state_modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student, "stage_teacher": self.stage_teacher}

    def export_scheduler(self, teacher_scheduler):
        return self.teacher.euler_scheduler(teacher_scheduler)

    def card_details(self) -> dict:
        c = self.cfg
        stages = " -> ".join(str(s.student_steps) + (" (guidance)" if s.kind == "guidance" else "") for s in self.stages)
        return {"stages (student steps)": stages, "iterations": f"{c.guidance_iters} guidance + {c.iters_per_stage} per halving",
                "guidance sampled": f"w in [{c.w_min}, {c.w_max}] (guidance embedding, time_cond_proj_dim)",
                "student parameterisation": f"{self.teacher.prediction_type} (the teacher's), x0-space loss, truncated SNR",
                "scheduler preset": "EulerDiscreteScheduler, trailing spacing (= DDIM on the training grid)"}

