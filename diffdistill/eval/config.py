"""``diffdistill bench`` settings: :class:`BenchConfig`, validated in ``__post_init__`` before anything is sampled.

Every field carries its help text (``opt``); ``diffdistill bench``'s flags are generated from these fields
(:mod:`diffdistill.eval.cli`), so help and default live here only. Comma strings are accepted wherever a
list is (``steps="1,2,4"``), as on the command line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffdistill.config import opt
from diffdistill.digits import DATASET_KEY, DIGIT_PROMPTS, DIGITS_DATASET, caption_to_label
from diffdistill.errors import UserError, require
from diffdistill.eval import fidelity
from diffdistill.loading import SINGLE_FILE_HELP, local_pipeline
from diffdistill.outputs import check_writable

DEFAULT_STEPS = "1,2,4,8,50"
# Images per cell. On digits-SD, 1,000 paired samples resolve the teacher's 4- from its 50-step DDIM;
# benchmarks/tools/resolve_n.py measures interval widths against N for any pipeline.
DEFAULT_NUM_SAMPLES = 1000
# diffusers' StableDiffusionPipeline default; a folder's diffdistill.json may recommend another value.
DEFAULT_GUIDANCE = 7.5
GUIDANCE_KEY = "recommended_guidance_scale"
DIFFDISTILL_JSON = "diffdistill.json"
DEFAULT_CACHE_DIR = "~/.cache/diffdistill/bench"
DTYPES = ("float32", "float16", "bfloat16")
# Percentile bootstrap tails need a few replicates beyond each quantile.
MIN_TAIL_REPLICATES = 5

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
    # flow-matching families (SD3, Flux): the teacher's shift and grid, Euler or Heun steps
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
}

INTERVALS_HELP = (
    "Intervals: FID by a basic (reverse-percentile) bootstrap over generated samples and reference images "
    "together (an interval for the population FID; a percentile interval would sit above it, since "
    "resampled duplicates inflate FID); accuracy, precision and recall by Wilson intervals; KID and IS as "
    "torch-fidelity's mean ± sd over subsets/splits. Comparisons: paired bootstrap (the same resampled seeds, "
    "prompts and reference images on both sides); resolved = the interval excludes 0."
)

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


def read_export_info(folder: str | Path) -> dict:
    """The folder's diffdistill.json as a dict ({} when absent); a one-line UserError when it is not JSON."""
    path = Path(folder) / DIFFDISTILL_JSON
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    return meta if isinstance(meta, dict) else {}


def read_call_kwargs(folder: str | Path, steps: int) -> dict:
    """The pipeline-call arguments the folder's export states for ``steps`` steps (``call_kwargs_by_steps``, or
    ``call_kwargs`` at its own ``num_inference_steps``: e.g. an SD3 student's training noise levels); {} else."""
    info = read_export_info(folder)
    by_steps = info.get("call_kwargs_by_steps", {})
    value = by_steps.get(str(steps)) if isinstance(by_steps, dict) and str(steps) in by_steps else (
        info.get("call_kwargs", {}) if info.get("num_inference_steps") == steps else {})
    require(isinstance(value, dict), f"{Path(folder) / DIFFDISTILL_JSON}: call arguments must be an object, got {value!r}")
    return value


def is_digits_pipeline(folder: str | Path) -> bool:
    """Whether the folder's diffdistill.json says ``"dataset": "digits"``: digits-SD (assets/digits-sd), the
    tiny test pipelines, and every export of a digits teacher or of a run on --dataset digits say so."""
    return read_export_info(folder).get(DATASET_KEY) == DIGITS_DATASET


def read_recommended_guidance(folder: str | Path) -> float | None:
    """``recommended_guidance_scale`` from the folder's diffdistill.json, or None when absent."""
    path = Path(folder) / DIFFDISTILL_JSON
    value = read_export_info(folder).get(GUIDANCE_KEY)
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
    """Default line labels: folder names (a single-file checkpoint's file name without .safetensors), with ``-2``,
    ``-3``... appended to repeats."""
    labels, seen = [], {}
    for p in pipelines:
        path = Path(p).resolve()
        name = (path.stem if path.is_file() else path.name) or str(p)
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return labels


@dataclass(frozen=True)
class CompareSide:
    """One side of a ``--compare`` pair: a pipeline label and/or a step count (None: every one)."""

    label: str | None
    steps: int | None

    def __str__(self) -> str:
        return "@".join(str(x) for x in (self.label, self.steps) if x is not None)


def parse_compare(value: str, labels: list[str], steps: list[int]) -> list[tuple[CompareSide, CompareSide]]:
    """``--compare`` -> pairs (A, B); A − B is reported cell by cell. See the field's help for the grammar."""
    if not value.strip():
        return []
    if value.strip() == "pipelines":
        require(len(labels) == 2, f"--compare pipelines needs exactly two pipeline folders, got {len(labels)}; "
                                  "to compare step counts of one folder give a step pair such as --compare 4:50")
        return [(CompareSide(labels[0], None), CompareSide(labels[1], None))]
    pairs = []
    for item in value.split(","):
        left, sep, right = item.strip().partition(":")
        require(bool(sep) and left and right and ":" not in right,
                f"--compare: {item.strip()!r} must look like A:B (e.g. 4:50, student@4:teacher@50, student:teacher "
                "or the word pipelines)")
        a, b = (_compare_side(s.strip(), labels, steps) for s in (left, right))
        require((a.steps is None) == (b.steps is None),
                f"--compare {item.strip()!r}: give a step count on both sides or on neither")
        require((a.label is None) == (b.label is None),
                f"--compare {item.strip()!r}: name a pipeline label on both sides or on neither")
        require(a != b, f"--compare {item.strip()!r} compares a cell with itself")
        pairs.append((a, b))
    return pairs


def _compare_side(text: str, labels: list[str], steps: list[int]) -> CompareSide:
    label, at, n = text.rpartition("@") if "@" in text else (("", "", text) if text.isdigit() else (text, "", ""))
    side = CompareSide(label or None, int(n) if n else None)
    require(not at or n.isdigit(), f"--compare: {text!r}: the step count after @ must be an integer")
    require(side.label is None or side.label in labels,
            f"--compare: no pipeline labelled {side.label!r} (labels: {', '.join(labels)})")
    require(side.steps is None or side.steps in steps,
            f"--compare: {side.steps} steps is not among --steps {','.join(map(str, steps))}")
    return side


@dataclass
class BenchConfig:
    """Everything ``run_bench`` needs; ``__post_init__`` normalises list fields and validates every input."""

    pipelines: list[str] = opt([], "saved diffusers pipeline folders (or hub ids) to benchmark")
    variant: str = opt("", "weights variant to load, e.g. fp16 ('' = the plain weights), as distill's --variant")
    single_file_config: str = opt("assets/digits-sd", SINGLE_FILE_HELP + " (a pipeline given as a .safetensors file "
                                                      "is converted to a temporary folder, named after the file)")
    revision: str = opt("", "hub revision of hub-id pipelines ('' = default branch)")
    local_files_only: bool = opt(False, "never contact the hub for hub-id pipelines (set HF_HUB_OFFLINE=1 for the same)")
    output: str = opt("", "folder to write the report into (required; must be new, empty, or an earlier report)")
    steps: list[int] | str = opt(DEFAULT_STEPS, "comma list of num_inference_steps values")
    guidance: list[float] | str | None = opt(
        None, f"classifier-free guidance scale(s), comma list (none: the folder's {DIFFDISTILL_JSON} "
              f"{GUIDANCE_KEY}, else {DEFAULT_GUIDANCE})")
    num_samples: int = opt(DEFAULT_NUM_SAMPLES, "images per cell (pipeline, scheduler, guidance, steps); FID needs "
                                                "more than the feature dimension (64 for digits-classifier, 2048 for "
                                                "inception-v3-compat); interval widths shrink like 1/sqrt(N) "
                                                "(benchmarks/tools/resolve_n.py measures them)")
    seed: int = opt(0, "image i uses torch.Generator().manual_seed(seed + i); also seeds the bootstrap")
    batch_size: int = opt(50, "images per pipeline call")
    schedulers: list[str] | str = opt(
        "default", f"comma list of schedulers to run on each pipeline, from: {', '.join(SCHEDULERS)}; 'default' is "
                   "the folder's own; append :key=value to change a config field, e.g. ddim:timestep_spacing=trailing")
    compare: str = opt("", "differences to report with their interval and a verdict: 'pipelines' (the first of two "
                           "folders minus the second, cell by cell), a step pair such as 4:50 (within every line), "
                           "or LABEL@STEPS:LABEL@STEPS such as student@4:teacher@50 (LABEL:LABEL: at every step "
                           "count); comma-separate several; '' compares nothing")
    confidence: float = opt(0.95, "confidence level of every interval")
    bootstrap: int = opt(1000, "bootstrap replicates for FID, CLIP score and comparisons; each costs one FID from "
                               "statistics (torch-fidelity, on the CPU): about 1 ms with 64-d digits features, but "
                               "about 40 s with 2048-d Inception features on 2 cores")
    reference: str | None = opt(None, "real images: 'digits' (the 1,797 scikit-learn digits at 32x32) or a folder "
                                      "of images (none: digits, for digits pipelines only: those whose "
                                      f"{DIFFDISTILL_JSON} says \"{DATASET_KEY}\": \"{DIGITS_DATASET}\")")
    prompts: str | None = opt(None, "text file, one prompt per line, cycled over the samples (none: the ten digit "
                                    "prompts, for digits pipelines only)")
    feature_extractor: str | None = opt(None, f"features for FID/KID/IS/precision/recall: "
                                              f"{', '.join(fidelity.FEATURE_EXTRACTORS)} (none: digits-classifier for "
                                              "--reference digits, else inception-v3-compat)")
    inception_weights: str | None = opt(None, f"local {fidelity.INCEPTION_WEIGHTS_FILENAME} (or .safetensors) for "
                                              "inception-v3-compat, read without unpickling code (none: torch.hub's "
                                              "cache; never downloaded)")
    classifier: str | None = opt(None, "digits classifier folder (none: assets/digits-classifier)")
    clip_model: str | None = opt(None, "local CLIP folder (transformers CLIPModel + tokenizer + image processor) for "
                                       "the CLIP score of each sample against its prompt (none: no CLIP score)")
    kid_subset_size: int = opt(1000, "KID subset size, clamped to the sample counts")
    prc_neighborhood: int = opt(3, "k of the k-NN manifolds behind precision and recall")
    device: str = opt("cpu", "cpu or cuda[:N]")
    dtype: str = opt("float32", f"pipeline dtype: {', '.join(DTYPES)}; half precision needs cuda")
    labels: list[str] | str | None = opt(None, "comma list of names, one per pipeline (none: folder names)")
    threads: int = opt(0, "torch CPU threads, 0 = torch's default")
    cache_dir: str = opt(DEFAULT_CACHE_DIR, "where reference features and finished cells (features, scores, grid "
                                            "images, timings) are kept, keyed by the content of the weights, "
                                            "scheduler config, steps, guidance, seeds, N, prompts, dtype and device "
                                            "(safetensors + JSON)")
    no_cache: bool = opt(False, "neither read nor write --cache-dir")
    no_warmup: bool = opt(False, "skip the untimed warm-up call before each line")
    overwrite: bool = opt(False, "replace an earlier report in --output")
    no_progress: bool = opt(False, "hide the progress bar")

    def __post_init__(self) -> None:
        if isinstance(self.pipelines, (str, Path)):
            self.pipelines = [self.pipelines]
        require(len(self.pipelines) > 0, "give at least one pipeline folder")
        require(bool(self.output), "--output is required")
        names = [str(p) for p in self.pipelines]
        self.pipelines = [local_pipeline(p, self.revision, self.variant, self.local_files_only, "pipeline folder",
                                         self.single_file_config) for p in names]
        self.steps = parse_steps(self.steps)
        self.guidance = parse_guidance(self.guidance)
        self.schedulers = parse_names(self.schedulers) or ["default"]
        for spec in self.schedulers:
            check_scheduler_overrides(spec, self.pipelines)
        for name in ("num_samples", "batch_size", "kid_subset_size", "bootstrap", "prc_neighborhood", "seed", "threads"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.kid_subset_size >= 2, f"--kid-subset-size must be >= 2, got {self.kid_subset_size}")
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        require(self.threads >= 0, f"--threads must be >= 0, got {self.threads}")
        require(isinstance(self.confidence, float) and 0.5 <= self.confidence < 1,
                f"--confidence must be in [0.5, 1), got {self.confidence!r}")
        tail = (1 - self.confidence) / 2
        need = math.ceil(MIN_TAIL_REPLICATES / tail)
        require(self.bootstrap >= need, f"--bootstrap {self.bootstrap} is too few for {self.confidence:g} intervals: "
                                        f"need at least {need} (>= {MIN_TAIL_REPLICATES} replicates in each tail)")
        if self.reference is None or self.prompts is None:
            other = next((n for p, n in zip(self.pipelines, names) if not is_digits_pipeline(p)), None)
            missing = " and ".join(f for f, v in (("--reference", self.reference), ("--prompts", self.prompts))
                                   if v is None)
            require(other is None, f"{other} is not a digits pipeline (its {DIFFDISTILL_JSON} does not say "
                                   f"\"{DATASET_KEY}\": \"{DIGITS_DATASET}\"): give {missing}, or it would be "
                                   "scored against handwritten digits with digit prompts")
        self.reference = str(self.reference or fidelity.DIGITS_REFERENCE)
        if self.reference != fidelity.DIGITS_REFERENCE:
            require(Path(self.reference).is_dir(),
                    f"--reference must be 'digits' or a folder of images, got {self.reference!r} (not a folder)")
        n_reference = fidelity.reference_size(self.reference)
        prompts = read_prompts(self.prompts)  # raises on a missing / empty file
        if self.feature_extractor is None:
            self.feature_extractor = (fidelity.DIGITS_EXTRACTOR if self.reference == fidelity.DIGITS_REFERENCE
                                      else fidelity.INCEPTION_EXTRACTOR)
        require(self.feature_extractor in fidelity.FEATURE_EXTRACTORS,
                f"unknown feature extractor {self.feature_extractor!r}; choose from {', '.join(fidelity.FEATURE_EXTRACTORS)}")
        if self.feature_extractor == fidelity.INCEPTION_EXTRACTOR:
            self.inception_weights = str(fidelity.resolve_inception_weights(self.inception_weights))
            fidelity.load_inception_state_dict(self.inception_weights)  # refuses code-carrying pickles now
        if self.feature_extractor == fidelity.DIGITS_EXTRACTOR or all(caption_to_label(q) is not None for q in prompts):
            # The classifier gives digits features and prompt accuracy: check it now, not after sampling.
            fidelity.resolve_classifier_files(self.classifier)
        dim = fidelity.feature_dim(self.feature_extractor, self.classifier)
        require(self.num_samples > dim,
                f"--num-samples {self.num_samples} is too small: FID's covariance of {dim}-d {self.feature_extractor} "
                f"features needs more samples than dimensions (at least {dim + 1})")
        require(n_reference > dim, f"--reference {self.reference} holds {n_reference} images; FID with {dim}-d "
                                   f"features needs at least {dim + 1}")
        require(1 <= self.prc_neighborhood < min(self.num_samples, n_reference) - 1,
                f"--prc-neighborhood must be in [1, {min(self.num_samples, n_reference) - 2}], got {self.prc_neighborhood}")
        if self.clip_model is not None:
            from diffdistill.eval.clip_score import check_clip_folder

            self.clip_model = str(check_clip_folder(self.clip_model))
        dev = fidelity.resolve_device(self.device)
        require(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        require(dev.type == "cuda" or self.dtype == "float32", f"--dtype {self.dtype} needs --device cuda")
        self.labels = parse_names(self.labels) if isinstance(self.labels, str) else list(self.labels or [])
        if not self.labels:
            self.labels = unique_labels(names)
        require(len(self.labels) == len(self.pipelines),
                f"give one label per pipeline: {len(self.labels)} labels for {len(self.pipelines)} pipelines")
        require(len(set(self.labels)) == len(self.labels), f"--labels values must differ, got {self.labels}")
        require(all(":" not in x and "@" not in x and "," not in x for x in self.labels),
                f"--labels must not contain ':', '@' or ',', got {self.labels}")
        parse_compare(self.compare, self.labels, self.steps)  # run_bench parses it again; errors belong here
        out = Path(self.output)
        check_writable(out)  # a file on the way, a read-only or virtual filesystem, no permission
        if out.is_dir() and any(out.iterdir()):
            require(self.overwrite, f"--output {out} is not empty; pass --overwrite to replace an earlier report")
            # Never delete a folder that is not one of our reports.
            require(is_bench_report(out), f"--output {out} is not empty and holds no bench report.json; "
                                          "choose a new or empty folder")
        self.output = str(out)

    @property
    def cache_path(self) -> Path | None:
        """The expanded cache folder, or None with ``no_cache``."""
        return None if self.no_cache else Path(os.path.expanduser(self.cache_dir))


def is_bench_report(folder: Path) -> bool:
    """True when ``folder/report.json`` was written by run_bench (so --overwrite may replace the folder)."""
    try:
        data = json.loads((folder / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "lines" in data and "memory_method" in data
