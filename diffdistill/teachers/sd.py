"""The Stable Diffusion 1.x/2.x teacher adapter, and the interface every family's adapter gives the methods.

A method speaks only this interface: prompt encoding (a conditioning tensor it treats as opaque and only
batches: concatenates, slices, expands), the denoiser call (``denoiser``), the noise process (``schedule``),
the student built from the teacher (``make_student``, ``lora_targets``), and what the export needs (the
pipeline, the scheduler presets, the LoRA format). Families override the hooks (``sd3.py``: SD3's MMDiT).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data import has_images, require_images
from ..denoiser import Denoiser, unet_call

# Distinct prompts whose embeddings a Teacher keeps (digits-SD has 11; web caption sets are not cached).
PROMPT_CACHE_SIZE = 4096

# peft target modules of a LoRA on a UNet: attention, feed-forward, resnet convolutions, time projections.
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@dataclass
class Teacher:
    """A frozen Stable Diffusion 1.x/2.x teacher: its parts, its noise schedule and a prompt-embedding cache."""

    pipe: object
    schedule: object  # denoiser.NoiseSchedule (VP) or denoiser.FlowMatchSchedule (flow families)
    prediction_type: str
    source: str
    # The teacher's safety_checker, feature_extractor and requires_safety_checker, kept on the CPU (never used in
    # training) for the export; empty when the teacher has none or they were dropped.
    safety_parts: dict = field(default_factory=dict)
    _prompt_cache: dict = field(default_factory=dict)
    # Components the teacher's folder leaves out (null in model_index.json, e.g. SD3 without T5): None each, as
    # from_pretrained of the teacher and of its exports must be told.
    absent_parts: dict = field(default_factory=dict)

    family = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    lora_targets = UNET_LORA_TARGETS
    lora_layers_key = "unet_lora_layers"  # the save_lora_weights argument of the family's pipeline
    guidance_embedding = True  # make_student can give the student a guidance embedding (time_cond_proj_dim)
    guidance_input = False  # the network takes the guidance scale as an input (Flux-dev): no CFG pass
    prediction_type_of_family = None  # None: the scheduler's (epsilon, v_prediction); "flow" for flow families

    @classmethod
    def check_folder(cls, folder) -> None:
        """Family-specific checks of a local teacher folder before it is loaded (one-line UserErrors)."""

    # --- parts ---------------------------------------------------------------------------------
    @property
    def unet(self):
        """The denoising network (a UNet here, the transformer of SD3/Flux)."""
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    def frozen_parts(self) -> list[torch.nn.Module]:
        """Every network of the pipeline (frozen at load)."""
        return [self.pipe.unet, self.pipe.vae, self.pipe.text_encoder]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the network's latents at its native sample size."""
        s = self.unet.config.sample_size
        return (self.unet.config.in_channels, s, s)

    @property
    def image_size(self) -> int:
        """Native image size in pixels."""
        return self.unet.config.sample_size * (2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def cond_dim(self) -> int:
        """Width D of the conditioning tensor (B, L, D) that ``encode_prompts`` returns."""
        return self.pipe.text_encoder.config.hidden_size

    # --- the denoiser ----------------------------------------------------------------------------
    def net_call(self, net, x_t, timestep, cond, timestep_cond=None):
        """The network's raw output at (x_t, timestep) for a conditioning from ``encode_prompts``."""
        return unet_call(net, x_t, timestep, cond, timestep_cond)

    def denoiser(self, net=None, schedule=None) -> Denoiser:
        """``net`` (default: the teacher's network; a student built by ``make_student``) as a Denoiser on
        ``schedule`` (default: the teacher's), called the way this family's network is called."""
        return Denoiser(self.unet if net is None else net, self.schedule if schedule is None else schedule,
                        self.prediction_type, call=self.net_call, guidance_input=self.guidance_input)

    # --- students --------------------------------------------------------------------------------
    def make_student(self, time_cond_proj_dim: int | None = None, start=None):
        """A trainable float32 copy of the teacher's network (or of ``start``, e.g. the compressed UNet of
        ``--student-from``); with ``time_cond_proj_dim`` a guidance embedding (zero-initialised: the student
        starts out as exactly the network it copies)."""
        from ..students import student_from_teacher

        return student_from_teacher(self.unet if start is None else start, time_cond_proj_dim)

    def export_net(self, net, inert_guidance: bool = True):
        """The network as the exported pipeline holds it: a UNet without a guidance embedding gets an inert one,
        so StableDiffusionPipeline runs one pass per step at any guidance_scale (``with_inert_guidance_embedding``),
        unless ``inert_guidance=False`` (a student sampled with the pipeline's CFG, as its teacher is: kd)."""
        from ..students import with_inert_guidance_embedding

        return with_inert_guidance_embedding(net) if inert_guidance else net

    def guidance_baked(self, net, inert_guidance: bool = True) -> bool:
        """True when the pipeline's guidance_scale cannot change the exported network's output (a UNet that the
        pipeline guides with CFG, ``inert_guidance=False`` without an embedding, bakes nothing)."""
        from ..students import guidance_is_baked

        return guidance_is_baked(net) and (inert_guidance or net.config.time_cond_proj_dim is not None)

    # --- prompts and images --------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """Tokenise and encode exactly as StableDiffusionPipeline does: (B, L, D) on the text encoder's device."""
        tok = self.pipe.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.pipe.text_encoder.device)
        return self.pipe.text_encoder(ids)[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device=None) -> torch.Tensor:
        """(B, L, D) conditioning exactly as the pipeline computes it; repeated prompts are cached."""
        device = device or self.unet.device
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if len(self._prompt_cache) + len(missing) > PROMPT_CACHE_SIZE:  # large caption sets: encode, don't cache
            return self._encode(prompts).to(device)
        if missing:
            self._prompt_cache.update(zip(missing, self._encode(missing)))
        return torch.stack([self._prompt_cache[p] for p in prompts]).to(device)

    def encode_batch(self, batch: dict, what: str) -> dict:
        """A data batch -> {"latents", "cond", "uncond"} for methods that learn from images (``what`` names the method).
        A batch of cached posteriors (``--cache-latents``: "latent_mean", "latent_std") is sampled, not encoded."""
        require_images(has_images(batch), what)
        device = self.unet.device
        latents = (self.sample_latents(batch["latent_mean"], batch["latent_std"]) if "latent_mean" in batch
                   else self.encode_images(batch["pixel_values"].to(device)))
        # Contiguous either way: the posterior's mean is a channel slice of the encoder output, and torch's CPU
        # randn_like draws other numbers for a strided tensor than for a contiguous one of the same shape, so the
        # methods' noise would differ between the cached and the uncached latents.
        return {"latents": latents.contiguous(),
                "cond": self.encode_prompts(batch["prompt"], device), "uncond": self.encode_prompts([""], device)}

    def _scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE posterior sample -> the latents the denoiser sees (minus ``shift_factor`` where the VAE has one, as
        SD3's and Flux's do, then times ``scaling_factor``)."""
        shift = self.vae.config.get("shift_factor", None)
        return (z if shift is None else z - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> scaled latents (B, C, h, w), sampled from the VAE posterior."""
        vae = self.vae
        return self._scale_latents(vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample(generator))

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] (B, 3, H, W) -> the VAE posterior's mean and std (B, C, h, w), unscaled."""
        vae = self.vae
        post = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return post.mean, post.std

    @torch.no_grad()
    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Scaled latents drawn from a cached posterior exactly as ``encode_images`` draws them: diffusers'
        DiagonalGaussianDistribution.sample (mean + std * randn_tensor) on the run's RNG."""
        from diffusers.utils.torch_utils import randn_tensor

        vae = self.vae
        mean, std = mean.to(device=vae.device, dtype=vae.dtype), std.to(device=vae.device, dtype=vae.dtype)
        return self._scale_latents(mean + std * randn_tensor(mean.shape, device=vae.device, dtype=vae.dtype))

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, steps: int,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's own guided DDIM sample in ``steps`` steps (from ``noise``, else fresh noise): latents."""
        from ..solvers import sample_loop

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
        z = latents.to(vae.dtype) / vae.config.scaling_factor
        shift = vae.config.get("shift_factor", None)
        return vae.decode(z if shift is None else z + shift).sample.clamp(-1, 1)

    # --- export ----------------------------------------------------------------------------------
    def build_pipeline(self, net, scheduler, dtype_of_teacher: bool = True, safety: bool = False, vae=None):
        """A StableDiffusionPipeline from the teacher's VAE (or ``vae``, e.g. a distilled AutoencoderTiny), text
        encoder and tokenizer plus ``net`` and ``scheduler``.

        ``dtype_of_teacher=False`` takes float32 copies of a half-precision VAE and text encoder (for export);
        ``safety=True`` adds the teacher's safety checker and feature extractor where it has them (for export)."""
        from diffusers import StableDiffusionPipeline

        from ..export import float32

        vae, text_encoder = (self.pipe.vae if vae is None else vae), self.pipe.text_encoder
        if not dtype_of_teacher:
            vae, text_encoder = float32(vae), float32(text_encoder)
        parts = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        if safety and self.safety_parts:
            parts = {**self.safety_parts, "safety_checker": float32(self.safety_parts["safety_checker"])}
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=self.pipe.tokenizer, unet=net, scheduler=scheduler, **parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def check_teacher_guidance(self, scales: tuple[float, float] | None) -> None:
        """Refuse teacher guidance scales (lowest, highest) the family cannot give (one-line UserError)."""

    def sample_kwargs(self, steps: int = 1) -> dict:
        """Arguments a call of the family's pipeline needs to sample a ``steps``-step student as it was trained:
        the teacher's native size where the pipeline's default differs (Flux), the noise levels where its
        default grid is not the students' (SD3). None for SD 1.x/2.x and SDXL."""
        return {}

    net_key = "unet"  # the pipeline component the student network takes the place of

    def _pipeline_from_parts(self, net, scheduler, dtype_of_teacher: bool, vae=None, **config):
        """The family's pipeline of every component of the teacher's (float32 copies of half-precision modules
        unless ``dtype_of_teacher``), with ``net`` in place of its denoising network, ``scheduler``, and ``vae``
        (when given) in place of the teacher's VAE."""
        import diffusers

        from ..export import float32

        parts = {name: (float32(part) if isinstance(part, torch.nn.Module) and not dtype_of_teacher else part)
                 for name, part in self.pipe.components.items()}
        parts.update({self.net_key: net, "scheduler": scheduler})
        if vae is not None:
            parts["vae"] = vae
        pipe = getattr(diffusers, self.pipeline_class_name)(**parts, **config)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def reload_kwargs(self) -> dict:
        """What ``from_pretrained`` of the teacher's folder needs to load it as the user would (for the LoRA check)."""
        return {"safety_checker": None, "requires_safety_checker": False, **self.absent_parts}

    def consistency_scheduler(self, teacher_scheduler, original_inference_steps: int, timestep_scaling: float):
        """The scheduler preset of a consistency-style student trained on ``lcm_grid(T, original_inference_steps)``
        with boundary scalings at ``timestep_scaling``: LCMScheduler (``solvers.lcm_scheduler``)."""
        from ..solvers import lcm_scheduler

        return lcm_scheduler(teacher_scheduler, original_inference_steps, timestep_scaling, self.prediction_type)

    def euler_scheduler(self, teacher_scheduler):
        """The deterministic preset of a student trained on ``trailing_grid`` steps (progressive distillation):
        EulerDiscreteScheduler with trailing spacing, which is DDIM between the grid points."""
        from diffusers import EulerDiscreteScheduler

        from ..solvers import scheduler_from_config

        return scheduler_from_config(
            EulerDiscreteScheduler, teacher_scheduler.config, timestep_spacing="trailing", steps_offset=0,
            use_karras_sigmas=False, final_sigmas_type="zero", prediction_type=self.prediction_type,
            interpolation_type="linear")
