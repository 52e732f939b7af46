"""Plot FID, precision and recall (each with its 95% interval) of a bench report's lines against a number each
label names (training steps, a guidance scale, ...):

    python benchmarks/tools/plot_vs_x.py benchmarks/dmd2_cpu_length/report.json OUT.png \
        --x nogan-900=900,nogan-1300=1300 --xlabel "generator steps"

Intervals are drawn as bars, as in bench's own fid_vs_steps.png: FID's basic-bootstrap interval may lie below its
point estimate (see report.md), so it is drawn as it is, not as an error around the point.
"""
import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path, help="report.json of diffdistill bench")
    ap.add_argument("output", type=Path, help="PNG to write")
    ap.add_argument("--x", required=True, help="LABEL=VALUE,...: the lines to plot and their x values")
    ap.add_argument("--xlabel", default="x", help="the x axis' name")
    ap.add_argument("--steps", type=int, default=1, help="the step count of the cells to plot")
    args = ap.parse_args()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs = {k: float(v) for k, v in (p.split("=") for p in args.x.split(","))}
    rows = []
    for line in json.loads(args.report.read_text())["lines"]:
        cell = next((r for r in line["results"] if r["steps"] == args.steps and "fid" in r), None)
        if line["label"] in xs and cell:
            rows.append((xs[line["label"]], cell))
    rows.sort(key=lambda r: r[0])
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    for ax, key in [(a, "fid"), (b, "precision"), (b, "recall")]:
        (handle,) = ax.plot([x for x, _ in rows], [c[key] for _, c in rows], marker="o", label=key)
        for x, c in rows:
            ax.plot([x, x], c[f"{key}_ci"], color=handle.get_color(), lw=3, alpha=0.45, solid_capstyle="butt")
    a.set(xlabel=args.xlabel, ylabel=f"FID at {args.steps} step(s), 95% interval")
    b.set(xlabel=args.xlabel, ylabel="Wilson 95% interval")
    b.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)


if __name__ == "__main__":
    main()
