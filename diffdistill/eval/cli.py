"""``diffdistill bench``'s command line, generated from :class:`BenchConfig`'s fields (help and default there)."""

from __future__ import annotations

import argparse
import dataclasses

from diffdistill.eval.config import INTERVALS_HELP, BenchConfig

DESCRIPTION = (
    "Quality and speed of diffusers pipelines against the number of sampling steps: FID, KID, IS, precision, "
    "recall, prompt accuracy and CLIP score, each with an interval, beside the real-data floor at the same N "
    "(real images against the reference), plus wall time per image and peak memory. Writes report.json, "
    "report.md, fid_vs_steps.png and sample grids. " + INTERVALS_HELP
)
EPILOG = """examples:
  diffdistill bench assets/digits-sd --steps 1,4,50 --compare 4:50 --output reports/teacher
  diffdistill bench runs/lcm/pipeline assets/digits-sd --labels lcm,teacher --steps 1,2,4,8,50 \\
      --compare lcm@4:teacher@50 --output reports/lcm-vs-teacher
  diffdistill bench runs/a/pipeline runs/b/pipeline --steps 1,2,4 --compare pipelines --output reports/a-vs-b"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to an argparse ``subparsers``: one flag per BenchConfig field; sets ``func=cmd_bench``."""
    from diffdistill.cli import _add_fields

    p = subparsers.add_parser("bench", help="FID/KID/IS/precision/recall with intervals, latency and memory of "
                                            "pipelines against sampling steps",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    pipelines = next(f for f in dataclasses.fields(BenchConfig) if f.name == "pipelines")
    p.add_argument("pipelines", nargs="+", metavar="PIPELINE_DIR", help=pipelines.metadata["help"])
    _add_fields(p, BenchConfig, {"pipelines"})
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``bench`` from parsed arguments; print the table; 0 if every cell ran, 1 if one failed."""
    from diffdistill.config import build_dataclass
    from diffdistill.eval.bench import run_bench
    from diffdistill.eval.report import comparisons_markdown, report_markdown_table

    values = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    cfg = build_dataclass(BenchConfig, values, "bench options")
    report = run_bench(cfg)  # SIGTERM: errors.Terminated, one line and 143 from diffdistill's main
    print(report_markdown_table(report), end="")
    comparisons = comparisons_markdown(report)
    if comparisons:
        print("\n" + comparisons, end="")
    print(f"report written to {report['output_dir']}")
    failed = [r for line in report["lines"] for r in line["results"] if r.get("error")]
    return 1 if failed else 0
