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


DIGITS_FLOW = ROOT / "assets" / "digits-flow"


def test_digits_flow_is_small_safetensors_and_sd3_without_t5():
    import json

    files = [p for p in DIGITS_FLOW.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 15 * 2**20  # the budget
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pth")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    index = json.loads((DIGITS_FLOW / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    assert json.loads((DIGITS_FLOW / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0


def test_digits_flow_draws_the_prompted_digit_with_plain_diffusers():
    """Loaded as diffusers loads SD3 without T5 (text_encoder_3=None, tokenizer_3=None), 20 Euler steps."""
    import json

    from diffusers import DiffusionPipeline

    from diffdistill.eval.digits_classifier import load_digits_classifier

    pipe = DiffusionPipeline.from_pretrained(str(DIGITS_FLOW), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a handwritten digit {k}" for k in range(10)] * 2
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    guidance = json.loads((DIGITS_FLOW / "diffdistill.json").read_text())["recommended_guidance_scale"]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=guidance, generator=gens, output_type="pt").images
    assert images.shape == (20, 3, 32, 32)
    pred = load_digits_classifier()(images).argmax(1)
    accuracy = (pred == torch.arange(10).repeat(2)).float().mean().item()
    assert accuracy >= 0.9, accuracy
