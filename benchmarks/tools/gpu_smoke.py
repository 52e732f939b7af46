#!/usr/bin/env python
"""GPU smoke test of the real workload, with no downloads.

``--family sdxl`` / ``--family sd3`` run the same on an SDXL-sized (2.6B UNet, 1024 px) or SD3-medium-sized
(2B MMDiT, 1024 px, flow matching, no T5) random pipeline in bf16 with gradient checkpointing: LCM with one
baked teacher guidance scale (SD3's transformer has no guidance embedding), a few steps, export, reload, sample.

Builds a Stable-Diffusion-1.5-sized UNet2DConditionModel from its config (random weights, ~860M
parameters), a small VAE with SD's 8x downsampling and a one-layer 768-wide CLIP text encoder, saves
them as a StableDiffusionPipeline, then runs ``diffdistill distill --method lcm`` on 64x64x4 latents
(512x512 images) with fp16 mixed precision and SDPA attention (xformers too when installed), and
prints it/s, peak GPU memory and the loss trend; the 4-step export is reloaded and sampled.

    python benchmarks/tools/gpu_smoke.py --output /tmp/smoke          # GPU: SD-1.5 size, 50 steps
    python benchmarks/tools/gpu_smoke.py --tiny --output /tmp/smoke   # CPU: tiny sizes, same code path
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

def _large_family(cuda: bool, tiny: bool) -> dict:
    """SDXL / SD3 sized runs: bf16 and gradient checkpointing on a GPU, the native 1024 px, one baked guidance."""
    return {"mixed_precision": "bf16" if cuda else "no", "gradient_checkpointing": cuda,
            "resolution": 0, "w_min": 4.0, "w_max": 4.0, "num_ddim_timesteps": 50}


FAMILY_SETTINGS = {"sdxl": _large_family, "sd3": _large_family}


def main(argv: list[str] | None = None) -> int:
    from diffdistill.tiny_pipelines import save_family_sized_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True, help="folder for the run and results.json")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and fp32 on CPU (the tested path)")
    p.add_argument("--steps", type=int, default=50, help="distillation steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default: %(default)s)")
    p.add_argument("--family", choices=["sd15", "sdxl", "sd3"], default="sd15",
                   help="teacher family and size: SD 1.5, SDXL or SD3-medium (default: %(default)s)")
    args = p.parse_args(argv)

    from diffdistill.config import build_run_config
    from diffdistill.distill import run_distill

    cuda = torch.cuda.is_available() and not args.tiny
    import importlib.util

    xformers = cuda and importlib.util.find_spec("xformers") is not None
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher"
        t0 = time.time()
        save_family_sized_pipeline(args.family, teacher, args.tiny)
        build_s = time.time() - t0
        run = build_run_config({}, {
            "method": "lcm", "teacher": str(teacher), "output": str(args.output / "run"), "steps": 4,
            "overwrite": True, "benchmark_samples": 0,
            "max_train_steps": args.steps, "batch_size": args.batch_size, "learning_rate": 1e-5,
            "lr_warmup_steps": 0, "mixed_precision": "fp16" if cuda else "no", "enable_xformers": xformers,
            "checkpointing_steps": 0, "validation_steps": 0, "log_every": 1, "resolution": 16 if args.tiny else 512,
            "dataset": "digits", "w_min": 3.0, "w_max": 9.0, "ema_decay": 0.95,
            **(FAMILY_SETTINGS[args.family](cuda, args.tiny) if args.family != "sd15" else {}),
        })
        t1 = time.time()
        summary = run_distill(run)
        total_s = time.time() - t1
    rows = list(csv.DictReader((args.output / "run" / "logs.csv").open()))
    losses = [float(r["loss"]) for r in rows]
    k = max(1, len(losses) // 5)
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "mixed_precision": run.train.mixed_precision, "attention": "xformers" if xformers else "sdpa",
        "family": args.family, "batch_size": args.batch_size, "latents": "4x64x64" if not args.tiny else "4x8x8",
        "train_steps": summary["train_steps"], "it_per_s": float(rows[-1]["it_per_s"]),
        "peak_memory_mb": summary["peak_memory_mb"], "memory_kind": summary["memory_kind"],
        "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
        "loss_trend": [round(x, 5) for x in losses[:: max(1, len(losses) // 10)]],
        "build_teacher_s": round(build_s, 1), "distill_and_export_s": round(total_s, 1),
        "export": summary.get("pipeline"),
    }
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    cls, sub = (SD3Transformer2DModel, "transformer") if args.family == "sd3" else (UNet2DConditionModel, "unet")
    result["unet_params_M"] = round(sum(p.numel() for p in cls.from_pretrained(
        str(args.output / "run" / "pipeline"), subfolder=sub).parameters()) / 1e6, 1)
    if args.family != "sd15":
        result["latents"] = "native size of the family (1024 px)" if not args.tiny else "tiny"
    (args.output / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
