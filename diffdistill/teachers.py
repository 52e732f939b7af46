"""Teachers: loading a frozen Stable Diffusion pipeline, encoding prompts and images, sampling it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import has_images, require_images
from .denoiser import Denoiser, NoiseSchedule, scheduler_prediction_type
from .errors import UserError, require
from .loading import (
    check_pipeline_folder,
    check_variant,
    hub_kwargs,
    is_hub_id,
    is_single_file,
    load_error_line,
    load_single_file,
    quiet_loading,
)

SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)

# Distinct prompts whose embeddings a Teacher keeps (digits-SD has 11; web caption sets are not cached).
PROMPT_CACHE_SIZE = 4096


def check_teacher_folder(path: str | Path) -> dict:
    """model_index.json of a local Stable Diffusion pipeline folder, or a one-line UserError."""
    info = check_pipeline_folder(path, what="teacher")
    cls = info.get("_class_name", "")
    require(cls in SUPPORTED_PIPELINES,
            f"teacher {path} is a {cls or 'unknown'} pipeline; supported: {', '.join(SUPPORTED_PIPELINES)}")
    return info


@dataclass
class Teacher:
    """A frozen Stable Diffusion teacher: its parts, its noise schedule and a prompt-embedding cache."""

    pipe: object
    schedule: NoiseSchedule
    prediction_type: str
    source: str
    # The teacher's safety_checker, feature_extractor and requires_safety_checker, kept on the CPU (never used in
    # training) for the export; empty when the teacher has none or they were dropped.
    safety_parts: dict = field(default_factory=dict)
    _prompt_cache: dict = field(default_factory=dict)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the UNet's latents at its native sample size."""
        s = self.unet.config.sample_size
        return (self.unet.config.in_channels, s, s)

    @property
    def image_size(self) -> int:
        """Native image size in pixels."""
        return self.unet.config.sample_size * (2 ** (len(self.vae.config.block_out_channels) - 1))

    def denoiser(self) -> Denoiser:
        """The teacher UNet as a Denoiser (x0/eps, optionally CFG-guided)."""
        return Denoiser(self.unet, self.schedule, self.prediction_type)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """Tokenise and encode exactly as StableDiffusionPipeline does: (B, L, D) on the text encoder's device."""
        tok = self.pipe.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.pipe.text_encoder.device)
        return self.pipe.text_encoder(ids)[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device=None) -> torch.Tensor:
        """(B, L, D) text embeddings exactly as the pipeline computes them; repeated prompts are cached."""
        device = device or self.unet.device
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if len(self._prompt_cache) + len(missing) > PROMPT_CACHE_SIZE:  # large caption sets: encode, don't cache
            return self._encode(prompts).to(device)
        if missing:
            self._prompt_cache.update(zip(missing, self._encode(missing)))
        return torch.stack([self._prompt_cache[p] for p in prompts]).to(device)

    def encode_batch(self, batch: dict, what: str) -> dict:
        """A data batch -> {"latents", "cond", "uncond"} for methods that learn from images (``what`` names the method)."""
        require_images(has_images(batch), what)
        device = self.unet.device
        latents = (self.sample_latents(batch["latent_mean"], batch["latent_std"]) if "latent_mean" in batch
                   else self.encode_images(batch["pixel_values"].to(device)))
        # Contiguous either way: the posterior's mean is a channel slice of the encoder output, and torch's CPU
        # randn_like draws other numbers for a strided tensor than for a contiguous one of the same shape, so the
        # methods' noise would differ between the cached and the uncached latents.
        return {"latents": latents.contiguous(),
                "cond": self.encode_prompts(batch["prompt"], device), "uncond": self.encode_prompts([""], device)}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> scaled latents (B, C, h, w), sampled from the VAE posterior."""
        vae = self.vae
        post = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return post.sample(generator) * vae.config.scaling_factor

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] (B, 3, H, W) -> the VAE posterior's mean and std (B, C, h, w), unscaled."""
        vae = self.vae
        post = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return post.mean, post.std

    @torch.no_grad()
    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) drawn from a cached posterior exactly as ``encode_images`` draws them:
        diffusers' DiagonalGaussianDistribution.sample (mean + std * randn_tensor) on the run's RNG."""
        from diffusers.utils.torch_utils import randn_tensor

        vae = self.vae
        mean, std = mean.to(device=vae.device, dtype=vae.dtype), std.to(device=vae.device, dtype=vae.dtype)
        return (mean + std * randn_tensor(mean.shape, device=vae.device, dtype=vae.dtype)) * vae.config.scaling_factor

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, steps: int,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's own guided DDIM sample in ``steps`` steps (from ``noise``, else fresh noise): latents."""
        from .solvers import sample_loop

        t_train = self.schedule.num_train_timesteps
        grid = [int(v) for v in torch.arange(steps, 0, -1) * (t_train // steps) - 1]
        den = self.denoiser()

        def guided(x, t):
            return den.x0_eps(x, t, cond, uncond, guidance_scale=guidance_scale)

        x = noise if noise is not None else torch.randn((cond.shape[0], *self.latent_shape), device=cond.device)
        return sample_loop(guided, x, grid, self.schedule, solver="ddim")

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        vae = self.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1)


def load_teacher(source: str, revision: str = "", variant: str = "", local_files_only: bool = False,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 safety_checker: bool = False, single_file_config: str = "assets/digits-sd") -> Teacher:
    """Load a Stable Diffusion teacher from a local folder, a hub id or a single-file checkpoint (read with the
    configs of the folder ``single_file_config``), frozen, with one-line errors.

    ``safety_checker=True`` also loads the teacher's safety checker and feature extractor (for the export), kept
    on the CPU in ``Teacher.safety_parts``; the training pipeline ``Teacher.pipe`` never holds them."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from .solvers import scheduler_from_config

    if is_single_file(source):
        kwargs = {}
    elif is_hub_id(source):
        kwargs = hub_kwargs(revision, local_files_only)
    else:
        check_teacher_folder(source)
        check_variant(source, variant, "teacher")
        kwargs = {}
    if variant:
        kwargs["variant"] = variant
    if not safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if is_single_file(source):
        require(not variant, f"--variant {variant} does not apply to the single-file teacher {source}")
        pipe = load_single_file(source, single_file_config, "teacher", dtype=dtype, **kwargs)
    else:
        try:
            with quiet_loading():
                pipe = StableDiffusionPipeline.from_pretrained(source, dtype=dtype, **kwargs)
        except Exception as e:  # noqa: BLE001 - any load failure becomes one line for the user
            raise UserError(f"cannot load teacher {source!r}: {load_error_line(e)}") from None
    pipe.set_progress_bar_config(disable=True)
    safety_parts = {}
    if pipe.safety_checker is not None:
        safety_parts = {"safety_checker": pipe.safety_checker.requires_grad_(False).eval(),
                        "feature_extractor": pipe.feature_extractor,
                        "requires_safety_checker": bool(pipe.config.requires_safety_checker)}
        pipe.safety_checker, pipe.feature_extractor = None, None
        pipe.register_to_config(requires_safety_checker=False)
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    require(prediction_type in ("epsilon", "v_prediction"),
            f"teacher {source}: prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
        m.eval()
    with quiet_loading():
        pipe.to(device)
        pipe.vae.to(torch.float32)  # the VAE stays in fp32: SD's VAE overflows in fp16
    # The training noise schedule comes from the scheduler config (DDPM holds it without inference state).
    ddpm = scheduler_from_config(DDPMScheduler, pipe.scheduler.config)
    schedule = NoiseSchedule.from_scheduler(ddpm, final_alphas_cumprod=float(ddpm.alphas_cumprod[0]))
    return Teacher(pipe=pipe, schedule=schedule, prediction_type=scheduler_prediction_type(pipe.scheduler), source=source,
                   safety_parts=safety_parts)
