#!/usr/bin/env python
"""Classic 2D SDS on digits-SD: for each of the ten digit prompts, ``diffdistill sds`` optimises
``--num-images`` latents (one seed each) and the shipped digits classifier judges every result.
Writes results.json, results.md and one result strip per digit (digit_K.png, progress_K.png).

    python benchmarks/tools/sds_digits.py --output benchmarks/sds          # ten prompts x 8 seeds
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from diffdistill.digits import DIGIT_PROMPTS, caption_to_label
from diffdistill.sds_optimize import SDSOptimizeConfig, run_sds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True, help="folder for results.json/.md and the PNG strips")
    p.add_argument("--num-images", type=int, default=8, help="seeds per prompt (default: %(default)s)")
    p.add_argument("--iters", type=int, default=300, help="SDS steps per prompt (default: %(default)s)")
    p.add_argument("--teacher-guidance-scale", type=float, default=7.5, help="teacher CFG (default: %(default)s)")
    p.add_argument("--teacher", default="assets/digits-sd", help="teacher pipeline folder (default: %(default)s)")
    args = p.parse_args(argv)

    rows, t0 = [], time.time()
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for prompt in DIGIT_PROMPTS:
            digit = caption_to_label(prompt)
            cfg = SDSOptimizeConfig(teacher=args.teacher, prompt=prompt, output=str(Path(tmp) / f"d{digit}"),
                                    num_images=args.num_images, iters=args.iters,
                                    teacher_guidance_scale=args.teacher_guidance_scale, seed=digit)
            t = time.time()
            res = run_sds(cfg)
            rows.append({"prompt": prompt, "digit": digit, "predicted": res["predicted_digits"],
                         "accuracy": res["accuracy"], "seconds": round(time.time() - t, 1)})
            shutil.copy(Path(cfg.output) / "result.png", args.output / f"digit_{digit}.png")
            shutil.copy(Path(cfg.output) / "progress.png", args.output / f"progress_{digit}.png")
            print(f"{prompt!r}: {res['accuracy']:.3f} {res['predicted_digits']}", flush=True)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("prompt", "output", "seed", "overwrite")}
    total = sum(len(r["predicted"]) for r in rows)
    correct = sum(round(r["accuracy"] * len(r["predicted"])) for r in rows)
    summary = {"settings": settings, "seeds": "digit d uses seed d (its num_images latents drawn from that seed)",
               "images": total, "recognised": correct, "rate": correct / total,
               "prompts_all_correct": sum(r["accuracy"] == 1.0 for r in rows), "minutes": round((time.time() - t0) / 60, 2),
               "rows": rows}
    (args.output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = ["| prompt | recognised | predictions |", "|---|---:|---|"]
    md += [f"| {r['prompt']} | {r['accuracy']:.3f} | {' '.join(map(str, r['predicted']))} |" for r in rows]
    md.append(f"| **all** | **{summary['rate']:.3f}** ({correct}/{total}) | |")
    (args.output / "results.md").write_text("\n".join(md) + "\n")
    print(f"recognised {correct}/{total} = {summary['rate']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
