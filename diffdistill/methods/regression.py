"""Regression onto the teacher's ODE samples: the paired term of DMD (Yin et al. 2024, sec. 3.3), also
offered to adversarial distillation. One home for the pair pool and the loss, shared by both methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import opt
from ..errors import require, require_at_least


@dataclass
class RegressionOptions:
    """The regression term's options, shared by the configs of the methods that offer it."""

    regression_weight: float = opt(0.0, "weight of a regression loss from pure noise to the teacher's ODE sample of "
                                        "that noise (0: off); the squared error is summed per sample for dmd/sds "
                                        "(the scale of their injected gradient), averaged per element for add")
    regression_steps: int = opt(25, "teacher DDIM steps of the regression targets")
    regression_pairs: int = opt(1024, "(noise, prompt, teacher sample) pairs kept for the regression term; computed "
                                      "once, from the prompts of the first training batches, then reused")
    regression_batch_size: int = opt(16, "pairs regressed per generator step (and added per step while the pool "
                                         "fills)")
    regression_guidance_scale: float = opt(-1.0, "the teacher's classifier-free guidance scale of the regression "
                                                 "targets (-1: --teacher-guidance-scale), e.g. targets at the "
                                                 "sampler's guidance while the real score is read at a lower one")

    def __post_init__(self):
        require_at_least(self, 0, "regression_weight")
        require_at_least(self, 1, "regression_steps", "regression_pairs", "regression_batch_size")
        require(self.regression_guidance_scale == -1 or self.regression_guidance_scale >= 0,
                f"--regression-guidance-scale must be >= 0 (or -1: --teacher-guidance-scale), got "
                f"{self.regression_guidance_scale}")

    def regression_target_guidance(self) -> float:
        """The guidance scale the pool's targets are sampled at (the configs mixing this in define
        ``teacher_guidance_scale``)."""
        return self.teacher_guidance_scale if self.regression_guidance_scale == -1 else self.regression_guidance_scale

    def regression_description(self) -> str:
        """The term as a model card states it."""
        g = self.regression_target_guidance()
        return (f"weight {self.regression_weight}, {self.regression_pairs} pairs of noise and the teacher's "
                f"{self.regression_steps}-step DDIM sample at guidance {g}")


class RegressionPool:
    """Paired teacher samples for DMD's regression term (Yin et al. 2024, sec. 3.3): the teacher's ODE
    sample of a stored noise and prompt, which the one-step generator must reproduce from that noise.

    The pairs are computed once, ``fill`` per generator step from the prompts of the first training
    batches until ``size`` are held, then reused: the teacher's multi-step sampling is paid once per pair,
    not once per step. The pool (text embeddings included) is part of every checkpoint (``state_dict``), so
    a resumed run regresses onto the same pairs as an uninterrupted one.
    """

    def __init__(self, size: int, fill: int):
        self.size, self.fill = size, fill
        self.noise = self.cond = self.target = None

    def __len__(self) -> int:
        return 0 if self.noise is None else self.noise.shape[0]

    def full(self) -> bool:
        return len(self) >= self.size

    def add(self, noise: torch.Tensor, cond: torch.Tensor, target: torch.Tensor) -> None:
        room = self.size - len(self)
        new = (noise[:room].detach(), cond[:room].detach(), target[:room].detach())
        if self.noise is None:
            self.noise, self.cond, self.target = new
        else:
            self.noise, self.cond, self.target = (torch.cat([a, b]) for a, b in
                                                  zip((self.noise, self.cond, self.target), new))

    def top_up_and_sample(self, teacher, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float,
                          steps: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add up to ``fill`` pairs from the prompts of ``cond`` (the teacher's guided ``steps``-step DDIM
        sample of fresh noise) unless full, then draw ``n`` stored pairs: (noise, cond, target)."""
        if not self.full():
            k = min(self.fill, cond.shape[0], self.size - len(self))
            noise = torch.randn((k, *teacher.latent_shape), device=cond.device)
            with torch.no_grad():
                target = teacher.sample(cond[:k], uncond, guidance_scale, steps, noise)
            self.add(noise, cond[:k], target)
        return self.sample(n)

    def state_dict(self, prefix: str = "regression_pool.") -> dict[str, torch.Tensor]:
        """The pairs held so far (empty before the first fill)."""
        if self.noise is None:
            return {}
        return {prefix + k: v for k, v in zip(("noise", "cond", "target"), (self.noise, self.cond, self.target))}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], device, prefix: str = "regression_pool.") -> None:
        """Restore the pairs of ``state_dict`` (none: the pool starts empty, as at step 0)."""
        if prefix + "noise" not in tensors:
            self.noise = self.cond = self.target = None
            return
        self.noise, self.cond, self.target = (tensors[prefix + k].to(device) for k in ("noise", "cond", "target"))

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self), (n,), device=self.noise.device)
        return self.noise[idx], self.cond[idx], self.target[idx]


class RegressionPoolState:
    """Mixin for a method holding a ``RegressionPool`` as ``self.pool`` (None when the regression term is off): the
    pool is its checkpointed extra state."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {} if self.pool is None else self.pool.state_dict()

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.pool is not None:
            self.pool.load_state_dict(tensors, self.teacher.unet.device)


def regression_loss(x: torch.Tensor, target: torch.Tensor, per_element: bool = False) -> torch.Tensor:
    """0.5 |x - target|^2 summed per sample and averaged over the batch (the scale of DMD's injected
    gradient), or with ``per_element`` averaged over every element (the scale of ADD's other losses, so
    that its weight does not depend on the latent size)."""
    sq = 0.5 * (x.float() - target.float()) ** 2
    return sq.mean() if per_element else sq.flatten(1).sum(1).mean()
