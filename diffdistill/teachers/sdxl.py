"""The SDXL teacher adapter: a UNet with added conditions (pooled text ``text_embeds`` and the micro-conditioning
``time_ids``), two CLIP text encoders, the discrete VP schedule of SD.

The conditioning the methods batch is one tensor (B, 77 + 1, D): the concatenated penultimate hidden states of
both encoders (D = 2048 for SDXL) and, as the last row, text_encoder_2's pooled projection (1280) zero-padded
to D (``sd3.pack_conditioning``). ``time_ids`` are the pipeline's defaults at the native size (original = target
= native, crop 0, 0): what ``StableDiffusionXLPipeline`` passes when a user gives no size.
"""

from __future__ import annotations

import torch

from .sd import Teacher
from .sd3 import pack_conditioning


class SDXLTeacher(Teacher):
    """A frozen SDXL teacher (StableDiffusionXLPipeline)."""

    family = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"

    def frozen_parts(self) -> list[torch.nn.Module]:
        return [self.pipe.unet, self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2]

    @property
    def cond_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    @property
    def pooled_dim(self) -> int:
        return self.pipe.text_encoder_2.config.projection_dim

    def time_ids(self, batch: int, device, dtype) -> torch.Tensor:
        """(B, 6): original size, crop top-left, target size, all at the native image size (the pipeline's default)."""
        size = (self.image_size, self.image_size)
        ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=self.pooled_dim)
        return ids.to(device).expand(batch, -1)

    def net_call(self, net, x_t, timestep, cond, timestep_cond=None):
        """UNet(x_t, t, text tokens, added_cond_kwargs = {text_embeds: pooled, time_ids}) -> output."""
        pooled = cond[:, -1, : self.pooled_dim]
        added = {"text_embeds": pooled, "time_ids": self.time_ids(x_t.shape[0], x_t.device, cond.dtype)}
        return net(x_t, timestep, encoder_hidden_states=cond[:, :-1], timestep_cond=timestep_cond,
                   added_cond_kwargs=added).sample

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """StableDiffusionXLPipeline.encode_prompt, packed; the empty prompt is zeros where the pipeline's
        ``force_zeros_for_empty_prompt`` makes its unconditional half zeros."""
        device = self.pipe.text_encoder.device
        tokens, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        packed = pack_conditioning(tokens, pooled)
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            empty = torch.tensor([p == "" for p in prompts], device=packed.device)[:, None, None]
            packed = torch.where(empty, torch.zeros_like(packed), packed)
        return packed

    def build_pipeline(self, net, scheduler, dtype_of_teacher: bool = True, safety: bool = False, vae=None):
        """A StableDiffusionXLPipeline from the teacher's VAE (or ``vae``), text encoders and tokenizers plus ``net``."""
        return self._pipeline_from_parts(net, scheduler, dtype_of_teacher, vae=vae, add_watermarker=False,
                                         force_zeros_for_empty_prompt=self.pipe.config.get("force_zeros_for_empty_prompt", True))

    def reload_kwargs(self) -> dict:
        return dict(self.absent_parts)

