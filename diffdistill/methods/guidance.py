"""Guidance options shared by several methods: one field definition each, so that a flag several methods
take has one default and one help text (the CLI refuses to build otherwise).

Two notions, two names: the teacher's classifier-free guidance while distilling (``teacher_guidance_scale``
for the methods that use one scale, ``w_min``/``w_max`` for those that train a guidance embedding on a
range), and the guidance_scale written into the export (the run option ``export_guidance_scale``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import opt
from ..errors import require

TEACHER_GUIDANCE_RENAMED = {
    "guidance_scale": "was renamed: use --teacher-guidance-scale (teacher_guidance_scale under method_args:); "
                      "the guidance_scale of the export is the run option --export-guidance-scale"}
EXPORT_GUIDANCE_RENAMED = {
    "guidance_scale": "was renamed: the guidance_scale of the export is the run option --export-guidance-scale "
                      "(export_guidance_scale at the top level of a config file; -1: the middle of [--w-min, --w-max])"}


def teacher_guidance_option() -> Any:
    """The ``teacher_guidance_scale`` field of the methods that score or sample the teacher at one CFG scale
    (add, dmd, sds): one default and one help text, as the CLI requires of a shared flag."""
    return opt(2.0, "the teacher's classifier-free guidance scale wherever it scores or samples during distillation "
                    "(diffusers convention, 1 = no guidance)")


@dataclass
class GuidanceRangeOptions:
    """The teacher guidance scales a student with a guidance embedding is trained on (lcm, progressive)."""

    FORMER_OPTIONS: ClassVar[dict[str, str]] = EXPORT_GUIDANCE_RENAMED

    w_min: float = opt(1.0, "smallest teacher guidance scale w sampled for the student's guidance embedding "
                            "(diffusers convention, 1 = no guidance)")
    w_max: float = opt(3.0, "largest teacher guidance scale w sampled (lcm: equal to --w-min bakes that one scale "
                            "into the student, without a guidance embedding)")

    def __post_init__(self):
        require(self.w_min >= 0, f"--w-min must be >= 0, got {self.w_min}")
        require(self.w_min <= self.w_max, f"--w-min ({self.w_min}) must not exceed --w-max ({self.w_max})")

    def require_trainable_guidance(self, teacher, baked: bool = False) -> None:
        """A guidance range needs a guidance embedding to learn it: a teacher family whose network has none
        (SD3's MMDiT) takes one scale, which the student bakes in (``baked``: the method bakes it anyway)."""
        require(baked or self.w_min == self.w_max or teacher.guidance_embedding,
                f"a {teacher.family} teacher's network has no guidance embedding to train: give one teacher guidance "
                f"scale (--w-min equal to --w-max), which the student bakes in")

    def middle_guidance_scale(self) -> float:
        """The middle of [w_min, w_max]: what the export recommends unless --export-guidance-scale says otherwise."""
        return 0.5 * (self.w_min + self.w_max)
