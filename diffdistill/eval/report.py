"""The bench report: ``report.json`` (written by the run), ``report.md`` and ``fid_vs_steps.png``.

Tables read both report versions: v1 reports (no intervals) show "—" where v2 has an interval.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from diffdistill.eval.config import INTERVALS_HELP


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "/").replace("\n", " ")


def _with_ci(r: dict, key: str, spec: str) -> str:
    """``value [lo, hi]`` (or the value alone for reports without intervals)."""
    value, ci = r.get(key), r.get(f"{key}_ci")
    if value is None:
        return "—"
    return _fmt(value, spec) + (f" [{_fmt(ci[0], spec)}, {_fmt(ci[1], spec)}]" if ci else "")


def _pct_ci(r: dict, key: str) -> str:
    value, ci = r.get(key), r.get(f"{key}_ci")
    if value is None:
        return "—"
    return f"{value:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")


def _vs_real(r: dict) -> str:
    vs = r.get("vs_real")
    if not vs:
        return "—"
    return "≈ real" if not vs["resolved"] else ("worse" if vs["difference"] > 0 else "better")


def _row(lead: str, r: dict, with_clip: bool) -> str:
    cells = [_fmt(r.get("nfe"), ".3g"), _with_ci(r, "fid", ".3f"), _vs_real(r), _with_ci(r, "precision", ".3f"),
             _with_ci(r, "recall", ".3f"), f"{_fmt(r.get('isc_mean'), '.3f')} ± {_fmt(r.get('isc_std'), '.2f')}",
             f"{_fmt(r.get('kid_mean'), '.4f')} ± {_fmt(r.get('kid_std'), '.4f')}", _pct_ci(r, "prompt_accuracy")]
    if with_clip:
        cells.append(_with_ci(r, "clip_score", ".2f"))
    cells += [_fmt(r.get("seconds_per_image"), ".4f"), _fmt(r.get("peak_memory_mb"), ".0f")]
    return f"{lead} " + " | ".join(cells) + " |"


def report_markdown_table(report: dict) -> str:
    """A Markdown table, one row per (line, steps) plus the real-data floor: every metric with its interval.

    ``report`` is what ``run_bench`` returns (or ``report.json`` loaded); model cards reuse this.
    """
    with_clip = any(r.get("clip_score") is not None for line in report.get("lines", []) for r in line["results"])
    level = report.get("intervals", {}).get("confidence")
    ci = f" ({level:.0%} CI)" if level else ""
    header = (f"| Pipeline | Scheduler | Guidance | Steps | NFE | FID ↓{ci} | vs real | Precision ↑ | Recall ↑ | IS ↑ | "
              f"KID ↓ | Accuracy ↑ |" + (" CLIP ↑ |" if with_clip else "") + " s/img | Peak memory (MB) |")
    n_cols = header.count("|") - 1
    rows = [header, "|---|---|---:|---:|" + "---:|" * (n_cols - 4)]
    for line in report.get("lines", []):
        for r in line.get("results", []):
            lead = f"| {_cell(line['label'])} | {line['scheduler']} | {_fmt(line['guidance_scale'], 'g')} | {r['steps']} |"
            if r.get("error"):
                rows.append(f"{lead} — | failed: {_cell(r['error'][:80])} |" + " — |" * (n_cols - 6))
                continue
            rows.append(_row(lead, r, with_clip))
    floor = report.get("real_floor")
    if floor:
        rows.append(_row(f"| real data ({floor['num_real']}, {floor['mode']}) | — | — | — |", floor, with_clip))
    return "\n".join(rows) + "\n"


def comparisons_markdown(report: dict) -> str:
    """One table of every requested comparison (A − B with its interval) and the verdicts in words."""
    comps = report.get("comparisons") or []
    if not comps:
        return ""
    level = report["intervals"]["confidence"]
    rows = [f"| A | B | metric | A | B | A − B [{level:.0%} CI] | resolved |", "|---|---|---|---:|---:|---:|---|"]
    words = []
    for c in comps:
        for name, d in c["metrics"].items():
            rows.append(f"| {_cell(c['a'])} | {_cell(c['b'])} | {name} | {_fmt(d['a'], '.4g')} | {_fmt(d['b'], '.4g')} | "
                        f"{d['difference']:+.4g} [{d['ci'][0]:+.4g}, {d['ci'][1]:+.4g}] | "
                        f"{'yes' if d['resolved'] else 'no'} |")
        words.append(f"- **{c['a']} vs {c['b']}**: " + "; ".join(c["verdicts"]) + ".")
    return "\n".join(rows) + "\n\n" + "\n".join(words) + "\n"


def report_markdown(report: dict) -> str:
    """The whole report.md: setup, the table, the comparisons, notes on method, the plot and the grids."""
    cfg, env = report["config"], report["environment"]
    iv, floor = report["intervals"], report["real_floor"]
    floor_how = (f"{floor['num_real']} real images held out from the reference, against the other "
                 f"{floor['num_reference']}" if floor["mode"] == "disjoint" else
                 f"{floor['num_real']} real images drawn with replacement from the reference (it has fewer than "
                 f"2 × {floor['num_real']} images), against all {floor['num_reference']}: their precision is 1 by "
                 "construction, and their FID is what an ideal generator of the reference's images would get")
    lines = [
        "# diffdistill bench",
        "",
        f"Created {report['created']} on {env['device_name']} (torch {env['torch']}, diffusers {env['diffusers']}, "
        f"torch-fidelity {env['torch_fidelity']}, {env['torch_threads']} CPU threads).",
        "",
        f"- samples per cell: {cfg['num_samples']} (seeds {cfg['seed']}..{cfg['seed'] + cfg['num_samples'] - 1}, "
        f"the same at every step count and for every pipeline), batch size {cfg['batch_size']}, dtype {cfg['dtype']}",
        f"- prompts: {report['prompts']['source']} ({report['prompts']['count']} prompts, cycled)",
        f"- reference: {report['reference']['name']} ({report['reference']['num_images']} images)",
        f"- feature extractor: {report['feature_extractor']} (FID, KID, precision and recall on its features, IS on "
        f"its logits; KID subset size {report['kid_subset_size']}; precision/recall with k = {cfg['prc_neighborhood']})",
        f"- intervals: {iv['confidence']:.0%}, {iv['bootstrap']} bootstrap replicates. {INTERVALS_HELP} "
        "FID's lower ends are clipped at 0; at small N an interval may lie below the point estimate, "
        "which is then mostly the estimator's finite-sample bias.",
        f"- real-data floor: {floor_how}. \"vs real\": the cell's FID minus the floor's, with its bootstrap "
        "interval: \"≈ real\" where it includes 0 (indistinguishable from real data at this N).",
        "- accuracy: fraction of samples the digits classifier reads as the digit the prompt names"
        + ("" if report["prompt_accuracy"] else " (not computed: not every prompt names a digit)"),
        "- s/img: wall time of the pipeline calls (text encoding, denoising and VAE decoding) divided by the "
        "number of images" + ("" if cfg.get("no_warmup") else ", after one untimed warm-up call per line")
        + "; cells marked cached in report.json reuse the timing of the run that filled the cache",
        f"- peak memory: {report['memory_method']}",
        "- NFE: denoiser forward calls per pipeline call (classifier-free guidance is batched into one call)",
        "",
        report_markdown_table(report),
    ]
    comparisons = comparisons_markdown(report)
    if comparisons:
        lines += ["## Comparisons (paired bootstrap)", "", comparisons]
    lines += ["![FID and latency against steps](fid_vs_steps.png)", "", "## Sample grids", ""]
    for line in report["lines"]:
        for r in line["results"]:
            if r.get("grid"):
                lines.append(f"- {line['name']}, {r['steps']} steps: [{r['grid']}]({r['grid']})")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    """fid_vs_steps.png: FID (with interval bars and the real-data band), precision, recall, s/img, accuracy."""
    import matplotlib.ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("fid", "FID ↓", False), ("precision", "precision ↑", False), ("recall", "recall ↑", False),
              ("seconds_per_image", "seconds per image", True)]
    if report["prompt_accuracy"]:
        panels.append(("prompt_accuracy", "prompt accuracy ↑", False))
    if any(r.get("clip_score") is not None for line in report["lines"] for r in line["results"]):
        panels.append(("clip_score", "CLIP score ↑", False))
    n_cols = 3
    n_rows = math.ceil(len(panels) / n_cols)
    # A bare Figure on the Agg canvas: no pyplot, so the caller's matplotlib backend is left alone.
    fig = Figure(figsize=(5.2 * n_cols, 4.2 * n_rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    all_steps = sorted({r["steps"] for line in report["lines"] for r in line["results"]})
    floor = report.get("real_floor")
    for ax, (key, title, log_y) in zip(axes, panels):
        for line in report["lines"]:
            ok = [r for r in line["results"] if not r.get("error") and r.get(key) is not None]
            if not ok:
                continue
            (handle,) = ax.plot([r["steps"] for r in ok], [r[key] for r in ok], marker="o", label=line["name"])
            for r in ok:  # the interval as a bar (it need not contain the point: see report.md)
                if r.get(f"{key}_ci"):
                    ax.plot([r["steps"]] * 2, r[f"{key}_ci"], color=handle.get_color(), lw=3, alpha=0.45,
                            solid_capstyle="butt")
        if floor and floor.get(key) is not None:
            ax.axhline(floor[key], color="grey", ls="--", lw=1, label="real data")
            if floor.get(f"{key}_ci"):
                ax.axhspan(*floor[f"{key}_ci"], color="grey", alpha=0.15)
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the benchmarked step counts
        ax.set_xticks(all_steps)
        ax.set_xticklabels([str(s) for s in all_steps])
        ax.set_xlabel("sampling steps")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows, plus the core count."""
    name = platform.processor() or platform.machine() or "cpu"
    with contextlib.suppress(OSError):
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                name = row.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cores)"


def environment_info(device: torch.device) -> dict[str, Any]:
    """Library versions and the device the numbers come from."""
    import diffusers
    import torch_fidelity

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "torch_fidelity": torch_fidelity.__version__, "device": str(device), "device_name": name or "cpu",
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
