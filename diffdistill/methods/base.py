"""What every distillation method gives the shared trainer, and nothing more.

A method owns its maths (pure loss functions in its own file) and the modules it trains; the trainer
(``trainer.py``), the run (``distill.py``) and the export (``export.py``, ``export_run.py``) own the loop,
the files and the devices. This is the complete list of what they read or call on a method; anything else
on a method is its own business.

Identity
* ``name``                                    the ``--method`` value (cards, logs)
* ``phases``                                  optimiser names, stepped in this order every step (one for
                                              most methods; critic then generator for ADD/DMD, a phase may
                                              repeat: DMD's fake score ``fake_updates`` times)

Set-up (before the first file is written, then before training)
* ``validate(teacher)``                       checks that need the loaded teacher; raise UserError
* ``setup(teacher)``                          build the student and any extra networks from the teacher
* ``trainable_modules()`` / ``set_trainable_modules(modules)``
                                              phase -> module, handed to accelerate and given back wrapped;
                                              before that the trainer sets ``unwrap`` (accelerate's
                                              ``unwrap_model``) for reading a wrapped module bare
* ``parameters(phase)``, ``learning_rate(phase, default)``, ``lr_segments()``
                                              one optimiser and LR schedule per phase
* ``sharding_problem()``                      why the method cannot train under ``--sharding fsdp2`` (one line),
                                              or None where it can (tested)
* ``total_steps()``                           the run's length when the method fixes it (progressive: the
                                              sum of its stages), else None (--max-train-steps)

The step
* ``before_step(step)``                       stage changes (progressive halving); returns finished stages
* ``loss(phase, batch, step)``                (scalar loss, logs) for that phase, from the pure loss
* ``after_step(step)``                        e.g. the EMA update of a consistency target network

State and export
* ``state_modules()``                         every module a checkpoint holds
* ``extra_state()`` / ``load_extra_state(tensors)``
                                              this rank's state that is not a module (e.g. the regression
                                              pool of teacher ODE pairs): name -> tensor, per rank
* ``on_resume(step)``                         after a checkpoint of ``step`` was loaded
* ``student``                                 the module the student EMA tracks
* ``sampling_steps()``, ``max_sampling_steps()``, ``recommended_guidance_scale``
                                              how the student is sampled (validation grids, card, preset)
* ``export_unet(unwrap)``, ``export_scheduler(teacher_scheduler)``, ``lora_state_dict(unwrap)``,
  ``card_details()``                          what the exported pipeline, LoRA and model card contain
* ``export_vae(unwrap)``, ``needs_cfg()``     the pipeline's VAE (None: the teacher's; a tiny decoder), and
                                              whether the export is guided by the pipeline's CFG (no inert
                                              guidance embedding is added then)

Helpers for methods (not called by the trainer)
* ``initial_unet(teacher)``                   what students start from: --student-from's UNet (a compressed
                                              student) or the teacher's
"""

from __future__ import annotations

import torch

from ..config import RunConfig


class DistillMethod:
    """Base class of the methods in ``diffdistill.methods``; see the module docstring for the contract."""

    name = "base"
    phases: tuple[str, ...] = ("student",)

    def __init__(self, cfg, run: RunConfig):
        self.cfg = cfg
        self.run = run
        self.teacher = None
        self.student = None
        self.unwrap = lambda module: module  # the trainer binds accelerate's unwrap_model (DDP, FSDP)
        self._initial_unet = None

    @property
    def recommended_guidance_scale(self) -> float:
        """The guidance_scale written into the export's preset and card: --export-guidance-scale when
        given (>= 0), else 1 for a teacher family whose network has no guidance embedding (SD3: the guidance
        is baked in), else the method's ``default_guidance_scale()``."""
        if self.run.export_guidance_scale >= 0:
            return self.run.export_guidance_scale
        if self.teacher is not None and not self.teacher.guidance_embedding:
            return 1.0  # the student's guidance is baked in: a pipeline guidance_scale > 1 would add a CFG pass on top
        return self.default_guidance_scale()

    def default_guidance_scale(self) -> float:
        """The method's own recommendation: 1.0 (one pass per step, no CFG) unless a method says otherwise."""
        return 1.0

    # --- set-up -------------------------------------------------------------------------------
    def validate(self, teacher) -> None:
        """Checks that need the loaded teacher (raise UserError); runs before anything is written."""

    def teacher_guidance_scales(self) -> tuple[float, float] | None:
        """(lowest, highest) classifier-free guidance scale the method asks of the teacher (None: none)."""
        cfg = self.cfg
        if hasattr(cfg, "w_min"):
            return (float(cfg.w_min), float(cfg.w_max))
        if hasattr(cfg, "teacher_guidance_scale"):
            return (float(cfg.teacher_guidance_scale),) * 2
        return None

    def initial_unet(self, teacher):
        """The UNet a student starts from: ``--student-from``'s (e.g. a compressed ``kd`` student, loaded once and
        checked against the teacher) or the teacher's own. The teacher stays the full model either way."""
        if not self.run.student_from:
            return teacher.unet
        if self._initial_unet is None:
            from ..students import load_student_unet

            require_unet_family(teacher, f"--student-from {self.run.student_from}")
            self._initial_unet = load_student_unet(self.run.student_from, teacher.unet)
        return self._initial_unet

    def needs_images(self) -> str | None:
        """What in this run learns from data images (e.g. "consistency distillation"); None when prompts suffice."""
        return None

    def setup(self, teacher) -> None:
        """Build the student and any extra networks from the (frozen) teacher."""
        raise NotImplementedError

    def parameters(self, phase: str) -> list[torch.nn.Parameter]:
        """Trainable parameters of ``phase``'s optimiser."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def learning_rate(self, phase: str, default: float) -> float:
        """Learning rate of ``phase``'s optimiser (``default``: --learning-rate)."""
        return default

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """phase -> the module that phase trains (wrapped by accelerate for DDP)."""
        return {"student": self.student}

    def set_trainable_modules(self, modules: dict[str, torch.nn.Module]) -> None:
        """Receive the accelerate-wrapped modules back (same keys as ``trainable_modules``)."""
        self.student = modules["student"]

    # --- the step -----------------------------------------------------------------------------
    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss, logs) for ``phase`` on ``batch``."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after every optimiser step (all phases)."""

    def before_step(self, step: int) -> list[dict]:
        """Called before optimiser step ``step`` (0-based) and once more after the last one.

        Returns finished stages to export, each ``{"name", "unet", "scheduler", "steps"}``
        (progressive distillation); stage changes happen here, inside the one training loop.
        """
        return []

    def sharding_problem(self) -> str | None:
        """Why this method cannot train under ``--sharding fsdp2`` (one line), or None where it can; only methods
        with a two-process FSDP test say None."""
        return (f"--method {self.name} is not supported under FSDP yet (supported and tested: lcm with a full UNet, "
                "dmd); use DDP (--sharding none)")

    def total_steps(self) -> int | None:
        """Optimiser steps the method needs in all, when it decides the run's length (replaces
        --max-train-steps); None: --max-train-steps decides."""
        return None

    def lr_segments(self) -> list[tuple[int, int]] | None:
        """(first step, length) of the spans on which the LR schedule starts over (warm-up included);
        None: one span, the whole run."""
        return None

    def on_resume(self, step: int) -> None:
        """Called after a checkpoint of step ``step`` was loaded."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """This rank's training state that no module holds (saved per rank, so a resume is exact)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``extra_state`` returned (an empty dict when the checkpoint holds none)."""

    def max_sampling_steps(self) -> int:
        """The most steps the exported scheduler preset can take (the card benchmark stays within it)."""
        return 10**9

    def sampling_steps(self) -> int:
        """Sampling steps of the student as it is now (validation grids use it)."""
        return self.run.steps

    # --- state and export ---------------------------------------------------------------------
    def state_modules(self) -> dict[str, torch.nn.Module]:
        """Every module whose weights a checkpoint must hold (name -> module)."""
        return dict(self.trainable_modules())

    def export_unet(self, unwrap) -> torch.nn.Module:
        """The UNet the exported pipeline gets (``unwrap`` removes DDP wrappers)."""
        return unwrap(self.student)

    def export_scheduler(self, teacher_scheduler):
        """The scheduler preset that samples the student in ``run.steps`` steps with plain diffusers."""
        raise NotImplementedError

    def export_vae(self, unwrap) -> torch.nn.Module | None:
        """The VAE the exported pipeline gets (None: the teacher's)."""
        return None

    def needs_cfg(self) -> bool:
        """True when the exported UNet is saved as it is, sampled with the pipeline's classifier-free guidance like
        the teacher (kd) or carrying its own embedding (a --student-from UNet); False (the step methods): guidance
        is baked in or embedded, and a UNet without an embedding gets an inert one."""
        return False

    def lora_state_dict(self, unwrap) -> dict[str, torch.Tensor] | None:
        """Diffusers-format LoRA weights when the student is teacher + LoRA, else None."""
        return None

    def card_details(self) -> dict:
        """Method-specific lines for the model card (name -> value)."""
        return {}


def require_unet_family(teacher, what: str) -> None:
    """Compressed students (kd, --student-from, tiny decoders) are built and tested on the UNet families
    (SD 1.x/2.x, SDXL): a one-line UserError for a transformer family (SD3, Flux)."""
    from ..errors import require

    require(teacher.family in ("sd", "sdxl"), f"{what}: compressed students are supported for the UNet families "
                                              f"(SD 1.x/2.x and SDXL teachers) only, not yet for this "
                                              f"{teacher.family} teacher")
