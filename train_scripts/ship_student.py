"""Ship a trained digits-SD student into ``pipelines/NAME``: a plain diffusers folder, weights stored in
half precision (they load as float32), with a model card that states the recipe and the measured table.

    python train_scripts/ship_student.py runs/lcm --name digits-lcm --preset train_scripts/digits/lcm.yaml
    python train_scripts/ship_student.py runs/lcm --name digits-lcm --preset ... --report benchmarks/final/report.json \
        --label digits-lcm --overwrite

The folder is built beside its destination and renamed into place, so an interrupted run leaves nothing
half-written. ``--report`` puts the rows of that ``diffdistill bench`` report whose label is ``--label`` (and the
report's real-data floor) into the card; measure the shipped folder itself, not the run's float32 export.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffdistill.outputs import replace_dir  # noqa: E402


def halve_weights(folder: Path) -> int:
    """Store every float32 tensor of every ``*.safetensors`` below ``folder`` as float16; returns bytes saved.

    diffusers loads them back into float32 modules (``from_pretrained`` without ``torch_dtype``)."""
    saved = 0
    for path in sorted(folder.rglob("*.safetensors")):
        before = path.stat().st_size
        tensors = load_file(str(path))
        halved = {k: (v.half() if v.dtype == torch.float32 else v) for k, v in tensors.items()}
        save_file(halved, str(path), metadata={"format": "pt"})
        saved += before - path.stat().st_size
    return saved


def card_table(report: dict, label: str) -> str:
    """The report's rows for ``label`` with the real-data floor, and its comparisons against the teacher at 50 steps,
    as Markdown through the bench's own table code."""
    from diffdistill.eval.report import comparisons_markdown, report_markdown_table

    kept = dict(report)
    kept["lines"] = [line for line in report["lines"] if line["label"] == label]
    if not kept["lines"]:
        sys.exit(f"error: the report has no line labelled {label!r}")
    kept["comparisons"] = [c for c in report.get("comparisons", [])
                           if c["a"].startswith(f"{label}, ") and c["b"].endswith(", 50 steps")]
    table = report_markdown_table(kept)
    if kept["comparisons"]:
        table += "\nAgainst the teacher at 50 steps (paired bootstrap, same seeds and prompts):\n\n"
        table += comparisons_markdown(kept)
    return table


def write_card(folder: Path, name: str, preset: Path, run_dir: Path, table: str | None, report_path: str | None,
               threads: str) -> None:
    """README.md: what the student is, its recipe and training cost, how to load it, what was measured."""
    info = json.loads((folder / "diffdistill.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    steps, guidance = info["num_inference_steps"], info["recommended_guidance_scale"]
    lines = [
        f"# {name}: a {steps}-step student of digits-SD ({info['method']})",
        "",
        f"Distilled from [`assets/digits-sd`](../../assets/digits-sd) by diffdistill with the preset "
        f"[`{preset.relative_to(ROOT)}`](../../{preset.relative_to(ROOT)}). A plain diffusers folder: loading it "
        "does not need diffdistill.",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        f'pipe = DiffusionPipeline.from_pretrained("pipelines/{name}")',
        f'image = pipe("a handwritten digit 7", num_inference_steps={steps}).images[0]'
        + (f"  # guidance {guidance:g} is the preset's" if guidance != 1.0 else ""),
        "```",
        "",
        "## Recipe and cost",
        "",
        f"- method: `{info['method']}`, intended steps: {steps}, recommended guidance_scale: {guidance:g}"
        + (" (baked in: any guidance_scale gives the same images)" if info.get("guidance_baked") else ""),
        f"- training: {summary.get('train_steps')} iterations, {summary.get('train_minutes')} minutes of training "
        f"({summary.get('total_minutes')} in all) on a 2-core CPU, {threads}; peak memory "
        f"{summary.get('peak_memory_mb')} MB ({summary.get('memory_kind')}); stopped by "
        f"{summary.get('stopped_by')}",
        "- weights: stored in float16 (they load as float32); the table below was measured on this folder",
    ]
    stage = info.get("stage")
    if stage:  # a progressive stage: the run went on past it
        lines.insert(-1, f"- this is the run's stage `{stage}`, exported when that stage finished (the figures above "
                         "are the whole run's, which went on to fewer steps)")
    if table:
        lines += ["", "## Measured quality", "",
                  f"From `{report_path}` (`diffdistill bench`, digits-classifier features, intervals at the level "
                  "the report states; the real-data floor is real digits scored the same way at the same N).", "",
                  table.strip()]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished `diffdistill distill` run (holds pipeline/ and summary.json)")
    p.add_argument("--name", required=True, help="folder name under pipelines/ (e.g. digits-lcm)")
    p.add_argument("--preset", required=True, type=Path, help="the YAML preset the run was trained with")
    p.add_argument("--pipeline", default="pipeline", help="the run's exported folder to ship (e.g. stages/4_steps)")
    p.add_argument("--report", default=None, help="a bench report.json that measured pipelines/NAME (optional)")
    p.add_argument("--label", default=None, help="the report's line label of this student (default: --name)")
    p.add_argument("--card-only", action="store_true", help="rewrite only README.md of an already shipped folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pipelines/NAME")
    p.add_argument("--threads", default="one thread, beside other jobs",
                   help="how the run used the CPU, for the card (default: %(default)s)")
    args = p.parse_args(argv)

    dest = ROOT / "pipelines" / args.name
    source = args.run_dir / args.pipeline
    preset = args.preset.resolve()
    for path, what in ((source / "model_index.json", "pipeline"), (args.run_dir / "summary.json", "run summary"),
                       (preset, "preset")):
        if not path.is_file():
            sys.exit(f"error: {what} not found: {path}")
    table = None
    if args.report:
        table = card_table(json.loads(Path(args.report).read_text()), args.label or args.name)
    if args.card_only:
        if not (dest / "model_index.json").is_file():
            sys.exit(f"error: {dest} holds no shipped pipeline")
        write_card(dest, args.name, preset, args.run_dir, table, args.report, args.threads)
        return 0
    if dest.exists() and not args.overwrite:
        sys.exit(f"error: {dest} exists; pass --overwrite to replace it")
    tmp = dest.with_name(f".{args.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("README.md", "*.png"))
        saved = halve_weights(tmp)
        write_card(tmp, args.name, preset, args.run_dir, table, args.report, args.threads)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"shipped {dest} ({saved / 2**20:.1f} MB saved by float16 storage)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
