"""``diffdistill bench``: quality and speed of diffusers pipelines against the number of sampling steps.

For every pipeline folder x scheduler x guidance scale x step count it samples ``num_samples`` images
exactly as plain diffusers does (``pipe(prompts, num_inference_steps=n, guidance_scale=g,
generator=[torch.Generator().manual_seed(seed + i) ...])``, the same seeds and prompts at every step
count), then scores them with torch-fidelity (FID, IS, KID; :mod:`diffdistill.eval.fidelity`), the digits
classifier (prompt accuracy, when every prompt names a digit), wall time per image and peak memory.
It writes ``report.json``, ``report.md``, ``fid_vs_steps.png`` and one sample grid per cell.

    diffdistill bench assets/digits-sd runs/lcm/export --steps 1,2,4,8,50 --output runs/bench

Python: ``run_bench(BenchConfig(pipelines=[...], output="runs/bench", steps="1,2,4"))``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffdistill.digits import DIGIT_PROMPTS, caption_to_label
from diffdistill.errors import UserError, require
from diffdistill.eval import fidelity
from diffdistill.loading import check_pipeline_folder, quiet_loading

DEFAULT_STEPS = (1, 2, 4, 8, 50)
# diffusers' StableDiffusionPipeline default; a folder's diffdistill.json may recommend another value.
DEFAULT_GUIDANCE = 7.5
GUIDANCE_KEY = "recommended_guidance_scale"
DIFFDISTILL_JSON = "diffdistill.json"
REPORT_VERSION = 1
GRID_COLUMNS = 10  # one column per digit prompt
GRID_ROWS = 10
GRID_MIN_CELL = 64  # nearest-upscale smaller samples so 32x32 digits are visible in the grid
GRID_MAX_CELL = 256

# name -> (diffusers scheduler class, from_config overrides). "default" keeps the folder's own scheduler.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "default": None,
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    # SD 1.5 ships PNDM with skip_prk_steps=True; without it PNDM cannot run fewer than ~4 steps.
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# Parsing and validation
# ----------------------------------------------------------------------------------------------------------

def parse_steps(value: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """``"1,2,4"`` (or a list) -> sorted unique positive ints; anything else is a UserError."""
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else list(value)
    steps = []
    for item in items:
        text = str(item).strip()
        require(re.fullmatch(r"[+-]?\d+", text) is not None,
                f"--steps must be a comma list of positive integers, got {value!r}")
        require(int(text) > 0, f"--steps values must be > 0, got {int(text)}")
        steps.append(int(text))
    require(len(steps) > 0, "--steps is empty")
    return sorted(set(steps))


def parse_guidance(value: str | float | list[float] | None) -> list[float] | None:
    """``"1.5,3"`` / a float / a list -> list of finite floats >= 0; None stays None (per-folder default)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, (int, float)) else list(value)
    out = []
    for item in items:
        try:
            g = float(str(item).strip())
        except ValueError:
            raise UserError(f"--guidance must be a comma list of numbers, got {value!r}") from None
        require(math.isfinite(g) and g >= 0, f"--guidance values must be finite and >= 0, got {g}")
        out.append(g)
    require(len(out) > 0, "--guidance is empty")
    return list(dict.fromkeys(out))


def parse_scheduler_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"ddim:timestep_spacing=trailing"`` -> ("ddim", {"timestep_spacing": "trailing"}).

    Values are read as JSON where they parse (``true``, ``3``, ``0.5``, ``null``), else kept as strings.
    """
    name, *pairs = spec.split(":")
    require(name in SCHEDULERS, f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)} "
                                "(optionally with :key=value config overrides)")
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        require(bool(sep) and key.strip().isidentifier(),
                f"scheduler override {pair!r} in {spec!r} must look like key=value")
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    return name, overrides


def scheduler_class(name: str, folder: str | Path | None = None):
    """The diffusers class a scheduler name builds (``default``: the folder's own, None if unknown)."""
    import diffusers

    spec = SCHEDULERS[name]
    if spec is not None:
        return getattr(diffusers, spec[0])
    with contextlib.suppress(OSError, json.JSONDecodeError, KeyError, TypeError):
        cls_name = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        return getattr(diffusers, cls_name, None)
    return None


def check_scheduler_overrides(spec: str, folders: list[str]) -> None:
    """UserError when an override key is not a config field of the scheduler it would go to."""
    import inspect

    name, overrides = parse_scheduler_spec(spec)
    for folder in folders:
        cls = scheduler_class(name, folder)
        if cls is None or not overrides:
            continue
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        bad = sorted(set(overrides) - known)
        require(not bad, f"scheduler {spec!r}: {cls.__name__} has no config field(s) {', '.join(bad)}")


def parse_names(value: str | list[str] | None) -> list[str]:
    """Comma list or list of names -> stripped non-empty names, order kept, duplicates dropped."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return list(dict.fromkeys(s.strip() for s in items if s.strip()))


def read_recommended_guidance(folder: str | Path) -> float | None:
    """``recommended_guidance_scale`` from the folder's diffdistill.json, or None when absent."""
    path = Path(folder) / DIFFDISTILL_JSON
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    value = meta.get(GUIDANCE_KEY) if isinstance(meta, dict) else None
    if value is None:
        return None
    require(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
            f"{path}: {GUIDANCE_KEY} must be a number >= 0, got {value!r}")
    return float(value)


def read_prompts(path: str | Path | None) -> list[str]:
    """Prompts from a file, one per line (blank lines skipped); None -> the ten digit prompts."""
    if path is None:
        return list(DIGIT_PROMPTS)
    path = Path(path)
    require(path.is_file(), f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    require(len(prompts) > 0, f"prompts file {path} has no prompts")
    return prompts


def unique_labels(pipelines: list[str]) -> list[str]:
    """Default line labels: folder names, with ``-2``, ``-3``... appended to repeats."""
    labels, seen = [], {}
    for p in pipelines:
        name = Path(p).resolve().name or str(p)
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return labels


@dataclass
class BenchConfig:
    """Everything ``run_bench`` needs; ``__post_init__`` normalises list fields and validates every input.

    Comma strings are accepted for ``steps``, ``guidance``, ``schedulers`` and ``labels`` (as on the CLI).
    ``guidance=None`` uses each folder's diffdistill.json ``recommended_guidance_scale``, else 7.5.
    ``feature_extractor=None`` picks ``digits-classifier`` for the ``digits`` reference, else
    ``inception-v3-compat`` (which needs ``inception_weights`` or torch.hub's cached file).
    """

    pipelines: list[str]
    output: str
    steps: list[int] | str = field(default_factory=lambda: list(DEFAULT_STEPS))
    guidance: list[float] | str | float | None = None
    num_samples: int = 1000
    seed: int = 0
    batch_size: int = 50
    schedulers: list[str] | str = "default"
    reference: str = fidelity.DIGITS_REFERENCE
    prompts: str | None = None
    feature_extractor: str | None = None
    inception_weights: str | None = None
    classifier: str | None = None
    kid_subset_size: int = 1000
    device: str = "cpu"
    dtype: str = "float32"
    labels: list[str] | str | None = None
    threads: int = 0
    warmup: bool = True
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.pipelines, (str, Path)):
            self.pipelines = [self.pipelines]
        require(len(self.pipelines) > 0, "give at least one pipeline folder")
        self.pipelines = [str(p) for p in self.pipelines if check_pipeline_folder(p) is not None]
        self.steps = parse_steps(self.steps)
        self.guidance = parse_guidance(self.guidance)
        self.schedulers = parse_names(self.schedulers) or ["default"]
        for spec in self.schedulers:
            check_scheduler_overrides(spec, self.pipelines)
        for name in ("num_samples", "batch_size", "kid_subset_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
        # FID needs a covariance (>= 2 samples); KID subsets need >= 2 as well.
        require(self.num_samples >= 2, f"--num-samples must be >= 2, got {self.num_samples}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.kid_subset_size >= 2, f"--kid-subset-size must be >= 2, got {self.kid_subset_size}")
        require(isinstance(self.seed, int) and self.seed >= 0, f"--seed must be an integer >= 0, got {self.seed!r}")
        require(isinstance(self.threads, int) and self.threads >= 0, f"--threads must be >= 0, got {self.threads!r}")
        self.reference = str(self.reference)
        if self.reference != fidelity.DIGITS_REFERENCE:
            require(Path(self.reference).is_dir(),
                    f"--reference must be 'digits' or a folder of images, got {self.reference!r} (not a folder)")
            n_images = len(fidelity.list_image_files(self.reference))
            require(n_images >= 2, f"reference folder {self.reference} holds {n_images} images; need at least 2")
        prompts = read_prompts(self.prompts)  # raises on a missing / empty file
        if self.feature_extractor is None:
            self.feature_extractor = (fidelity.DIGITS_EXTRACTOR if self.reference == fidelity.DIGITS_REFERENCE
                                      else fidelity.INCEPTION_EXTRACTOR)
        require(self.feature_extractor in fidelity.FEATURE_EXTRACTORS,
                f"unknown feature extractor {self.feature_extractor!r}; choose from {', '.join(fidelity.FEATURE_EXTRACTORS)}")
        if self.feature_extractor == fidelity.INCEPTION_EXTRACTOR:
            self.inception_weights = str(fidelity.resolve_inception_weights(self.inception_weights))
        if self.feature_extractor == fidelity.DIGITS_EXTRACTOR or all(caption_to_label(q) is not None for q in prompts):
            # The classifier gives digits features and prompt accuracy: check it now, not after sampling.
            fidelity.resolve_classifier_files(self.classifier)
        dev = fidelity.resolve_device(self.device)
        require(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        require(dev.type == "cuda" or self.dtype == "float32", f"--dtype {self.dtype} needs --device cuda")
        self.labels = parse_names(self.labels) if isinstance(self.labels, str) else list(self.labels or [])
        if not self.labels:
            self.labels = unique_labels(self.pipelines)
        require(len(self.labels) == len(self.pipelines),
                f"give one --label per pipeline: {len(self.labels)} labels for {len(self.pipelines)} pipelines")
        require(len(set(self.labels)) == len(self.labels), f"--label values must differ, got {self.labels}")
        out = Path(self.output)
        require(not out.exists() or out.is_dir(), f"--output {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()):
            require(self.overwrite, f"--output {out} is not empty; pass --overwrite to replace an earlier report")
            # Never delete a folder that is not one of our reports.
            require(is_bench_report(out), f"--output {out} is not empty and holds no bench report.json; "
                                          "choose a new or empty folder")
        ancestor = next(p for p in [out, *out.absolute().parents] if p.exists())
        require(os.access(ancestor, os.W_OK), f"--output {out}: {ancestor} is not writable")
        self.output = str(out)


def is_bench_report(folder: Path) -> bool:
    """True when ``folder/report.json`` was written by run_bench (so --overwrite may replace the folder)."""
    try:
        data = json.loads((folder / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "lines" in data and "memory_method" in data


# ----------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------

def _resident_bytes() -> int | None:
    """Current resident set size of this process (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    """Lifetime peak RSS of the process from getrusage (kilobytes on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if platform.system() == "Darwin" else int(rss) * 1024


class PeakMemory:
    """Peak memory while the ``with`` block runs.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak (tensors only, weights included).
    CPU: the process's resident set size polled every 5 ms from /proc/self/statm (weights, activations and
    allocator slack included); where /proc is missing, getrusage's lifetime ``ru_maxrss``.
    """

    POLL_SECONDS = 0.005

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def method(self) -> str:
        """One line naming what ``peak`` measures (goes into the report)."""
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated during sampling (weights included)"
        if _resident_bytes() is not None:
            return "peak process RSS during sampling, polled every 5 ms from /proc/self/statm (weights included)"
        return "process lifetime peak RSS (resource.getrusage ru_maxrss; weights included)"

    def _poll(self) -> None:
        while not self._stop.wait(self.POLL_SECONDS):
            self.peak = max(self.peak, _resident_bytes() or 0)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        elif _resident_bytes() is not None:
            self.baseline = self.peak = _resident_bytes() or 0
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        else:
            self.baseline = _maxrss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _resident_bytes() or 0)
        else:
            self.peak = _maxrss_bytes()


def load_pipeline(folder: str, device: torch.device, dtype: torch.dtype):
    """``DiffusionPipeline.from_pretrained(folder)`` moved to ``device``; load failures become UserErrors."""
    from diffusers import DiffusionPipeline

    # float32 is from_pretrained's default; only half precision needs the (renamed in 0.36+) dtype argument.
    kwargs = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    try:
        with quiet_loading(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"could not load a diffusers pipeline from {folder}: {type(e).__name__}: {first_line}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_scheduler(spec: str, base_scheduler: Any):
    """A fresh scheduler for ``spec`` (``name[:key=value...]``): ``Scheduler.from_config(base.config, **overrides)``.

    ``default`` rebuilds the folder's own scheduler class, so state from an earlier line never leaks in.
    Overrides given in ``spec`` win over the preset's (e.g. ``pndm:skip_prk_steps=false``).
    """
    import diffusers

    name, user_overrides = parse_scheduler_spec(spec)
    preset = SCHEDULERS[name]
    cls, overrides = (type(base_scheduler), {}) if preset is None else (getattr(diffusers, preset[0]), dict(preset[1]))
    return cls.from_config(base_scheduler.config, **{**overrides, **user_overrides})


class CallCounter:
    """Counts forward calls of the pipeline's denoiser (UNet / transformer): the number of function evaluations."""

    def __init__(self, pipe):
        self.count = 0
        net = getattr(pipe, "unet", None)
        if net is None:
            net = getattr(pipe, "transformer", None)
        self._handle = net.register_forward_pre_hook(self._hook) if net is not None else None

    def _hook(self, module, args) -> None:
        self.count += 1

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()


def images_to_uint8(images: Any) -> torch.Tensor:
    """Pipeline output (``pt`` tensor (N, 3, H, W) in [0, 1]) -> uint8 (N, 3, H, W) on the CPU."""
    x = images if torch.is_tensor(images) else torch.as_tensor(images)
    if x.dim() == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return (x.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)


def sample_cell(pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch_size: int,
                device: torch.device, on_batch=None) -> tuple[torch.Tensor, float, float]:
    """Sample ``len(prompts)`` images; image i uses ``torch.Generator().manual_seed(seed + i)``.

    Returns (uint8 (N, 3, H, W), wall seconds spent inside pipeline calls, denoiser calls per pipeline call).
    CPU generators give the same initial noise on every device.
    """
    counter = CallCounter(pipe)
    chunks, seconds, calls = [], 0.0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            generators = [torch.Generator().manual_seed(seed + start + j) for j in range(len(batch))]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = pipe(batch, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                       output_type="pt")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - t0
            calls += 1
            chunks.append(images_to_uint8(out.images))
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        counter.remove()
    return torch.cat(chunks), seconds, counter.count / max(calls, 1)


def save_grid(images: torch.Tensor, path: Path, columns: int) -> None:
    """Save up to ``GRID_ROWS`` rows x ``columns`` of uint8 (N, 3, H, W) images as one PNG."""
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.utils import make_grid

    x = images[: columns * GRID_ROWS]
    size = x.shape[-1]
    if size < GRID_MIN_CELL:  # small digits: blow up by nearest neighbour so pixels stay crisp
        scale = math.ceil(GRID_MIN_CELL / size)
        x = F.interpolate(x.float(), scale_factor=scale, mode="nearest").round().to(torch.uint8)
    elif size > GRID_MAX_CELL:  # 512x512 SD samples: shrink so a 10x10 grid stays a few MB
        x = F.interpolate(x.float(), scale_factor=GRID_MAX_CELL / size, mode="bilinear", antialias=True)
        x = x.round().clamp(0, 255).to(torch.uint8)
    grid = make_grid(x, nrow=columns, padding=2, pad_value=128)  # (3, H', W') uint8
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def slug(text: str) -> str:
    """A file-name-safe version of a line name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "line"


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "/").replace("\n", " ")


def report_markdown_table(report: dict) -> str:
    """A Markdown table, one row per (line, steps): FID, IS, KID, accuracy, s/img, peak memory.

    ``report`` is what :func:`run_bench` returns (or ``report.json`` loaded); model cards reuse this.
    """
    header = ("| Pipeline | Scheduler | Guidance | Steps | NFE | FID ↓ | IS ↑ | KID ↓ | Accuracy ↑ | s/img | "
              "Peak memory (MB) |")
    rows = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for line in report.get("lines", []):
        for r in line.get("results", []):
            lead = f"| {_cell(line['label'])} | {line['scheduler']} | {_fmt(line['guidance_scale'], 'g')} | {r['steps']} |"
            if r.get("error"):
                rows.append(f"{lead} — | failed: {_cell(r['error'][:80])} | — | — | — | — | — |")
                continue
            acc = r.get("prompt_accuracy")
            rows.append(
                f"{lead} {_fmt(r.get('nfe'), '.3g')} | {_fmt(r['fid'], '.3f')} | "
                f"{_fmt(r['isc_mean'], '.3f')} ± {_fmt(r['isc_std'], '.2f')} | "
                f"{_fmt(r['kid_mean'], '.4f')} ± {_fmt(r['kid_std'], '.4f')} | "
                f"{'—' if acc is None else format(acc, '.1%')} | {_fmt(r['seconds_per_image'], '.4f')} | "
                f"{_fmt(r['peak_memory_mb'], '.0f')} |"
            )
    return "\n".join(rows) + "\n"


def report_markdown(report: dict) -> str:
    """The whole report.md: setup, the table, notes on what was measured, the plot and the grids."""
    cfg, env = report["config"], report["environment"]
    lines = [
        "# diffdistill bench",
        "",
        f"Created {report['created']} on {env['device_name']} (torch {env['torch']}, diffusers {env['diffusers']}, "
        f"torch-fidelity {env['torch_fidelity']}, {env['torch_threads']} CPU threads).",
        "",
        f"- samples per cell: {cfg['num_samples']} (seeds {cfg['seed']}..{cfg['seed'] + cfg['num_samples'] - 1}, "
        f"the same at every step count), batch size {cfg['batch_size']}, dtype {cfg['dtype']}",
        f"- prompts: {report['prompts']['source']} ({report['prompts']['count']} prompts, cycled)",
        f"- reference: {report['reference']['name']} ({report['reference']['num_images']} images)",
        f"- feature extractor: {report['feature_extractor']} (FID and KID on its features, IS on its logits; "
        f"KID subset size {report['kid_subset_size']})",
        "- accuracy: fraction of samples the digits classifier reads as the digit the prompt names"
        + ("" if report["prompt_accuracy"] else " (not computed: not every prompt names a digit)"),
        "- s/img: wall time of the pipeline calls (text encoding, denoising and VAE decoding) divided by the "
        "number of images" + (", after one untimed warm-up call per line" if cfg["warmup"] else ""),
        f"- peak memory: {report['memory_method']}",
        "- NFE: denoiser forward calls per pipeline call (classifier-free guidance is batched into one call)",
        "",
        report_markdown_table(report),
        "![FID and latency against steps](fid_vs_steps.png)",
        "",
        "## Sample grids",
        "",
    ]
    for line in report["lines"]:
        for r in line["results"]:
            if r.get("grid"):
                lines.append(f"- {line['name']}, {r['steps']} steps: [{r['grid']}]({r['grid']})")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    """fid_vs_steps.png: FID and s/img (and accuracy when computed) against steps, log x, one line each."""
    import matplotlib.ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot, so the caller's matplotlib backend is left alone.
    panels = [("fid", "FID ↓", False), ("seconds_per_image", "seconds per image", True)]
    if report["prompt_accuracy"]:
        panels.append(("prompt_accuracy", "prompt accuracy ↑", False))
    fig = Figure(figsize=(5.2 * len(panels), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    all_steps = sorted({r["steps"] for line in report["lines"] for r in line["results"]})
    for ax, (key, title, log_y) in zip(axes[0], panels):
        for line in report["lines"]:
            pts = [(r["steps"], r[key]) for r in line["results"] if not r.get("error") and r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=line["name"])
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the benchmarked step counts
        ax.set_xticks(all_steps)
        ax.set_xticklabels([str(s) for s in all_steps])
        ax.set_xlabel("sampling steps")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize="small")
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


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------

def _folder_guidance(folder: str) -> float:
    """The folder's recommended guidance scale, else DEFAULT_GUIDANCE."""
    value = read_recommended_guidance(folder)
    return DEFAULT_GUIDANCE if value is None else value


def run_bench(cfg: BenchConfig) -> dict:
    """Sample, score and time every (pipeline, scheduler, guidance, steps) cell; write the report; return it.

    Everything is written to a temporary folder first and moved to ``cfg.output`` at the end, so an
    interrupted run leaves no half-written report. A cell whose sampling raises (e.g. a scheduler that
    cannot take that few steps) is recorded with its error instead of aborting the run.
    """
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = fidelity.resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    prompts_base = read_prompts(cfg.prompts)
    prompts = [prompts_base[i % len(prompts_base)] for i in range(cfg.num_samples)]
    digit_labels = [caption_to_label(p) for p in prompts]
    with_accuracy = all(k is not None for k in digit_labels)
    labels_t = torch.tensor(digit_labels) if with_accuracy else None
    reference = fidelity.load_reference(cfg.reference)
    grid_columns = len(prompts_base) if len(prompts_base) <= GRID_COLUMNS else GRID_COLUMNS
    guidance_by_pipe = [cfg.guidance or [_folder_guidance(p)] for p in cfg.pipelines]
    n_lines = sum(len(cfg.schedulers) * len(g) for g in guidance_by_pipe)
    multi_guidance = any(len(g) > 1 for g in guidance_by_pipe)
    meter_method = PeakMemory(device).method

    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(cfg).items()},
        "environment": environment_info(device),
        "reference": {"name": cfg.reference, "num_images": int(reference.shape[0])},
        "prompts": {"source": cfg.prompts or "the ten digit prompts", "count": len(prompts_base)},
        "feature_extractor": cfg.feature_extractor,
        "kid_subset_size": min(cfg.kid_subset_size, cfg.num_samples, int(reference.shape[0])),
        "prompt_accuracy": with_accuracy,
        "memory_method": meter_method,
        "lines": [],
    }
    staging = Path(tempfile.mkdtemp(prefix="diffdistill-bench-"))
    try:
        (staging / "grids").mkdir()
        bar = tqdm(total=n_lines * len(cfg.steps) * cfg.num_samples, unit="img", disable=not cfg.progress,
                   dynamic_ncols=True)
        with tempfile.TemporaryDirectory(prefix="diffdistill-fidcache-") as cache_dir, bar:
            for folder, label, guidances in zip(cfg.pipelines, cfg.labels, guidance_by_pipe):
                pipe = load_pipeline(folder, device, dtype)
                base_scheduler = pipe.scheduler
                for sched_name in cfg.schedulers:
                    pipe.scheduler = make_scheduler(sched_name, base_scheduler)
                    for guidance in guidances:
                        name = label
                        if len(cfg.schedulers) > 1 or sched_name != "default":
                            name += f" [{sched_name}]"
                        if multi_guidance:
                            name += f" g={guidance:g}"
                        line = {"name": name, "label": label, "pipeline": folder,
                                "pipeline_class": type(pipe).__name__, "scheduler": sched_name,
                                "scheduler_class": type(pipe.scheduler).__name__, "guidance_scale": guidance,
                                "results": []}
                        if cfg.warmup:
                            with contextlib.suppress(Exception):  # a failing cell reports its own error below
                                pipe(prompts[:min(cfg.batch_size, cfg.num_samples)], num_inference_steps=cfg.steps[0],
                                     guidance_scale=guidance, generator=torch.Generator().manual_seed(cfg.seed),
                                     output_type="pt")
                        for steps in cfg.steps:
                            bar.set_description(f"{name} {steps} steps")
                            grid_stem = f"{len(report['lines']):02d}_{slug(name)}_steps{steps}"  # index: unique
                            line["results"].append(run_cell(
                                pipe, cfg, prompts, labels_t, reference, steps, guidance, device, cache_dir,
                                staging, name, grid_stem, grid_columns, bar))
                        report["lines"].append(line)
                del pipe
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "report.md").write_text(report_markdown(report))
        plot_report(report, staging / "fid_vs_steps.png")
        publish(staging, Path(cfg.output))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report["output_dir"] = str(Path(cfg.output).resolve())
    return report


def run_cell(pipe, cfg: BenchConfig, prompts: list[str], labels: torch.Tensor | None, reference: torch.Tensor,
             steps: int, guidance: float, device: torch.device, cache_dir: str, staging: Path, name: str,
             grid_stem: str, grid_columns: int, bar) -> dict[str, Any]:
    """Sample one cell, then score it; returns the cell's result dict (with ``error`` when sampling failed)."""
    result: dict[str, Any] = {"steps": steps, "num_samples": cfg.num_samples}
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        bar.update(n)

    try:
        with PeakMemory(device) as mem:
            images, seconds, nfe = sample_cell(pipe, prompts, steps, guidance, cfg.seed, cfg.batch_size, device,
                                               on_batch=advance)
    except Exception as e:  # one scheduler/step combination failing must not lose the others
        bar.update(cfg.num_samples - done)
        message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        bar.write(f"warning: {name}, {steps} steps failed: {message}")
        result["error"] = message
        return result
    metrics = fidelity.compute_metrics(
        images, reference, feature_extractor=cfg.feature_extractor, inception_weights=cfg.inception_weights,
        classifier_path=cfg.classifier, kid_subset_size=cfg.kid_subset_size, device=device,
        batch_size=max(cfg.batch_size, 64), cache_dir=cache_dir)
    result.update(metrics)
    result["prompt_accuracy"] = (fidelity.prompt_accuracy(images, labels, cfg.classifier, device)
                                 if labels is not None else None)
    result["nfe"] = nfe
    result["seconds_per_image"] = seconds / cfg.num_samples
    result["seconds_total"] = seconds
    result["peak_memory_mb"] = mem.peak / 2**20
    result["memory_increase_mb"] = max(mem.peak - mem.baseline, 0) / 2**20
    grid = Path("grids") / f"{grid_stem}.png"
    save_grid(images, staging / grid, grid_columns)
    result["grid"] = grid.as_posix()
    return result


def publish(staging: Path, output: Path) -> None:
    """Move the finished report from ``staging`` to ``output`` (replacing an earlier report there)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists():
        # BenchConfig checked that a non-empty output holds an earlier report.json and --overwrite was given.
        shutil.rmtree(output)
    shutil.copytree(staging, output)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an argparse ``subparsers`` object; sets ``func=run_from_args``."""
    p = subparsers.add_parser(
        "bench",
        help="FID/IS/KID, accuracy, latency and memory of pipelines against sampling steps",
        description=__doc__.split("\n\n")[0] + " Writes report.json, report.md, fid_vs_steps.png and sample grids.",
    )
    p.add_argument("pipelines", nargs="+", metavar="PIPELINE_DIR", help="saved diffusers pipeline folders to compare")
    p.add_argument("--output", required=True, metavar="REPORT_DIR",
                   help="folder to write the report into (required; must be new, empty, or an earlier report)")
    p.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)),
                   help="comma list of num_inference_steps values (default: %(default)s)")
    p.add_argument("--guidance", default=None,
                   help=f"classifier-free guidance scale(s), comma list (default: the folder's {DIFFDISTILL_JSON} "
                        f"{GUIDANCE_KEY}, else {DEFAULT_GUIDANCE})")
    p.add_argument("--num-samples", type=int, default=1000,
                   help="images per cell (pipeline, scheduler, steps) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="image i uses torch.Generator().manual_seed(seed + i) (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=50, help="images per pipeline call (default: %(default)s)")
    p.add_argument("--scheduler", default="default",
                   help=f"comma list of schedulers to compare on each pipeline, from: {', '.join(SCHEDULERS)}; "
                        "'default' is the folder's own; append :key=value to change a config field, e.g. "
                        "ddim:timestep_spacing=trailing (default: %(default)s)")
    p.add_argument("--reference", default=fidelity.DIGITS_REFERENCE,
                   help="real images: 'digits' (the 1,797 scikit-learn digits at 32x32) or a folder of images "
                        "(default: %(default)s)")
    p.add_argument("--prompts", default=None,
                   help="text file, one prompt per line, cycled over the samples (default: the ten digit prompts)")
    p.add_argument("--feature-extractor", default=None, choices=list(fidelity.FEATURE_EXTRACTORS),
                   help="features for FID/IS/KID (default: digits-classifier for --reference digits, "
                        "else inception-v3-compat)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"local {fidelity.INCEPTION_WEIGHTS_FILENAME} for inception-v3-compat "
                        "(default: torch.hub's cache; never downloaded)")
    p.add_argument("--classifier", default=None, metavar="DIR",
                   help="digits classifier folder (default: assets/digits-classifier)")
    p.add_argument("--kid-subset-size", type=int, default=1000,
                   help="KID subset size, clamped to the sample counts (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="pipeline dtype; half precision needs cuda (default: %(default)s)")
    p.add_argument("--label", action="append", default=None, metavar="NAME",
                   help="name for a pipeline's lines, repeated once per pipeline in order (default: folder names)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default (default: %(default)s)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed warm-up call before each line (default: warm up)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier report in REPORT_DIR (default: refuse)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bar (default: show it)")
    p.set_defaults(func=run_from_args)
    return p


def run_from_args(args: argparse.Namespace) -> int:
    """CLI entry: build a BenchConfig from parsed args, run it, print the table; 0 if every cell ran, else 1."""
    cfg = BenchConfig(
        pipelines=args.pipelines, output=args.output, steps=args.steps, guidance=args.guidance,
        num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size, schedulers=args.scheduler,
        reference=args.reference, prompts=args.prompts, feature_extractor=args.feature_extractor,
        inception_weights=args.inception_weights, classifier=args.classifier, kid_subset_size=args.kid_subset_size,
        device=args.device, dtype=args.dtype, labels=args.label, threads=args.threads, warmup=args.warmup,
        overwrite=args.overwrite, progress=args.progress,
    )
    report = run_bench(cfg)
    print(report_markdown_table(report), end="")
    print(f"report written to {report['output_dir']}")
    failed = [r for line in report["lines"] for r in line["results"] if r.get("error")]
    return 1 if failed else 0
