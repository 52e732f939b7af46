"""The shipped digits-SD teacher and digits classifier: plain diffusers loads it and it draws the prompted digits."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DIGITS_SD = ROOT / "assets" / "digits-sd"


def test_digits_sd_is_small_and_safetensors_only():
    files = [p for p in DIGITS_SD.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25 * 2**20
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pth")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)


def test_digits_sd_draws_the_prompted_digit_with_plain_diffusers():
    from diffusers import DiffusionPipeline

    from diffdistill.eval.digits_classifier import load_digits_classifier

    pipe = DiffusionPipeline.from_pretrained(str(DIGITS_SD))
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a handwritten digit {k}" for k in range(10)] * 2
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=1.5, generator=gens, output_type="pt").images
    assert images.shape == (20, 3, 32, 32)
    pred = load_digits_classifier()(images).argmax(1)
    accuracy = (pred == torch.arange(10).repeat(2)).float().mean().item()
    assert accuracy >= 0.9, accuracy
