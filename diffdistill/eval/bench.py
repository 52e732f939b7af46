"""``diffdistill bench``: quality and speed of diffusers pipelines against the number of sampling steps.

For every pipeline folder x scheduler x guidance scale x step count it samples ``num_samples`` images
exactly as plain diffusers does (the same seeds and prompts in every cell, :mod:`.sampling`), extracts
their features once (torch-fidelity, :mod:`.fidelity`), and reports FID, KID, IS, precision, recall,
prompt accuracy and CLIP score, each with an interval (:mod:`.metrics`), beside the real-data floor at the
same N, wall time per image and peak memory; requested comparisons get a paired-bootstrap verdict. It
writes ``report.json``, ``report.md``, ``fid_vs_steps.png`` and one sample grid per cell (:mod:`.report`).
Finished cells and reference features are cached by content (:mod:`.cache`).

    diffdistill bench assets/digits-sd runs/lcm/pipeline --steps 1,2,4,8,50 --output runs/bench

Python: ``run_bench(BenchConfig(pipelines=[...], output="runs/bench", steps="1,2,4"))``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import shutil
import signal
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from diffdistill.digits import caption_to_label, digits_uint8, load_digits_32
from diffdistill.errors import Terminated
from diffdistill.eval import cache, fidelity, metrics
from diffdistill.eval.config import (
    DEFAULT_GUIDANCE,
    BenchConfig,
    parse_compare,
    read_call_kwargs,
    read_prompts,
    read_recommended_guidance,
)
from diffdistill.eval.report import environment_info, plot_report, report_markdown, report_markdown_table
from diffdistill.eval.sampling import (
    GRID_COLUMNS,
    GRID_ROWS,
    load_pipeline,
    load_scheduler,
    make_scheduler,
    pipeline_class_name,
    sample_cell,
    save_grid,
    slug,
)
from diffdistill.memory import PeakMemory
from diffdistill.outputs import replace_dir
from diffdistill.teachers.sd3 import folded_call_kwargs

__all__ = ["BenchConfig", "REPORT_VERSION", "report_markdown_table", "run_bench"]

# 2: intervals on every metric, precision/recall, the real-data floor, comparisons, CLIP score.
REPORT_VERSION = 2
STAGING_PREFIX = "diffdistill-bench-"


@contextlib.contextmanager
def sigterm_raises():
    """Turn SIGTERM into :class:`~diffdistill.errors.Terminated` while the block runs, so ``finally`` blocks
    remove the temporary folder also when run_bench is called from Python (``diffdistill``'s main installs the
    same for the whole command)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Instruments:
    """What measures a set of images: the feature extractor, classifier and CLIP model, and their hashes."""

    cfg: BenchConfig
    device: torch.device
    weights: Path
    with_accuracy: bool

    def key_parts(self) -> dict[str, Any]:
        """The instruments' part of a cache key (content hashes, not names)."""
        return {"extractor": self.cfg.feature_extractor, "extractor_weights": fidelity.file_sha256(self.weights),
                "classifier": (fidelity.file_sha256(fidelity.resolve_classifier_files(self.cfg.classifier)[0])
                               if self.with_accuracy else None),
                "clip": cache.folder_fingerprint(self.cfg.clip_model) if self.cfg.clip_model else None,
                "feature_device": self.device.type}

    def measure(self, images: torch.Tensor, prompts: list[str] | None, labels: torch.Tensor | None) -> metrics.SampleSet:
        """Features, logits, classifier readings and CLIP scores of uint8 (N, 3, H, W) images."""
        feats = fidelity.extract_features(images, self.cfg.feature_extractor, self.weights, self.device,
                                          max(self.cfg.batch_size, 64))
        predictions = (fidelity.classifier_predictions(images, self.cfg.classifier, self.device)
                       if labels is not None else None)
        clip = None
        if self.cfg.clip_model and prompts is not None:
            from diffdistill.eval.clip_score import clip_scores

            clip = clip_scores(images, prompts, self.cfg.clip_model, self.device)
        return metrics.SampleSet(feats["features"], feats["logits"], predictions, labels, clip)


def load_reference_set(cfg: BenchConfig, inst: Instruments) -> metrics.SampleSet:
    """The reference's SampleSet, from the cache when its content and instruments are unchanged."""
    if cfg.reference == fidelity.DIGITS_REFERENCE:
        images, labels = load_digits_32()
        images = digits_uint8(images)
        content = "digits:" + fidelity.tensor_sha256(images)
    else:
        images, labels = None, None
        content = "folder:" + cache.folder_fingerprint(cfg.reference)
    key = cache.make_key({"kind": "reference", "content": content, **inst.key_parts(), "clip": None})
    hit = cache.load_entry(cfg.cache_path, "reference", key)
    if hit is not None:
        return metrics.SampleSet.from_tensors(hit[0])
    if images is None:
        images = fidelity.load_reference(cfg.reference)
    ref = inst.measure(images, None, labels if inst.with_accuracy else None)
    cache.save_entry(cfg.cache_path, "reference", key, ref.to_tensors(), {"reference": cfg.reference})
    return ref


def _folder_guidance(folder: str) -> float:
    """The folder's recommended guidance scale, else DEFAULT_GUIDANCE."""
    value = read_recommended_guidance(folder)
    return DEFAULT_GUIDANCE if value is None else value


def run_bench(cfg: BenchConfig) -> dict:
    """Sample, measure and score every (pipeline, scheduler, guidance, steps) cell; write the report; return it.

    Everything is written to a temporary folder first and moved to ``cfg.output`` at the end, so an
    interrupted run (an exception, Ctrl-C or SIGTERM) leaves no half-written report and no temporary
    folder. A cell whose sampling raises (e.g. a scheduler that cannot take that few steps) is recorded
    with its error instead of aborting the run.
    """
    with sigterm_raises():
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX))
        try:
            report = _run(cfg, staging)
            publish(staging, Path(cfg.output))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    report["output_dir"] = str(Path(cfg.output).resolve())
    return report


def _run(cfg: BenchConfig, staging: Path) -> dict:
    import diffusers
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = fidelity.resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    prompts_base = read_prompts(cfg.prompts)
    prompts = [prompts_base[i % len(prompts_base)] for i in range(cfg.num_samples)]
    digit_labels = [caption_to_label(p) for p in prompts]
    with_accuracy = all(k is not None for k in digit_labels)
    labels_t = torch.tensor(digit_labels) if with_accuracy else None
    inst = Instruments(cfg, device, fidelity.extractor_weights(cfg.feature_extractor, cfg.inception_weights,
                                                               cfg.classifier), with_accuracy)
    ref = load_reference_set(cfg, inst)
    resampler = metrics.Resampler(cfg.num_samples, len(ref), cfg.bootstrap, cfg.seed)
    ref_stats = metrics.ReferenceStats(ref.features, resampler.ref)
    k = cfg.prc_neighborhood
    floor, floor_info = metrics.real_floor(ref, ref_stats, resampler, cfg.confidence, cfg.kid_subset_size, k, cfg.seed)
    grid_columns = min(len(prompts_base), GRID_COLUMNS)
    guidance_by_pipe = [cfg.guidance or [_folder_guidance(p)] for p in cfg.pipelines]
    n_cells = sum(len(cfg.schedulers) * len(g) for g in guidance_by_pipe) * len(cfg.steps)
    multi_guidance = any(len(g) > 1 for g in guidance_by_pipe)
    common = {"prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "seed": cfg.seed,
              "num_samples": cfg.num_samples, "batch_size": cfg.batch_size, "dtype": cfg.dtype,
              **({"variant": cfg.variant} if cfg.variant else {}),  # the same folder, other weights
              "device": device.type, **inst.key_parts(), "versions": {"diffusers": diffusers.__version__}}

    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(cfg).items()},
        "environment": environment_info(device),
        "reference": {"name": cfg.reference, "num_images": len(ref)},
        "prompts": {"source": cfg.prompts or "the ten digit prompts", "count": len(prompts_base)},
        "feature_extractor": cfg.feature_extractor,
        "kid_subset_size": min(cfg.kid_subset_size, cfg.num_samples, len(ref)),
        "prompt_accuracy": with_accuracy,
        "memory_method": PeakMemory(device).method,
        "intervals": {"confidence": cfg.confidence, "bootstrap": cfg.bootstrap, "fid": "basic bootstrap",
                      "proportions": "Wilson", "comparisons": "paired basic bootstrap"},
        "real_floor": {**floor_info, **floor.summary},
        "lines": [],
        "comparisons": [],
    }
    cells: dict[tuple[str, int, int, int], tuple[str, metrics.CellStats]] = {}
    (staging / "grids").mkdir()
    bar = tqdm(total=n_cells, unit="cell", disable=cfg.no_progress, dynamic_ncols=True)
    with bar:
        for folder, label, guidances in zip(cfg.pipelines, cfg.labels, guidance_by_pipe):
            pipe, folded = None, {}  # loaded at the first cell the cache does not hold
            base_scheduler = load_scheduler(folder)
            fingerprint = cache.folder_fingerprint(folder)
            calls = {steps: read_call_kwargs(folder, steps) for steps in cfg.steps}  # the export's, per step count
            for si, sched_name in enumerate(cfg.schedulers):
                for gi, guidance in enumerate(guidances):
                    name = label
                    if len(cfg.schedulers) > 1 or sched_name != "default":
                        name += f" [{sched_name}]"
                    if multi_guidance:
                        name += f" g={guidance:g}"
                    scheduler = make_scheduler(sched_name, base_scheduler)
                    line: dict[str, Any] = {"name": name, "label": label, "pipeline": folder,
                                            "pipeline_class": pipeline_class_name(folder), "scheduler": sched_name,
                                            "scheduler_class": type(scheduler).__name__, "guidance_scale": guidance,
                                            "results": []}
                    warmed = cfg.no_warmup
                    for steps in cfg.steps:
                        bar.set_description(f"{name} {steps} steps")
                        call = calls[steps]
                        key = cache.make_key({**common, "kind": "cell", "pipeline": fingerprint, "steps": steps,
                                              **({"call": call} if call else {}),
                                              "guidance": guidance, "scheduler": {
                                                  "class": type(scheduler).__name__, "config": dict(scheduler.config)}})
                        hit = cache.load_entry(cfg.cache_path, "cells", key)
                        if hit is None:
                            if pipe is None:
                                pipe = load_pipeline(folder, device, dtype, cfg.variant)
                                folded = folded_call_kwargs(pipe)  # SD3 without T5: the same output, faster
                            pipe.scheduler = make_scheduler(sched_name, base_scheduler)  # fresh state per cell
                            if not warmed:
                                warmup(pipe, prompts, cfg, steps, guidance, {**folded, **call})
                                warmed = True
                        grid_stem = f"{len(report['lines']):02d}_{slug(name)}_steps{steps}"  # index: unique
                        result, stats = run_cell(pipe, cfg, inst, prompts, labels_t, steps, guidance, device, hit, key,
                                                 staging, name, grid_stem, grid_columns, bar, ref, ref_stats,
                                                 resampler, {**folded, **call})
                        if stats is not None:
                            vs = metrics.compare(stats, floor, cfg.confidence)["fid"]
                            result["vs_real"] = {"difference": vs["difference"], "ci": vs["ci"],
                                                 "resolved": vs["resolved"]}
                            cells[(label, si, gi, steps)] = (f"{name}, {steps} step{'' if steps == 1 else 's'}", stats)
                        line["results"].append(result)
                        bar.update(1)
                    report["lines"].append(line)
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report["comparisons"] = run_comparisons(cfg, cells)
    (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (staging / "report.md").write_text(report_markdown(report))
    plot_report(report, staging / "fid_vs_steps.png")
    return report


def warmup(pipe, prompts: list[str], cfg: BenchConfig, steps: int, guidance: float, call_kwargs: dict) -> None:
    """One untimed pipeline call, so the first timed batch does not pay for lazy initialisation."""
    with contextlib.suppress(Exception):  # a failing cell reports its own error
        pipe(prompts[:min(cfg.batch_size, cfg.num_samples)], num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(cfg.seed), output_type="pt", **call_kwargs)


def run_cell(pipe, cfg: BenchConfig, inst: Instruments, prompts: list[str], labels: torch.Tensor | None, steps: int,
             guidance: float, device: torch.device, hit, key: str, staging: Path, name: str, grid_stem: str,
             grid_columns: int, bar, ref: metrics.SampleSet, ref_stats: metrics.ReferenceStats,
             resampler: metrics.Resampler, call_kwargs: dict) -> tuple[dict[str, Any], metrics.CellStats | None]:
    """Sample one cell (or take it from the cache), then score it: (result dict, CellStats or None if it failed)."""
    result: dict[str, Any] = {"steps": steps, "num_samples": cfg.num_samples}
    n_grid = grid_columns * GRID_ROWS
    if hit is not None:
        tensors, timing = hit
        sample_set, grid_images = metrics.SampleSet.from_tensors(tensors), tensors["grid"]
        result["cached"] = True
    else:
        try:
            with PeakMemory(device) as mem:
                images, seconds, nfe = sample_cell(pipe, prompts, steps, guidance, cfg.seed, cfg.batch_size, device,
                                                   call_kwargs=call_kwargs)
        except Exception as e:  # one scheduler/step combination failing must not lose the others
            message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            bar.write(f"warning: {name}, {steps} steps failed: {message}")
            result["error"] = message
            return result, None
        timing = {"nfe": nfe, "seconds_per_image": seconds / cfg.num_samples, "seconds_total": seconds,
                  "peak_memory_mb": mem.peak / 2**20, "memory_increase_mb": max(mem.peak - mem.baseline, 0) / 2**20}
        sample_set = inst.measure(images, prompts, labels)
        grid_images = images[:n_grid].contiguous()
        cache.save_entry(cfg.cache_path, "cells", key, {**sample_set.to_tensors(), "grid": grid_images},
                         {**timing, "cell": name, "steps": steps, "guidance": guidance})
        result["cached"] = False
    stats = metrics.cell_stats(sample_set, ref, ref_stats, resampler.gen, cfg.confidence, cfg.kid_subset_size,
                               cfg.prc_neighborhood)
    result.update(stats.summary)
    result.setdefault("prompt_accuracy", None)
    result.update({k: timing[k] for k in ("nfe", "seconds_per_image", "seconds_total", "peak_memory_mb",
                                          "memory_increase_mb")})
    result["cache_key"] = key
    grid = Path("grids") / f"{grid_stem}.png"
    save_grid(grid_images, staging / grid, grid_columns)
    result["grid"] = grid.as_posix()
    return result, stats


def run_comparisons(cfg: BenchConfig, cells: dict[tuple[str, int, int, int], tuple[str, metrics.CellStats]]) -> list:
    """Every ``--compare`` pair expanded to cells: differences, intervals and verdicts in words."""
    out = []
    lines = sorted({(si, gi) for (_, si, gi, _) in cells})
    for a, b in parse_compare(cfg.compare, cfg.labels, cfg.steps):
        step_pairs = [(a.steps, b.steps)] if a.steps is not None else [(s, s) for s in cfg.steps]
        label_pairs = [(a.label, b.label)] if a.label is not None else [(x, x) for x in cfg.labels]
        for la, lb in label_pairs:
            for si, gi in lines:
                for sa, sb in step_pairs:
                    ca, cb = cells.get((la, si, gi, sa)), cells.get((lb, si, gi, sb))
                    if ca is None or cb is None:
                        continue  # a failed cell (its error is in the table) or a line this label lacks
                    diffs = metrics.compare(ca[1], cb[1], cfg.confidence)
                    out.append({"a": ca[0], "b": cb[0], "metrics": diffs,
                                "verdicts": [metrics.verdict(n, d, ca[0], cb[0], cfg.confidence)
                                             for n, d in diffs.items()]})
    return out


def publish(staging: Path, output: Path) -> None:
    """Copy the finished report beside ``output``, then swap it in with ``outputs.replace_dir`` (files flushed
    first; an earlier report, which BenchConfig checked is one and that --overwrite was given, is removed only
    once the new one is in place)."""
    output = output.absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(staging, tmp)
        replace_dir(tmp, output)
    except BaseException:  # an error or a signal: no temporary folder stays beside the output
        shutil.rmtree(tmp, ignore_errors=True)
        raise
