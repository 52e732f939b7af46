"""Plot 1-step FID (with its interval), precision and recall of a bench report's lines against a number
each label names (training steps, a guidance scale, ...):

    python benchmarks/tools/plot_vs_x.py benchmarks/dmd2_cpu_length/report.json OUT.png \
        --x nogan-900=900,nogan-1300=1300 --xlabel "generator steps"
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="report.json of diffdistill bench")
    ap.add_argument("output", help="PNG to write")
    ap.add_argument("--x", required=True, help="LABEL=VALUE,...: the lines to plot and their x values")
    ap.add_argument("--xlabel", default="x", help="the x axis' name")
    ap.add_argument("--steps", type=int, default=1, help="the step count of the cells to plot")
    args = ap.parse_args()
    xs = {k: float(v) for k, v in (p.split("=") for p in args.x.split(","))}
    rows = []
    for line in json.load(open(args.report))["lines"]:
        cell = next((r for r in line["results"] if r["steps"] == args.steps and "fid" in r), None)
        if line["label"] in xs and cell:
            rows.append((xs[line["label"]], cell))
    rows.sort(key=lambda r: r[0])
    x = [r[0] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    fid = [c["fid"] for _, c in rows]
    lo = [c["fid"] - c["fid_ci"][0] for _, c in rows]
    hi = [max(c["fid_ci"][1] - c["fid"], 0.0) for _, c in rows]
    a.errorbar(x, fid, yerr=[lo, hi], fmt="o-", capsize=3)
    a.set(xlabel=args.xlabel, ylabel=f"FID at {args.steps} step(s), 95% interval")
    for key, name in [("precision", "precision"), ("recall", "recall")]:
        v = [c[key] for _, c in rows]
        err = [[c[key] - c[key + "_ci"][0] for _, c in rows], [c[key + "_ci"][1] - c[key] for _, c in rows]]
        b.errorbar(x, v, yerr=err, fmt="o-", capsize=3, label=name)
    b.set(xlabel=args.xlabel, ylabel="Wilson 95%")
    b.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)


if __name__ == "__main__":
    main()
