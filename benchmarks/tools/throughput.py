#!/usr/bin/env python
"""Training throughput and peak memory of every distillation preset on digits-SD.

Each preset runs as its own ``diffdistill distill`` process (so peak memory is its own) for
``--steps`` optimiser steps with checkpoints, validation grids and the card benchmark off; it/s is
measured between step ``--warmup`` and the last step from the run's logs.csv.

    python benchmarks/tools/throughput.py --output benchmarks/throughput
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {
    "lcm (full UNet)": "train_scripts/digits/lcm.yaml",
    "lcm (LoRA r16)": "train_scripts/digits/lcm_lora.yaml",
    "progressive (halving stage)": "train_scripts/digits/progressive.yaml",
    "add (LADD)": "train_scripts/digits/add.yaml",
    "dmd": "train_scripts/digits/dmd.yaml",
    "sds (one-step student)": "train_scripts/digits/sds.yaml",
}


def measure(name: str, preset: str, steps: int, warmup: int, teacher: str) -> dict:
    """Run one preset for ``steps`` steps; return it/s, seconds/step, batch size and peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "diffdistill.cli", "distill", "--config", str(ROOT / preset), "--teacher", teacher,
               "--output", str(out), "--max-train-steps", str(steps), "--checkpointing-steps", "0",
               "--validation-steps", "0", "--benchmark-samples", "0", "--log-every", "1"]
        if "progressive" in preset:  # staged: its length is its stages'; time the first halving stage
            cmd += ["--guidance-iters", "1", "--iters-per-stage", str(steps), "--steps", "32"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name}: distill failed: {r.stderr.strip().splitlines()[-1]}")
        rows = list(csv.DictReader((out / "logs.csv").open()))
        summary = json.loads((out / "summary.json").read_text())
        config = (out / "config.yaml").read_text()
    t = {int(r["step"]): float(r["elapsed_s"]) for r in rows}
    it_s = (steps - warmup) / (t[steps] - t[warmup])
    batch = next(int(line.split(":")[1]) for line in config.splitlines() if line.strip().startswith("batch_size:"))
    return {"method": name, "preset": preset, "batch_size": batch, "it_per_s": round(it_s, 3),
            "images_per_s": round(it_s * batch, 1), "s_per_step": round(1 / it_s, 3),
            "peak_memory_mb": summary["peak_memory_mb"], "memory_kind": summary["memory_kind"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "throughput",
                   help="writes OUTPUT.json and OUTPUT.md (default: %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="optimiser steps per preset (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="steps excluded from the rate (default: %(default)s)")
    p.add_argument("--teacher", default=str(ROOT / "assets" / "digits-sd"), help="teacher (default: %(default)s)")
    args = p.parse_args(argv)
    if not 0 < args.warmup < args.steps:
        p.error(f"--warmup must be in (0, --steps), got {args.warmup}")
    rows = []
    for name, preset in PRESETS.items():
        rows.append(measure(name, preset, args.steps, args.warmup, args.teacher))
        print(json.dumps(rows[-1]), flush=True)
    env = {"machine": platform.machine(), "processor": platform.processor() or "unknown",
           "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(), "torch": torch.__version__}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    lines = ["# Training throughput on digits-SD", "",
             f"`python benchmarks/tools/throughput.py` — {args.steps} steps per preset, rate over steps "
             f"{args.warmup}..{args.steps}; {env['torch_threads']} torch threads, CUDA: {env['cuda']}.", "",
             "| method | preset | batch | it/s | images/s | s/step | peak memory (MB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | `{r['preset']}` | {r['batch_size']} | {r['it_per_s']} | {r['images_per_s']} | "
              f"{r['s_per_step']} | {r['peak_memory_mb']} ({r['memory_kind']}) |" for r in rows]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
