"""Export: a trained student + its scheduler preset -> a complete diffusers pipeline folder (or a LoRA).

``DiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps=N)`` samples the student in
a process that never imports diffdistill. Every export is written to a temporary folder, reloaded
from disk and sampled once, and only then renamed into place: a failed or interrupted (SIGINT/SIGTERM)
export leaves nothing behind.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from .loading import quiet_loading
from .outputs import replace_dir

EXPORT_INFO = "diffdistill.json"


def float32(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself when all its weights are float32, else a float32 copy (the training copy is left as it is)."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(torch.float32)


def build_pipeline(teacher, unet, scheduler, dtype_of_teacher: bool = True):
    """A StableDiffusionPipeline from the teacher's VAE, text encoder and tokenizer plus ``unet`` and ``scheduler``.

    ``dtype_of_teacher=False`` takes float32 copies of a half-precision VAE and text encoder (for export)."""
    from diffusers import StableDiffusionPipeline

    vae, text_encoder = teacher.pipe.vae, teacher.pipe.text_encoder
    if not dtype_of_teacher:
        vae, text_encoder = float32(vae), float32(text_encoder)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=teacher.pipe.tokenizer,
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """Save (N, 3, H, W) images in [0, 1] as one PNG grid."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float().cpu(), str(path), nrow=max(1, nrow), padding=2, pad_value=1.0)


def verify_pipeline(folder: Path, prompt: str, steps: int, guidance_scale: float) -> torch.Tensor:
    """Reload ``folder`` with plain DiffusionPipeline.from_pretrained and sample once; returns the image."""
    from diffusers import DiffusionPipeline

    with quiet_loading():
        pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    if not torch.isfinite(image).all():
        raise RuntimeError(f"export check failed: {folder} produced non-finite pixels")
    return image


def export_pipeline(teacher, unet, scheduler, folder: Path, steps: int, guidance_scale: float,
                    info: dict, prompt: str) -> Path:
    """Write a StableDiffusionPipeline folder for ``unet`` + ``scheduler``, verified by reload-and-sample.

    ``info`` (method, steps, guidance, ...) is stored as ``diffdistill.json`` beside model_index.json.
    A UNet without a guidance embedding is saved with an inert one (``with_inert_guidance_embedding``).
    """
    from .students import guidance_is_baked, with_inert_guidance_embedding

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # A student with its guidance baked in must not be guided again by the pipeline's default 7.5.
    baked = guidance_is_baked(unet)
    unet = with_inert_guidance_embedding(unet.to(torch.float32))
    # Every component is saved in float32 (training may hold the teacher's VAE and text encoder in half
    # precision): a folder of mixed dtypes fails in a plain StableDiffusionPipeline call.
    pipe = build_pipeline(teacher, unet, scheduler, dtype_of_teacher=False)
    try:
        with quiet_loading():
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / EXPORT_INFO).write_text(json.dumps({**info, "num_inference_steps": steps,
                                                   "recommended_guidance_scale": guidance_scale,
                                                   "guidance_baked": baked}, indent=2) + "\n")
        verify_pipeline(tmp, prompt, steps, guidance_scale)
        replace_dir(tmp, folder)
    except BaseException:  # an error or a signal (Terminated, KeyboardInterrupt): no temporary folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def export_lora(teacher, lora_state: dict, folder: Path, scheduler, steps: int, prompt: str) -> Path:
    """Write a diffusers-format LoRA (``pytorch_lora_weights.safetensors``) and check that
    ``load_lora_weights`` on the teacher pipeline accepts it and samples."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        StableDiffusionPipeline.save_lora_weights(str(tmp), unet_lora_layers=lora_state, safe_serialization=True)
        scheduler.save_pretrained(str(tmp / "scheduler"))
        # A fresh copy of the teacher from disk, exactly as a user would load it.
        with quiet_loading():
            pipe = StableDiffusionPipeline.from_pretrained(teacher.source, safety_checker=None,
                                                           requires_safety_checker=False)
            pipe.load_lora_weights(str(tmp))
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = type(scheduler).from_config(scheduler.config)
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=1.0,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
        if not torch.isfinite(image).all():
            raise RuntimeError(f"LoRA check failed: {folder} produced non-finite pixels")
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_model_card(folder: Path, title: str, details: dict, usage: str, table_md: str | None) -> None:
    """A README.md model card: what the student is, how to sample it, and its measured quality."""
    lines = [f"# {title}", "", "Distilled with diffdistill, a diffusion-model distillation suite.", "",
             "## Details", ""]
    lines += [f"- **{k}**: {v}" for k, v in details.items()]
    lines += ["", "## Usage", "", "```python", usage.strip(), "```", ""]
    if table_md:
        lines += ["## Measured quality", "", table_md.strip(), ""]
    (Path(folder) / "README.md").write_text("\n".join(lines))
