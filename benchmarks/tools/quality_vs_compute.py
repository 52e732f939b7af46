#!/usr/bin/env python
"""Quality against compute for the pipelines of one ``diffdistill bench`` report (issue #19's table and plot).

For every cell of the report (pipeline line x step count) it puts side by side: the parameters a sample goes
through (UNet, VAE decoder), FID and prompt accuracy with the bench's intervals, the bench's peak memory, and a
latency measured here in alternating rounds: each round times one batch of every cell (and one decode of every
distinct VAE) in turn, so that a slower or busier machine affects them alike; the table gives the median
seconds per image with the [min, max] over rounds, and each speed-up against ``--base`` as the median of the
per-round ratios with their [min, max]. Plain diffusers loads every folder (``DiffusionPipeline``), sampled
with the guidance scale the bench used for that line.

    python benchmarks/tools/quality_vs_compute.py benchmarks/kd/report.json --base teacher@50 \
        --output benchmarks/kd --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def decoder_params(vae) -> int:
    """Parameters of the decode path: AutoencoderKL's post_quant_conv + decoder, AutoencoderTiny's decoder."""
    return count(vae.decoder) + count(getattr(vae, "post_quant_conv", None))


def decode(vae, latents):
    return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_spread(s: dict, spec: str = ".4f") -> str:
    return f"{s['median']:{spec}} [{s['min']:{spec}}, {s['max']:{spec}}]"


def ci(r: dict, key: str, spec: str = ".3f") -> str:
    v, lohi = r.get(key), r.get(f"{key}_ci")
    if v is None:
        return "-"
    return f"{v:{spec}} [{lohi[0]:{spec}}, {lohi[1]:{spec}}]" if lohi else f"{v:{spec}}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path, help="report.json of diffdistill bench")
    p.add_argument("--output", type=Path, required=True, help="folder for quality_vs_compute.{md,json,png}")
    p.add_argument("--base", default="", help="LABEL@STEPS the speed-ups are relative to (default: none)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=50, help="images per timed call (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--replot", action="store_true",
                   help="only draw the plot again from --output's quality_vs_compute.json (no timing)")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads((args.output / "quality_vs_compute.json").read_text())["rows"],
             args.output / "quality_vs_compute.png")
        return 0

    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    torch.set_num_threads(args.threads)
    report = json.loads(args.report.read_text())
    prompts = [f"a handwritten digit {i % 10}" for i in range(args.batch_size)]

    pipes, cells = {}, []
    for line in report["lines"]:
        folder = line["pipeline"]
        if folder not in pipes:
            pipes[folder] = DiffusionPipeline.from_pretrained(folder).to(torch.float32)
            pipes[folder].set_progress_bar_config(disable=True)
        for r in line["results"]:
            if r.get("fid") is None:
                continue  # a cell the bench could not sample (e.g. a one-step preset at 50 steps)
            cells.append({"label": line["label"], "folder": folder, "steps": r["steps"],
                          "guidance": line["guidance_scale"], "r": r})
    vaes = {}
    for folder, pipe in pipes.items():
        vaes.setdefault(type(pipe.vae).__name__ + ":" + str(decoder_params(pipe.vae)), (folder, pipe.vae))

    first = pipes[cells[0]["folder"]]
    shape = (args.batch_size, first.unet.config.in_channels, first.unet.config.sample_size,
             first.unet.config.sample_size)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    def run_cell(c):
        pipe = pipes[c["folder"]]
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            pipe(prompts, num_inference_steps=c["steps"], guidance_scale=c["guidance"], generator=g,
                 output_type="pt")

    def run_decode(vae):
        with torch.inference_mode():
            decode(vae, z)

    for c in cells:  # warm-up: one untimed call each
        run_cell(c)
    for _, vae in vaes.values():
        run_decode(vae)
    times = {id(c): [] for c in cells}
    dtimes = {k: [] for k in vaes}
    for i in range(args.rounds):
        for c in cells:
            t0 = time.perf_counter()
            run_cell(c)
            times[id(c)].append((time.perf_counter() - t0) / args.batch_size)
        for k, (_, vae) in vaes.items():
            t0 = time.perf_counter()
            run_decode(vae)
            dtimes[k].append((time.perf_counter() - t0) / args.batch_size)
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)

    base = next((c for c in cells if f"{c['label']}@{c['steps']}" == args.base), None)
    if args.base and base is None:
        raise SystemExit(f"error: --base {args.base} is not a cell of the report")
    unet_ref = count(pipes[base["folder"]].unet) if base else None
    rows = []
    for c in cells:
        pipe, r = pipes[c["folder"]], c["r"]
        row = {"cell": f"{c['label']}@{c['steps']}", "pipeline": c["folder"], "steps": c["steps"],
               "guidance_scale": c["guidance"], "cfg_passes": 2 if c["guidance"] > 1 and
               pipe.unet.config.time_cond_proj_dim is None else 1,
               "unet_params": count(pipe.unet), "vae_class": type(pipe.vae).__name__,
               "decoder_params": decoder_params(pipe.vae),
               "seconds_per_image": spread(times[id(c)]),
               "bench_seconds_per_image": r.get("seconds_per_image"), "peak_memory_mb": r.get("peak_memory_mb"),
               "fid": r.get("fid"), "fid_ci": r.get("fid_ci"), "prompt_accuracy": r.get("prompt_accuracy"),
               "prompt_accuracy_ci": r.get("prompt_accuracy_ci"), "precision": r.get("precision"),
               "recall": r.get("recall")}
        if base:
            row["unet_share"] = row["unet_params"] / unet_ref
            row["speedup"] = spread([b / t for b, t in zip(times[id(base)], times[id(c)])])
        rows.append(row)
    decodes = {k: {"pipeline": f, "seconds_per_image": spread(dtimes[k])} for k, (f, _) in vaes.items()}
    keys = list(vaes)
    if len(keys) > 1:
        ref = max(keys, key=lambda k: statistics.median(dtimes[k]))
        for k in keys:
            decodes[k]["speedup_vs_slowest"] = spread([a / b for a, b in zip(dtimes[ref], dtimes[k])])

    args.output.mkdir(parents=True, exist_ok=True)
    out = {"report": str(args.report), "rounds": args.rounds, "batch_size": args.batch_size,
           "threads": args.threads, "base": args.base, "rows": rows, "decode": decodes,
           "cpu": report.get("environment", {}).get("cpu")}
    (args.output / "quality_vs_compute.json").write_text(json.dumps(out, indent=2) + "\n")

    md = ["| cell | UNet params | share | decoder | passes/step | s/img (rounds) | speed-up vs "
          f"{args.base or '-'} | peak MB | FID [95%] | prompt acc. [95%] |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        md.append(f"| {row['cell']} | {row['unet_params'] / 1e6:.2f}M | "
                  f"{row.get('unet_share', float('nan')):.0%} | {row['vae_class']} ({row['decoder_params'] / 1e6:.2f}M) | "
                  f"{row['cfg_passes']} | {fmt_spread(row['seconds_per_image'])} | "
                  f"{fmt_spread(row['speedup'], '.1f') if 'speedup' in row else '-'} | "
                  f"{row['peak_memory_mb']:.0f} | {ci(row, 'fid')} | {ci(row, 'prompt_accuracy')} |")
    md += ["", "| decoder | pipeline | s/img decode (rounds) | speed-up vs slowest |", "|---|---|---:|---:|"]
    for k, d in decodes.items():
        sp = d.get("speedup_vs_slowest")
        md.append(f"| {k} | {d['pipeline']} | {fmt_spread(d['seconds_per_image'], '.5f')} | "
                  f"{fmt_spread(sp, '.2f') if sp else '-'} |")
    (args.output / "quality_vs_compute.md").write_text("\n".join(md) + "\n")
    plot(rows, args.output / "quality_vs_compute.png")
    print("\n".join(md))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """FID (point and the bench's interval) against median seconds per image (the rounds' range), log x: one
    colour per pipeline, one marker per step count."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    names = list(dict.fromkeys(r["cell"].rsplit("@", 1)[0] for r in rows))
    steps = sorted({r["steps"] for r in rows})
    colours = {n: f"C{i}" for i, n in enumerate(names)}
    markers = dict(zip(steps, "os^Dvp*h"))
    for row in rows:
        c, m = colours[row["cell"].rsplit("@", 1)[0]], markers[row["steps"]]
        s, lo, hi = row["seconds_per_image"]["median"], row["seconds_per_image"]["min"], row["seconds_per_image"]["max"]
        f = row["fid"]
        flo, fhi = row["fid_ci"] if row.get("fid_ci") else (f, f)
        # the bench's basic-bootstrap FID interval may lie below its point estimate: drawn as a segment
        ax.plot([s, s], [flo, fhi], "-", color=c, alpha=0.6)
        ax.plot([lo, hi], [f, f], "-", color=c, alpha=0.6)
        ax.plot([s], [f], marker=m, color=c, linestyle="none")
    handles = [Line2D([], [], color=colours[n], marker="o", linestyle="none", label=n) for n in names]
    handles += [Line2D([], [], color="gray", marker=markers[k], linestyle="none", label=f"{k} steps") for k in steps]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image (median over rounds, [min, max]); log scale")
    ax.set_ylabel("FID (digits classifier features), 95% interval")
    ax.set_title("Quality against compute")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
