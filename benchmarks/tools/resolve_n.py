#!/usr/bin/env python
"""How many samples per cell resolve a difference: interval widths and the paired verdict against N.

Samples the two step counts of one pipeline once at the largest N (through ``diffdistill bench``, so the
cells land in its cache and a later bench at that N reuses them), then for every smaller N takes the first
N samples (exactly the bench's seeds 0..N-1) and reports each cell's FID interval, the interval of the
paired difference and whether it is resolved. Writes JSON and prints a Markdown table.

    python benchmarks/tools/resolve_n.py assets/digits-sd --steps 4,50 --ns 200,500,1000,2000 \
        --guidance 1.5 --output benchmarks/resolve_n/digits-sd_ddim_4_vs_50.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffdistill.eval import cache, metrics  # noqa: E402
from diffdistill.eval.bench import (  # noqa: E402
    Instruments,  # noqa: E402
    load_reference_set,
    run_bench,
)
from diffdistill.eval.config import DEFAULT_CACHE_DIR, BenchConfig  # noqa: E402
from diffdistill.eval.fidelity import extractor_weights, resolve_device  # noqa: E402


def measure(pipeline: str, steps: tuple[int, int], ns: list[int], guidance: float | None, scheduler: str,
            bootstrap: int, confidence: float, cache_dir: str, batch_size: int, device: str) -> list[dict]:
    """One row per N: both cells' FID with intervals and the paired difference (first minus second)."""
    with tempfile.TemporaryDirectory(prefix="resolve-n-") as tmp:
        cfg = BenchConfig(pipelines=[pipeline], output=str(Path(tmp) / "bench"), steps=list(steps),
                          guidance=guidance, num_samples=max(ns), schedulers=scheduler, bootstrap=bootstrap,
                          confidence=confidence, cache_dir=cache_dir, batch_size=batch_size, device=device)
        report = run_bench(cfg)
    keys = {r["steps"]: r["cache_key"] for r in report["lines"][0]["results"]}
    full = {s: metrics.SampleSet.from_tensors(cache.load_entry(cfg.cache_path, "cells", keys[s])[0]) for s in steps}
    inst = Instruments(cfg, resolve_device(device), extractor_weights(cfg.feature_extractor, cfg.inception_weights,
                                                                      cfg.classifier), True)
    ref = load_reference_set(cfg, inst)
    rows = []
    for n in sorted(ns):
        rs = metrics.Resampler(n, len(ref), bootstrap, cfg.seed)
        refstats = metrics.ReferenceStats(ref.features, rs.ref)
        first_n = torch.arange(n)
        a, b = (metrics.cell_stats(full[s].subset(first_n), ref, refstats, rs.gen, confidence, cfg.kid_subset_size,
                                   cfg.prc_neighborhood) for s in steps)
        diff = metrics.compare(a, b, confidence)["fid"]
        rows.append({"n": n, f"fid_{steps[0]}": a.summary["fid"], f"fid_{steps[0]}_ci": a.summary["fid_ci"],
                     f"fid_{steps[1]}": b.summary["fid"], f"fid_{steps[1]}_ci": b.summary["fid_ci"],
                     "difference": diff["difference"], "difference_ci": diff["ci"], "resolved": diff["resolved"]})
    return rows


def markdown(rows: list[dict], steps: tuple[int, int], confidence: float) -> str:
    """The rows as a Markdown table."""
    a, b = steps
    out = [f"| N | FID {a} steps [{confidence:.0%} CI] | FID {b} steps [CI] | {a} − {b} [CI] | width | resolved |",
           "|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ci_a, ci_b, ci_d = r[f"fid_{a}_ci"], r[f"fid_{b}_ci"], r["difference_ci"]
        out.append(f"| {r['n']} | {r[f'fid_{a}']:.3f} [{ci_a[0]:.3f}, {ci_a[1]:.3f}] | {r[f'fid_{b}']:.3f} "
                   f"[{ci_b[0]:.3f}, {ci_b[1]:.3f}] | {r['difference']:+.3f} [{ci_d[0]:+.3f}, {ci_d[1]:+.3f}] | "
                   f"{ci_d[1] - ci_d[0]:.3f} | {'yes' if r['resolved'] else 'no'} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", help="diffusers pipeline folder")
    p.add_argument("--steps", default="4,50", help="the two step counts to tell apart (default: %(default)s)")
    p.add_argument("--ns", default="200,500,1000,2000", help="sample counts to measure (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the folder's recommended one, else 7.5)")
    p.add_argument("--scheduler", default="default", help="scheduler spec as in bench (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (default: %(default)s)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval level (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=100, help="images per pipeline call (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="bench cache folder (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None, help="JSON file to write (default: print only)")
    args = p.parse_args(argv)
    steps = tuple(int(s) for s in args.steps.split(","))
    if len(steps) != 2:
        p.error("--steps needs exactly two step counts")
    ns = [int(n) for n in args.ns.split(",")]
    rows = measure(args.pipeline, steps, ns, args.guidance, args.scheduler, args.bootstrap, args.confidence,
                   args.cache_dir, args.batch_size, args.device)
    print(markdown(rows, steps, args.confidence), end="")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"pipeline": args.pipeline, "steps": steps, "scheduler": args.scheduler,
                                           "guidance": args.guidance, "bootstrap": args.bootstrap,
                                           "confidence": args.confidence, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
