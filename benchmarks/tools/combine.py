#!/usr/bin/env python
"""Merge several ``diffdistill bench`` reports into one table and one FID-vs-steps plot.

Students are benchmarked with their own scheduler preset and the teacher with its training-free
solvers, in separate ``bench`` runs; this puts them side by side. It refuses reports whose samples are
not comparable (different sample counts, seeds, prompts, reference, feature extractor or intervals); v2
reports share one real-data floor (the first report's) and keep their comparisons.

    python benchmarks/tools/combine.py --output benchmarks/lcm --title "LCM on digits-SD" \
        benchmarks/teacher/report.json runs/lcm/bench/report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffdistill.eval.report import comparisons_markdown, plot_report, report_markdown_table  # noqa: E402

MUST_MATCH = (("config", "num_samples"), ("config", "seed"), ("prompts", "source"), ("reference", "name"),
              ("feature_extractor",), ("intervals", "confidence"), ("intervals", "bootstrap"), ("real_floor", "mode"))


def _get(report: dict, path: tuple[str, ...]):
    for key in path:
        report = report.get(key, {}) if isinstance(report, dict) else {}
    return report


def combine(reports: list[dict], labels: list[str] | None = None) -> dict:
    """One report whose lines are all the reports' lines (relabelled when ``labels`` are given)."""
    first = reports[0]
    for r in reports[1:]:
        for path in MUST_MATCH:
            if _get(r, path) != _get(first, path):
                raise SystemExit(f"reports differ in {'.'.join(path)}: {_get(first, path)!r} vs {_get(r, path)!r}")
    merged = dict(first)
    merged["lines"] = []
    for i, r in enumerate(reports):
        for line in r["lines"]:
            line = dict(line)
            if labels:
                line["label"] = labels[i]
            merged["lines"].append(line)
    merged["prompt_accuracy"] = all(r.get("prompt_accuracy") for r in reports)
    merged["comparisons"] = [c for r in reports for c in r.get("comparisons") or []]
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="report.json files of diffdistill bench")
    p.add_argument("--output", type=Path, required=True, help="folder for report.md, report.json and fid_vs_steps.png")
    p.add_argument("--title", default="diffdistill results", help="heading of report.md (default: %(default)s)")
    p.add_argument("--labels", default="", help="comma list, one label per report (default: keep the reports' labels)")
    p.add_argument("--note", default="", help="a paragraph put under the heading (default: none)")
    args = p.parse_args(argv)
    reports = [json.loads(Path(r).read_text()) for r in args.reports]
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if labels and len(labels) != len(reports):
        p.error(f"--labels has {len(labels)} names for {len(reports)} reports")
    merged = combine(reports, labels)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "report.json").write_text(json.dumps(merged, indent=2) + "\n")
    plot_report(merged, args.output / "fid_vs_steps.png")
    cfg, env = merged["config"], merged["environment"]
    text = [f"# {args.title}", ""]
    if args.note:
        text += [args.note, ""]
    text += [f"{cfg['num_samples']} samples per cell (seeds {cfg['seed']}..{cfg['seed'] + cfg['num_samples'] - 1}, the same "
             f"for every line), FID/KID/IS with the `{merged['feature_extractor']}` feature extractor against "
             f"{merged['reference']['name']}; {env['device_name']}, {env['torch_threads']} torch threads. Sources: "
             + ", ".join(f"`{r}`" for r in args.reports) + ".", "", report_markdown_table(merged), "",
             comparisons_markdown(merged), "![FID and latency against steps](fid_vs_steps.png)", ""]
    (args.output / "report.md").write_text("\n".join(text))
    print((args.output / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
