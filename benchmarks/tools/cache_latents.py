#!/usr/bin/env python
"""What ``--cache-latents`` saves per training step (issue #21), measured on the trainer itself.

The LCM preset of digits-SD (``train_scripts/digits/lcm.yaml``: batch 64, full UNet, student EMA) trains
``--warmup`` steps and then ``--steps`` timed steps, in ``--rounds`` rounds, once on images (a VAE encoder pass per batch) and once on
latents cached before training (``LatentCache``: the posterior mean and std, sampled per step); checkpoints and
sample grids are off so only the loop is timed. The one-off cost of encoding the dataset is timed too. Both runs
draw the same noise, so their losses match (``tests/test_data.py``); the JSON records the last logged loss of each.

    python benchmarks/tools/cache_latents.py --output benchmarks/cache_latents
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def measure(teacher, accelerator, dataset, preset: dict, cached: bool, steps: int, warmup: int, out: Path) -> dict:
    """Seconds per step over ``steps`` timed steps (after ``warmup``) and the last logged loss."""
    from diffdistill.config import build_run_config
    from diffdistill.methods import get_method
    from diffdistill.trainer import Trainer

    run = build_run_config(preset, {"output": str(out), "max_train_steps": warmup + steps, "checkpointing_steps": 0,
                                    "validation_steps": 0, "max_train_minutes": 0, "log_every": warmup + steps,
                                    "cache_latents": cached})
    method = get_method(run.method).method_cls(get_method(run.method).config_cls(**run.method_args), run)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(run, method, teacher, out, dataset, accelerator=accelerator)
    trainer.save_checkpoint = lambda: None  # time the loop only
    trainer.save_validation_grid = lambda name: None
    marks, after = {}, method.after_step

    def timed_after_step(step):
        after(step)
        if step in (warmup, warmup + steps):
            marks[step] = time.perf_counter()

    method.after_step = timed_after_step
    result = trainer.fit()
    accelerator.free_memory()
    return {"s_per_step": (marks[warmup + steps] - marks[warmup]) / steps, "last_loss": result.last_logs.get("loss")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True, help="folder for cache_latents.json and .md")
    p.add_argument("--preset", default=str(ROOT / "train_scripts" / "digits" / "lcm.yaml"), help="distill preset")
    p.add_argument("--steps", type=int, default=25, help="timed steps per case and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds of both cases, in alternating order")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffdistill.config import load_yaml
    from diffdistill.data import build_dataset
    from diffdistill.distill import cache_latents
    from diffdistill.teachers import load_teacher
    from diffdistill.trainer import make_accelerator

    preset = load_yaml(args.preset)
    preset["teacher"] = str(ROOT / preset.get("teacher", "assets/digits-sd"))
    accelerator = make_accelerator(preset_config(preset).train)
    teacher = load_teacher(preset["teacher"], device=accelerator.device)
    images = build_dataset(preset_config(preset).data, teacher.image_size)
    load = os.getloadavg()
    t0 = time.perf_counter()
    latents = cache_latents(images, teacher, preset["train"]["batch_size"], accelerator)
    encode_s = time.perf_counter() - t0
    # The part of a step the cache removes, timed alone: a batch's VAE encoder pass against a draw from its cached
    # posterior, interleaved (medians of 20 pairs).
    batch = torch.stack([images[i]["pixel_values"] for i in range(preset["train"]["batch_size"])])
    mean, std = teacher.encode_posterior(batch)
    encoder, draw = [], []
    for _ in range(20):
        t = time.perf_counter()
        teacher.encode_images(batch)
        encoder.append(time.perf_counter() - t)
        t = time.perf_counter()
        teacher.sample_latents(mean, std)
        draw.append(time.perf_counter() - t)
    parts = {"vae_encoder_pass_s": round(statistics.median(encoder), 4),
             "cached_posterior_draw_s": round(statistics.median(draw), 4)}
    # Rounds alternate the order of the two cases, so that a load that changes during the run weighs on both.
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = [("images", images, False), ("cached_latents", latents, True)][:: 1 if r % 2 == 0 else -1]
            rounds.append({name: measure(teacher, accelerator, data, preset, cached, args.steps, args.warmup,
                                         Path(tmp) / f"{name}-{r}") for name, data, cached in order})
    cases = {name: {"s_per_step": statistics.median(rd[name]["s_per_step"] for rd in rounds),
                    "last_loss": rounds[0][name]["last_loss"]} for name in ("images", "cached_latents")}
    saving = statistics.median(1 - rd["cached_latents"]["s_per_step"] / rd["images"]["s_per_step"] for rd in rounds)
    report = {"command": "python benchmarks/tools/cache_latents.py " + " ".join(argv or sys.argv[1:]),
              "preset": str(Path(args.preset).relative_to(ROOT)), "batch_size": preset["train"]["batch_size"],
              "images": len(images), "timed_steps": args.steps, "warmup_steps": args.warmup,
              "rounds": rounds, "encode_dataset_s": round(encode_s, 2), "cases": cases, "per_batch": parts,
              "step_time_saving": round(saving, 4),
              "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "load_average_before": [round(x, 2) for x in load], "load_average_after": [
                  round(x, 2) for x in os.getloadavg()]}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "cache_latents.json").write_text(json.dumps(report, indent=2) + "\n")
    a, b = cases["images"]["s_per_step"], cases["cached_latents"]["s_per_step"]
    (args.output / "README.md").write_text(
        f"# --cache-latents on digits-SD\n\n`{report['command']}`\n\n"
        f"`{report['preset']}` (batch {report['batch_size']}), {args.rounds} rounds of {args.steps} timed steps "
        f"after {args.warmup} per case (medians below; each round in `cache_latents.json`), "
        f"{report['torch_threads']} torch threads, CPU; load average {report['load_average_before']} before, "
        f"{report['load_average_after']} after (a shared machine: other jobs ran beside it).\n\n"
        f"| data | s/step | last loss |\n|---|---:|---:|\n"
        f"| images (VAE encoder every step) | {a:.3f} | {cases['images']['last_loss']:.5f} |\n"
        f"| cached latents | {b:.3f} | {cases['cached_latents']['last_loss']:.5f} |\n\n"
        f"Step time saved (median over rounds): {100 * saving:.1f}%. Timed alone, a batch's VAE encoder pass takes "
        f"{parts['vae_encoder_pass_s']:.3f} s and a draw from its cached posterior "
        f"{parts['cached_posterior_draw_s']:.4f} s (medians of 20 interleaved pairs). Encoding the {len(images)} images once took {encode_s:.1f} s.\n")
    print(json.dumps(report, indent=2))
    return 0


def preset_config(preset: dict):
    """The preset as a RunConfig (its train and data parts)."""
    from diffdistill.config import build_run_config

    return build_run_config(preset, {"output": "unused"})


if __name__ == "__main__":
    raise SystemExit(main())
