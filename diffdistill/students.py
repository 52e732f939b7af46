"""Students: trainable copies of the teacher UNet, and the guidance embedding an exported student carries."""

from __future__ import annotations

import torch

from .errors import require
from .loading import quiet_loading

# Width of the guidance embedding given to guidance-distilled students (LCM and SD-Turbo style).
GUIDANCE_EMBED_DIM = 256


def student_from_teacher(teacher_unet, time_cond_proj_dim: int | None = None):
    """A trainable copy of the teacher UNet; with ``time_cond_proj_dim`` it gains a guidance embedding.

    The new ``cond_proj`` layer is zero-initialised, so the student starts out as exactly the teacher.
    """
    from diffusers import UNet2DConditionModel

    config = dict(teacher_unet.config)
    if time_cond_proj_dim is not None:
        config["time_cond_proj_dim"] = time_cond_proj_dim
    with quiet_loading():
        student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    allowed = {"time_embedding.cond_proj.weight"}
    require(not unexpected and set(missing) <= allowed,
            f"teacher UNet does not match its own config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if student.time_embedding.cond_proj is not None and "time_embedding.cond_proj.weight" in missing:
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    with quiet_loading():
        student.to(device=teacher_unet.device, dtype=torch.float32)
    student.train()
    student.requires_grad_(True)
    return student


def with_inert_guidance_embedding(unet):
    """``unet`` itself if it has a guidance embedding, else an equal copy with one that has no effect.

    StableDiffusionPipeline skips its unconditional pass for a UNet with ``time_cond_proj_dim``; a student
    whose guidance is baked into its weights (ADD, DMD, LCM-LoRA fused, ...) then gives the same images in
    one pass per step at any ``guidance_scale``, diffusers' default 7.5 included, instead of being guided
    a second time. The added ``cond_proj`` is zero, so the outputs are exactly the student's.
    """
    if unet.config.time_cond_proj_dim is not None:
        return unet
    return student_from_teacher(unet, GUIDANCE_EMBED_DIM).eval().requires_grad_(False)


def guidance_is_baked(unet) -> bool:
    """True when the UNet's guidance embedding is absent or all zero: ``guidance_scale`` cannot change its output."""
    proj = getattr(unet.time_embedding, "cond_proj", None)
    return proj is None or not bool(proj.weight.detach().abs().max() > 0)
