"""What every distillation method gives the shared trainer: a narrow, explicit interface.

A method owns its maths (a pure loss function in its own file) and the modules it trains; the
trainer owns the loop. The hooks are deliberately few:

* ``setup(teacher, run)``          build the student (and any extra networks) from the teacher
* ``phases``                       optimiser names, stepped in this order each step
                                   (one for most methods; two for GAN/DMD: generator, critic)
* ``parameters(phase)``            the parameters that phase's optimiser trains
* ``loss(phase, batch, step)``     (scalar loss, logs) for that phase, calling the pure loss
* ``after_step(step)``             e.g. the EMA update of a target network
* ``before_step(step)``            stage changes (progressive halving); returns finished stages to export
* ``state_modules()``              every module a checkpoint must hold
* ``export_unet()`` + ``export_scheduler(teacher_scheduler)``: what the exported pipeline contains
"""

from __future__ import annotations

import torch

from ..config import RunConfig


class DistillMethod:
    """Base class of the methods in ``diffdistill.methods``; see the module docstring for the contract."""

    name = "base"
    phases: tuple[str, ...] = ("student",)
    recommended_guidance_scale = 1.0

    def __init__(self, cfg, run: RunConfig):
        self.cfg = cfg
        self.run = run
        self.teacher = None
        self.student = None

    # --- set-up -------------------------------------------------------------------------------
    def validate(self, teacher) -> None:
        """Checks that need the loaded teacher (raise UserError); runs before anything is written."""

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

    def lr_segments(self) -> list[tuple[int, int]] | None:
        """(first step, length) of the spans on which the LR schedule starts over (warm-up included);
        None: one span, the whole run."""
        return None

    def on_resume(self, step: int) -> None:
        """Called after a checkpoint of step ``step`` was loaded."""

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

    def lora_state_dict(self, unwrap) -> dict[str, torch.Tensor] | None:
        """Diffusers-format LoRA weights when the student is teacher + LoRA, else None."""
        return None

    def card_details(self) -> dict:
        """Method-specific lines for the model card (name -> value)."""
        return {}
