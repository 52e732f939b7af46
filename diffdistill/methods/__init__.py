"""The registry of distillation methods: name -> (config dataclass, method class).

Each method lives in one file with its config (validated in ``__post_init__``), a pure loss
function, and a ``DistillMethod`` subclass giving the shared trainer its few hooks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import build_dataclass
from ..errors import require
from .adversarial import AdversarialConfig, AdversarialDistillation
from .base import DistillMethod
from .consistency import ConsistencyConfig, ConsistencyDistillation
from .kd import KDConfig, KnowledgeDistillation
from .progressive import ProgressiveConfig, ProgressiveDistillation
from .score import DistributionMatchingDistillation, DMDConfig, ScoreDistillation, SDSConfig
from .tiny_decoder import TinyDecoderConfig, TinyDecoderDistillation


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config class, its trainer hooks, and a one-line description."""

    config_cls: type
    method_cls: type[DistillMethod]
    summary: str


METHODS: dict[str, MethodSpec] = {
    "lcm": MethodSpec(ConsistencyConfig, ConsistencyDistillation,
                      "latent consistency distillation (LCM), full UNet or LoRA, LCMScheduler export"),
    "progressive": MethodSpec(ProgressiveConfig, ProgressiveDistillation,
                              "progressive distillation with guidance distillation: halve steps down to --steps"),
    "add": MethodSpec(AdversarialConfig, AdversarialDistillation,
                      "adversarial diffusion distillation (ADD/LADD): discriminator on frozen features + distillation"),
    "dmd": MethodSpec(DMDConfig, DistributionMatchingDistillation,
                      "one-step student by distribution matching (DMD/DMD2): teacher score minus an online fake score"),
    "sds": MethodSpec(SDSConfig, ScoreDistillation,
                      "one-step student by plain score distillation sampling (the SDS baseline DMD improves on)"),
    "kd": MethodSpec(KDConfig, KnowledgeDistillation,
                     "knowledge distillation into a smaller UNet (BK-SDM): task + output KD + feature KD"),
    "tiny-decoder": MethodSpec(TinyDecoderConfig, TinyDecoderDistillation,
                               "distil the teacher's VAE into an AutoencoderTiny (TAESD), exported as the pipeline's vae"),
}


def get_method(name: str) -> MethodSpec:
    """The registered method ``name`` (one-line UserError for unknown names)."""
    require(name in METHODS, f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def build_method_config(name: str, values: dict, where: str):
    """``--method name``'s config from ``values``; an option only other methods take is a one-line UserError
    naming them (``--method sds --fake-updates 2``), never silently accepted."""
    spec = get_method(name)
    own = {f.name for f in dataclasses.fields(spec.config_cls)}
    for key in sorted(set(values) - own):
        owners = [m for m, s in METHODS.items() if key in {f.name for f in dataclasses.fields(s.config_cls)}]
        require(not owners, f"--{key.replace('_', '-')} is an option of --method {', '.join(owners)}, "
                            f"not of --method {name}")
    return build_dataclass(spec.config_cls, values, where)
