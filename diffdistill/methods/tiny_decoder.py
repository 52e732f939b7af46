"""A tiny VAE decoder (and encoder) distilled from the teacher's VAE: diffusers' ``AutoencoderTiny`` (TAESD, Bohan
2023), exported as the pipeline's ``vae``.

The decoder learns to give the teacher decoder's images from the latents the pipeline hands its VAE. A Stable
Diffusion pipeline decodes ``latents / vae.config.scaling_factor``; AutoencoderTiny's scaling factor is 1.0, so it
receives the UNet's latents z as they are, while the teacher decodes z / s (s: its own scaling factor). Hence

    L = ||D_tiny(z) - D_T(z / s)||_1 + ||D_tiny(z) - D_T(z / s)||_2^2
        + beta * sum_k ||h_T^(k) - P_k(h_tiny^(k))||^2            (optional feature KD, decoder stage outputs)
        + gamma * ||E_tiny(x) - s * mean(E_T(x))||^2               (the tiny encoder, so the vae also encodes)

with z = s * (a sample of the teacher VAE's posterior of a training image x). AutoencoderTiny's own
latent_magnitude / latent_shift only map latents to [0, 1] for storing them as images (scale_latents); decode and
encode never use them. ``--student-from`` puts the UNet and scheduler of another pipeline (e.g. a kd + lcm student)
beside the tiny VAE in the export, which then is smaller, few-step and fast to decode at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import RunConfig, opt
from ..errors import require
from ..features import ChannelProjections, FeatureTaps
from .base import require_unet_family
from .kd import FeatureKDMethod, recommended_guidance


@dataclass
class TinyDecoderConfig:
    """Options of tiny-VAE distillation (``--method tiny-decoder``)."""

    vae_channels: int = opt(64, "channels of every AutoencoderTiny stage, encoder and decoder (TAESD: 64)")
    vae_blocks: int = opt(3, "AutoencoderTiny blocks per stage, the decoder's last stage and the encoder's first "
                             "having one (TAESD: 3)")
    decoder_feature_weight: float = opt(0.0, "beta: weight of feature KD between the teacher decoder's upsampling "
                                             "stage outputs and the tiny decoder's (0: off)")
    encoder_weight: float = opt(1.0, "gamma: weight of the tiny encoder's regression onto the teacher's scaled "
                                     "posterior mean (0: the exported encoder stays untrained)")

    def __post_init__(self):
        require(self.vae_channels > 0, f"--vae-channels must be > 0, got {self.vae_channels}")
        require(self.vae_blocks > 0, f"--vae-blocks must be > 0, got {self.vae_blocks}")
        require(self.decoder_feature_weight >= 0, f"--decoder-feature-weight must be >= 0, got {self.decoder_feature_weight}")
        require(self.encoder_weight >= 0, f"--encoder-weight must be >= 0, got {self.encoder_weight}")


def tiny_vae_for(teacher_vae, channels: int, blocks: int):
    """An AutoencoderTiny with the teacher VAE's image and latent channels and its down/upscaling factor (one stage
    per teacher stage: every stage but one halves or doubles the resolution)."""
    from diffusers import AutoencoderTiny

    cfg = teacher_vae.config
    n = len(cfg.block_out_channels)
    return AutoencoderTiny(in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
                           encoder_block_out_channels=(channels,) * n, decoder_block_out_channels=(channels,) * n,
                           num_encoder_blocks=(1,) + (blocks,) * (n - 1), num_decoder_blocks=(blocks,) * (n - 1) + (1,))


def decoder_stage_modules(teacher_vae, tiny) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """Pairs of modules whose outputs have the same resolution: stage k -> (the teacher decoder's up block k, the
    convolution after the tiny decoder's k-th upsampling), for the stages that upsample."""
    layers = list(tiny.decoder.layers)
    after_up = [layers[i + 1] for i, m in enumerate(layers) if isinstance(m, torch.nn.Upsample)]
    ups = [b for b in teacher_vae.decoder.up_blocks if getattr(b, "upsamplers", None)]
    return {f"stage{k}": (t, s) for k, (t, s) in enumerate(zip(ups, after_up))}


def decoder_kd_loss(tiny_images: torch.Tensor, teacher_images: torch.Tensor) -> torch.Tensor:
    """L1 + squared L2 between the tiny decoder's images and the teacher decoder's, (B, 3, H, W) in [-1, 1]."""
    d = tiny_images.float() - teacher_images.float()
    return d.abs().mean() + (d**2).mean()


class TinyVAEStep(torch.nn.Module):
    """The trained module: an AutoencoderTiny whose forward is one training step's use of it (DDP synchronises the
    gradients of what runs through a wrapped module's forward)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor, pixels: torch.Tensor | None = None):
        """(images decoded from latents z (B, C, h, w), latents encoded from ``pixels`` (B, 3, H, W) or None)."""
        images = self.vae.decode(z).sample
        return images, None if pixels is None else self.vae.encode(pixels).latents


class TinyDecoderDistillation(FeatureKDMethod):
    """``--method tiny-decoder``: distil the teacher's VAE into an AutoencoderTiny, exported as the pipeline's vae."""

    name = "tiny-decoder"

    def __init__(self, cfg: TinyDecoderConfig, run: RunConfig):
        super().__init__(cfg, run)
        self.pairs: dict = {}

    def needs_images(self) -> str | None:
        return "tiny-decoder distillation (latents of real images)"

    def needs_cfg(self) -> bool:
        return True  # the UNet is exported as it is: the teacher's keeps its CFG, a --student-from one its embedding

    def default_guidance_scale(self) -> float:
        # what the pipeline whose UNet is exported recommends: --student-from's, else the teacher's (kd's rule)
        if self.run.student_from:
            return recommended_guidance(self.run.student_from, 1.0)
        return recommended_guidance(self.run.teacher, 7.5)

    def validate(self, teacher) -> None:
        from diffusers import AutoencoderKL

        require_unet_family(teacher, "--method tiny-decoder")
        require(isinstance(teacher.vae, AutoencoderKL),
                f"--method tiny-decoder distils an AutoencoderKL; {self.run.teacher}'s vae is a "
                f"{type(teacher.vae).__name__}")

    def initial_unet(self, teacher):
        # The exported UNet is --student-from's exactly as it is saved (an inert guidance embedding included).
        if not self.run.student_from:
            return teacher.unet
        if self._initial_unet is None:
            from ..students import load_student_unet

            self._initial_unet = load_student_unet(self.run.student_from, teacher.unet, raw=True)
        return self._initial_unet

    def setup(self, teacher) -> None:
        self.teacher = teacher
        c = self.cfg
        self.student = TinyVAEStep(tiny_vae_for(teacher.vae, c.vae_channels, c.vae_blocks)).to(teacher.vae.device)
        if c.encoder_weight == 0:  # untrained: no optimiser state, and DDP sees no unused trainable parameters
            self.student.vae.encoder.requires_grad_(False)
        self.pairs = decoder_stage_modules(teacher.vae, self.student.vae) if c.decoder_feature_weight > 0 else {}
        widths = {k: (s.out_channels, t.resnets[-1].conv2.out_channels) for k, (t, s) in self.pairs.items()}
        self.projections = ChannelProjections(widths).to(teacher.vae.device)
        self.teacher_taps = FeatureTaps({k: t for k, (t, _) in self.pairs.items()})
        self.student_taps = FeatureTaps({k: s for k, (_, s) in self.pairs.items()})

    def loss(self, phase: str, batch: dict, step: int):
        vae = self.teacher.vae
        s = vae.config.scaling_factor
        pixels = batch["pixel_values"].to(device=vae.device, dtype=vae.dtype)  # (B, 3, H, W) in [-1, 1]
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
            z = posterior.sample() * s  # (B, C, h, w): the latents a pipeline hands its vae
            with self.teacher_taps.capture():
                target = vae.decode(z / s).sample.clamp(-1, 1)
        with self.student_taps.capture():  # through the (DDP-wrapped) module, so gradients are synchronised
            images, latents = self.student(z, pixels if self.cfg.encoder_weight > 0 else None)
        dec = decoder_kd_loss(images, target)
        feat = torch.zeros((), device=z.device)
        for k, (t_feat, s_feat) in zip(self.pairs, zip(self.teacher_taps.values(), self.student_taps.values())):
            feat = feat + F.mse_loss(self.projections(k, s_feat.float()), t_feat.float())
        enc = torch.zeros((), device=z.device)
        if latents is not None:
            enc = F.mse_loss(latents.float(), (posterior.mean * s).float())
        loss = dec + self.cfg.decoder_feature_weight * feat + self.cfg.encoder_weight * enc
        return loss, {"loss": loss.detach(), "decoder": dec.detach(), "features": feat.detach(), "encoder": enc.detach()}

    def export_vae(self, unwrap) -> torch.nn.Module:
        return unwrap(self.student).vae

    def export_unet(self, unwrap) -> torch.nn.Module:
        return self.initial_unet(self.teacher)

    def export_scheduler(self, teacher_scheduler):
        if self.run.student_from:
            return _load_scheduler(self.run.student_from)
        return type(teacher_scheduler).from_config(teacher_scheduler.config)

    def card_details(self) -> dict:
        tiny = self.unwrap(self.student).vae
        n_tiny = sum(p.numel() for p in tiny.decoder.parameters())
        n_t = sum(p.numel() for p in self.teacher.vae.decoder.parameters())
        c = self.cfg
        return {
            "vae": f"AutoencoderTiny ({c.vae_channels} channels, {c.vae_blocks} blocks per stage) distilled from the "
                   f"teacher's AutoencoderKL: decoder {n_tiny:,} parameters, {100 * n_tiny / n_t:.1f}% of the "
                   f"teacher's {n_t:,}",
            "unet and scheduler": f"from {self.run.student_from}" if self.run.student_from else "the teacher's",
            "loss": f"L1 + L2 to the teacher's decoded images + {c.decoder_feature_weight} x decoder feature KD + "
                    f"{c.encoder_weight} x encoder latent regression",
        }


def _load_scheduler(folder: str):
    """The scheduler of a saved pipeline folder, of the class its model_index.json names."""
    import diffusers

    index = json.loads((Path(folder) / "model_index.json").read_text())
    cls = getattr(diffusers, index["scheduler"][1])
    return cls.from_pretrained(folder, subfolder="scheduler")
