#!/usr/bin/env python
"""Pack the GPU runs of run.sh into at most 8 files for the trip back: results.tar.gz (configs, logs,
summaries, model cards, sample grids, bench reports) and the UNet/LoRA weights of the best variant of
each method (by FID at its target step count), one file each.

    python benchmarks/tools/gpu_long_collect.py WORK_DIR OUT_DIR [RUN ...]   # RUNs: copy exactly these runs' UNets
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

# method: (bench report, candidate labels, steps whose FID picks the best variant)
PICK = {"lcm": ("bench_lcm", ["lcm_w1-3", "lcm_w1-8"], 4), "add": ("bench_add", ["add", "add_ema"], 1),
        "dmd": ("bench_dmd", ["dmd", "dmd_ema_reg"], 1)}
KEEP = ("config.yaml", "logs.csv", "summary.json", "results.json", "pipeline/README.md",
        "pipeline/diffdistill.json", "pipeline/scheduler/scheduler_config.json")


def fid_of(report: Path, label: str, steps: int) -> float:
    try:
        lines = json.loads(report.read_text())["lines"]
    except (OSError, ValueError, KeyError):
        return float("inf")
    for line in lines:
        if line["label"] == label:
            return next((r["fid"] for r in line["results"] if r["steps"] == steps), float("inf"))
    return float("inf")


def main(work: str, out: str, *runs: str) -> None:
    w, o = Path(work), Path(out)
    o.mkdir(parents=True, exist_ok=True)
    with tarfile.open(o / "results.tar.gz", "w:gz") as tar:
        for p in sorted(w.iterdir()):
            if p.is_file() and p.suffix in (".txt", ".log"):
                tar.add(p, p.name)
            elif p.is_dir() and p.name.startswith("bench_"):
                tar.add(p, p.name)
            elif p.is_dir():
                for rel in KEEP:
                    if (p / rel).exists():
                        tar.add(p / rel, f"{p.name}/{rel}")
                for stage in sorted((p / "stages").glob("*_steps")):
                    for rel in ("README.md", "diffdistill.json", "scheduler/scheduler_config.json"):
                        if (stage / rel).exists():
                            tar.add(stage / rel, f"{p.name}/stages/{stage.name}/{rel}")
                for grid in sorted((p / "samples").glob("*.png")):
                    tar.add(grid, f"{p.name}/samples/{grid.name}")
    weights = {name: w / name / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors" for name in runs}
    for method, (report, labels, steps) in ({} if runs else PICK).items():
        fids = {lab: fid_of(w / report / "report.json", lab, steps) for lab in labels}
        best = min(fids, key=fids.get)
        weights[f"{method}__{best}"] = w / best / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    if not runs:
        weights["progressive__4_steps"] = w / "progressive/stages/4_steps/unet/diffusion_pytorch_model.safetensors"
    lora = sorted((w / "lcm_lora" / "lora").glob("*.safetensors"))
    if lora:
        weights["lcm_lora__lora"] = lora[0]
    for name, src in weights.items():
        if src.exists():
            shutil.copy(src, o / f"{name}.safetensors")
    print(json.dumps({p.name: p.stat().st_size for p in sorted(o.iterdir())}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
