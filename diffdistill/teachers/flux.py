"""The Flux teacher adapter: ``FluxTransformer2DModel`` on packed latents (2x2 patches as tokens, with image and
text position ids), CLIP pooled + T5 tokens, flow matching with dynamic (resolution-dependent) shifting, and the
guidance embedding of guidance-distilled teachers (Flux-dev: the teacher's guidance is an input, one pass).

The methods see unpacked latents (B, C, h, w) as for every family: ``net_call`` packs them for the transformer
and unpacks its output, exactly as ``FluxPipeline`` does around each call. The conditioning is the T5 tokens
plus CLIP's pooled vector as the last row (``sd3.pack_conditioning``); the text ids are zeros, as in FluxPipeline.
The native size is the VAE's ``sample_size`` (1024 for Flux's VAE); the schedule's shift is Flux's mu at that
size's token count.
"""

from __future__ import annotations

import torch

from ..denoiser import FlowMatchSchedule
from .sd3 import SD3Teacher, pack_conditioning

# peft target modules: the joint blocks' image and text projections and the single blocks' attention
FLUX_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class FluxTeacher(SD3Teacher):
    """A frozen Flux teacher (FluxPipeline); shares SD3's transformer plumbing (student copy, LoRA format)."""

    family = "flux"
    pipeline_class_name = "FluxPipeline"
    lora_targets = FLUX_LORA_TARGETS
    max_sequence_length = 512  # FluxPipeline.__call__'s default T5 length

    @property
    def guidance_input(self) -> bool:
        """Flux-dev (``guidance_embeds``): the guidance scale is the transformer's input."""
        return bool(self.unet.config.guidance_embeds)

    @property
    def guidance_embedding(self) -> bool:
        """A guidance-distilled student keeps the teacher's guidance input, so it can learn a range of scales."""
        return self.guidance_input

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return int(self.vae.config.sample_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.image_size // self.vae_scale
        return (self.unet.config.in_channels // 4, s, s)

    @staticmethod
    def flow_schedule(pipe) -> FlowMatchSchedule:
        """Flux's training sigmas at its native size: dynamic shifting by mu of the packed token count."""
        s = int(pipe.vae.config.sample_size) // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return FlowMatchSchedule.from_scheduler(pipe.scheduler, image_seq_len=(s // 2) ** 2)

    def check_teacher_guidance(self, scales: tuple[float, float] | None) -> None:
        """A Flux without guidance input (Flux-schnell) was not trained for classifier-free guidance: a teacher
        scale other than 1 would need two CFG passes of a network that has no unconditional mode."""
        from ..errors import require

        require(self.guidance_input or scales is None or scales == (1.0, 1.0),
                f"this Flux teacher has no guidance input (guidance_embeds false, as Flux-schnell) and no trained "
                f"unconditional pass: teacher guidance {scales} would need two CFG passes; use a teacher guidance "
                f"scale of 1")

    def sample_kwargs(self, steps: int = 1) -> dict:
        """FluxPipeline's default size is fixed (1024 px at Flux's VAE): the native size, given explicitly. Its
        default noise levels, linspace(1, 1/N, N) shifted by mu, are already the N-step students' training grid
        (``lcm_grid``; tests/test_families.py)."""
        return {"height": self.image_size, "width": self.image_size}

    def frozen_parts(self) -> list[torch.nn.Module]:
        return [self.pipe.transformer, self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2]

    def net_call(self, net, x_t, timestep, cond, timestep_cond=None):
        """Pack (B, C, h, w) -> (B, hw/4, 4C), call the transformer at timestep sigma (FluxPipeline passes
        timestep / 1000) with the guidance input, unpack its velocity."""
        from diffusers import FluxPipeline

        b, c, h, w = x_t.shape
        packed = FluxPipeline._pack_latents(x_t, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        tokens, pooled = cond[:, :-1], cond[:, -1, : self.unet.config.pooled_projection_dim]
        txt_ids = torch.zeros(tokens.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        guidance = None
        if self.guidance_input:  # a Denoiser feeds the scale; a caller without one gets Flux-dev at scale 1
            guidance = timestep_cond if timestep_cond is not None else torch.ones(b, device=x_t.device)
        out = net(hidden_states=packed, timestep=timestep / 1000, guidance=guidance, pooled_projections=pooled,
                  encoder_hidden_states=tokens, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_scale, w * self.vae_scale, self.vae_scale)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """FluxPipeline.encode_prompt (T5 tokens, CLIP pooled), packed: (B, L + 1, D)."""
        tokens, pooled, _ = self.pipe.encode_prompt(prompts, None, device=self.pipe.text_encoder.device,
                                                    max_sequence_length=self.max_sequence_length)
        return pack_conditioning(tokens, pooled)

    def make_student(self, time_cond_proj_dim: int | None = None, start=None):
        """A trainable copy of the transformer; its guidance input (Flux-dev) is the student's guidance embedding."""
        return super().make_student(None, start)

    def guidance_baked(self, net, inert_guidance: bool = True) -> bool:
        return not self.guidance_input
