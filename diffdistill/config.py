"""Run configuration: dataclasses validated in ``__post_init__``, a YAML file, and ``--flag`` overrides.

Precedence: dataclass defaults < ``--config FILE.yaml`` < command-line flags. The resolved config is
saved as ``config.yaml`` in the run folder, so every run can be reproduced from its own output.

Every field carries its help text in ``metadata["help"]``; the CLI turns each field into a flag
(``learning_rate`` -> ``--learning-rate``) so help text and defaults live in exactly one place.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import UserError, require, require_at_least
from .loading import SINGLE_FILE_HELP
from .sharding import SHARDING

MIXED_PRECISION = ("no", "fp16", "bf16")
FLOAT32_MAX = 3.4028234663852886e38
SEED_LIMIT = 2**32  # numpy's (and so accelerate's set_seed's) seeds are 0 .. 2**32 - 1


def require_seed(seed: int, flag: str = "--seed") -> None:
    """A seed every RNG takes (numpy's range, the narrowest)."""
    require(0 <= seed < SEED_LIMIT, f"{flag} must be in [0, 2**32), got {seed}")


def require_adam_step_fits(lr: float, beta1: float, flag: str) -> None:
    """AdamW's first step moves weights by up to lr / (1 - beta1), which must be a float32 number."""
    require(lr / (1 - beta1) < FLOAT32_MAX, f"{flag} {lr} is too large: AdamW's first step "
                                            f"(lr / (1 - beta1)) overflows float32")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with help text (shown by ``--help``)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """What the shared trainer needs: optimiser, schedule, precision, checkpoints, validation."""

    max_train_steps: int = opt(1000, "optimiser steps to train for")
    max_train_minutes: float = opt(0.0, "also stop (checkpoint, export, as at the last step) once this many minutes of "
                                        "training have passed in this invocation (0: no time limit)")
    batch_size: int = opt(32, "batch size per process (per device)")
    learning_rate: float = opt(1e-5, "peak learning rate of AdamW")
    lr_scheduler: str = opt("constant_with_warmup", f"learning-rate schedule (diffusers get_scheduler): {', '.join(LR_SCHEDULERS)}; "
                                                    "progressive runs it anew in every stage")
    lr_warmup_steps: int = opt(100, "linear warm-up steps of the learning rate")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    gradient_accumulation_steps: int = opt(1, "micro-batches accumulated per optimiser step (every phase accumulates "
                                              "all of them, then steps once: the update of one K-times larger batch)")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables clipping)")
    mixed_precision: str = opt("no", "mixed precision through accelerate: no, fp16 or bf16")
    gradient_checkpointing: bool = opt(False, "trade compute for memory in the student UNet")
    enable_xformers: bool = opt(False, "use xformers memory-efficient attention (needs the [gpu] extra)")
    torch_compile: bool = opt(False, "compile the trained networks with torch.compile (inductor, through accelerate)")
    seed: int = opt(0, "seed for weights, noise and data order")
    checkpointing_steps: int = opt(500, "save a resumable checkpoint every N steps (0: only at the end)")
    checkpoints_total_limit: int = opt(2, "keep at most this many checkpoints (0: keep all)")
    resume_from_checkpoint: str = opt("", "'latest' or a checkpoint folder to resume from ('' starts fresh)")
    validation_steps: int = opt(250, "save a sample grid PNG every N steps (0: only at the end)")
    log_every: int = opt(10, "write a log row every N steps: the means of the losses over those N steps (they stay "
                                 "on the device in between: one host sync per step, for the finiteness check)")
    student_ema_decay: float = opt(0.0, "keep an EMA of the student for export with this decay (0: off); "
                                       "diffusers' EMAModel warms up: the decay at step n is min(this, n / (n + 9)), "
                                       "so 0.999 is reached only after about 9,000 steps")
    report_to: str = opt("csv", "where logs go: csv, tensorboard, or csv,tensorboard")
    sharding: str = opt("none", "none (a multi-process launch is DDP: every rank holds whole modules) or fsdp2: the "
                                "trainer shards the student, fake score and EMA target across the ranks with FSDP2 "
                                "(fully_shard) and writes sharded checkpoints; the frozen teacher stays whole on "
                                "every rank. An accelerate config that selects FSDP selects fsdp2")

    def __post_init__(self):
        for name in ("max_train_steps", "batch_size", "gradient_accumulation_steps", "log_every"):
            require(getattr(self, name) > 0, f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        require_at_least(self, 0, "lr_warmup_steps", "checkpointing_steps", "checkpoints_total_limit", "validation_steps",
                         "max_train_minutes")
        require(self.learning_rate > 0, f"--learning-rate must be > 0, got {self.learning_rate}")
        require_at_least(self, 0, "max_grad_norm", "weight_decay", "adam_epsilon")
        for name in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, name) < 1, f"{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        require_adam_step_fits(self.learning_rate, self.adam_beta1, "--learning-rate")
        require_seed(self.seed)
        require(0 <= self.student_ema_decay < 1, f"--student-ema-decay must be in [0, 1), got {self.student_ema_decay}")
        require(self.mixed_precision in MIXED_PRECISION,
                f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        require(self.lr_scheduler in LR_SCHEDULERS,
                f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        require(self.sharding in SHARDING, f"--sharding must be one of {', '.join(SHARDING)}, got {self.sharding!r}")
        if self.sharding == "fsdp2":
            require(self.mixed_precision != "fp16", "--sharding fsdp2 trains in fp32 or bf16 (--mixed-precision bf16): "
                                                    "fp16's loss scaling is not wired for sharded gradients")
            require(not self.torch_compile, "--torch-compile is not supported with --sharding fsdp2 yet")
        for r in self.report_to.split(","):
            require(r in ("csv", "tensorboard", ""), f"--report-to must be csv and/or tensorboard, got {self.report_to!r}")


@dataclass
class DataConfig:
    """Where training images, captions or prompts come from (see diffdistill.data)."""

    dataset: str = opt("digits", "'digits' (built in), an image folder with metadata.jsonl or metadata.csv (or a "
                                 "train/ folder with one), a HF dataset name or "
                                 "path, webdataset shards (*.tar, brace patterns allowed), or a prompts .txt file")
    image_column: str = opt("image", "image column of a HF dataset / imagefolder")
    caption_column: str = opt("text", "caption column of a HF dataset / imagefolder")
    resolution: int = opt(0, "training image size in pixels (0: the teacher's native size)")
    max_samples: int = opt(0, "use at most this many examples (0: all)")
    dataloader_num_workers: int = opt(0, "DataLoader worker processes")
    max_bad_image_fraction: float = opt(0.01, "images that cannot be decoded are skipped and named on stderr; the "
                                              "run fails (one line) only if more than this fraction of them is bad")
    cache_latents: bool = opt(False, "encode every training image once, before training, to its VAE posterior (mean "
                                     "and std, kept in memory) and draw each step's latents from it with the run's RNG, "
                                     "as without the cache: the same training, minus a VAE encoder pass per batch "
                                     "(image datasets that fit in memory; not webdataset shards)")
    shuffle_buffer: int = opt(1000, "webdataset shards: samples held in the shuffle buffer of each data-loader "
                                    "worker (1: no shuffling within shards)")

    FORMER_OPTIONS: ClassVar[dict[str, str]] = {
        "uncond_prob": "was removed: no method trains a network that is ever queried without its prompt (the "
                       "teacher's own CFG dropout is train_scripts/train_digits_sd.py --uncond-prob)"}

    def __post_init__(self):
        require(bool(self.dataset), "--dataset must not be empty")
        require(self.resolution >= 0, f"--resolution must be >= 0, got {self.resolution}")
        require(self.max_samples >= 0, f"--max-samples must be >= 0, got {self.max_samples}")
        require(self.dataloader_num_workers >= 0, f"--dataloader-num-workers must be >= 0, got {self.dataloader_num_workers}")
        require(self.shuffle_buffer >= 1, f"--shuffle-buffer must be >= 1, got {self.shuffle_buffer}")
        require(0 <= self.max_bad_image_fraction <= 1,
                f"--max-bad-image-fraction must be in [0, 1], got {self.max_bad_image_fraction}")


@dataclass
class RunConfig:
    """One distillation run: teacher, method, target step count, output folder and the parts above."""

    method: str = opt("lcm", "distillation method")
    teacher: str = opt("assets/digits-sd", "teacher: a diffusers Stable Diffusion folder, a hub id, or a single-file "
                                           "checkpoint (.safetensors in the original SD layout; see "
                                           "--single-file-config)")
    single_file_config: str = opt("assets/digits-sd", SINGLE_FILE_HELP)
    output: str = opt("", "run folder (pipeline/, checkpoints/, samples/, logs)")
    steps: int = opt(4, "sampling steps the exported student is made for")
    overwrite: bool = opt(False, "replace a finished export in --output")
    revision: str = opt("", "hub revision of the teacher ('' = default branch)")
    variant: str = opt("", "weights variant of the teacher, e.g. fp16 ('' = default)")
    local_files_only: bool = opt(False, "never contact the hub for the teacher (set HF_HUB_OFFLINE=1 for the same)")
    export_guidance_scale: float = opt(-1.0, "guidance_scale written into the exported pipeline's preset "
                                             "(diffdistill.json) and model card, and used for the validation grids and "
                                             "the card's benchmark (-1: the method's choice: the middle of [--w-min, "
                                             "--w-max] for a student with a guidance embedding, else 1)")
    drop_safety_checker: bool = opt(False, "export without the teacher's safety checker and feature extractor "
                                           "(the model card says so); by default the export keeps them, and the "
                                           "teacher's requires_safety_checker, as the teacher has them")
    student_from: str = opt("", "a pipeline folder whose UNet the student starts from (e.g. a compressed kd student: "
                                "lcm, progressive, add, dmd and sds then distil steps into it; the teacher stays "
                                "--teacher) ('': a copy of the teacher's UNet)")
    benchmark_samples: int = opt(200, "samples per step count for the FID table of the model card (0: skip)")
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method_args: dict = field(default_factory=dict)

    FORMER_OPTIONS: ClassVar[dict[str, str]] = {
        "recommended_guidance_scale": "was renamed: use --export-guidance-scale (export_guidance_scale at the top "
                                      "level of a config file)"}

    def __post_init__(self):
        require(self.steps > 0, f"--steps must be > 0, got {self.steps}")
        require(bool(self.teacher), "--teacher must not be empty")
        # The card's FID is computed on the digits classifier's 64-d features: its covariance needs more samples.
        require(self.benchmark_samples == 0 or self.benchmark_samples > 64,
                f"--benchmark-samples must be 0 (no card benchmark) or more than 64 (FID's covariance of 64-d "
                f"features), got {self.benchmark_samples}")
        require(self.export_guidance_scale == -1 or self.export_guidance_scale >= 0,
                f"--export-guidance-scale must be >= 0 (or -1: the method's choice), got {self.export_guidance_scale}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _resolve_type(tp: Any) -> type:
    """The plain Python type of a dataclass field annotation (``int | None`` -> int)."""
    if isinstance(tp, str):
        tp = eval(tp, {"dict": dict, "list": list})  # our own annotations only: int, float, str, bool, dict
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _resolve_type(args[0])
    return tp


def _optional(tp: Any) -> bool:
    """Whether an annotation admits None (``int | None``)."""
    return type(None) in typing.get_args(tp)


def coerce(value: Any, tp: type, name: str) -> Any:
    """Convert a YAML or command-line value to the field's type, with a one-line error naming the field."""
    tp = _resolve_type(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{_flag(name)} expects true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{_flag(name)} expects a number, got {value!r}")
        try:
            v = float(value) if tp is float else int(str(value), 10) if isinstance(value, str) else value
        except (TypeError, ValueError):
            raise UserError(f"{_flag(name)} expects {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        require(not isinstance(v, float) or math.isfinite(v), f"{_flag(name)} expects a finite number, got {value!r}")
        if tp is int and (not isinstance(v, int) or isinstance(v, bool)):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise UserError(f"{_flag(name)} expects an integer, got {value!r}")
        return v
    if tp is str:
        return "" if value is None else str(value)
    return value


def reject_former_options(cls, names, where: str) -> None:
    """One-line UserError for an option ``cls`` knows under a former name (its ``FORMER_OPTIONS``: former name ->
    what became of it), so that an old flag or YAML key names its replacement instead of being ignored."""
    former = getattr(cls, "FORMER_OPTIONS", {})
    for name in names:
        require(name not in former, f"{_flag(name)} ({name} in {where}) {former.get(name)}")


def build_dataclass(cls, values: dict, where: str):
    """Instantiate ``cls`` from a dict, rejecting unknown keys and coercing types (validation in __post_init__)."""
    reject_former_options(cls, values, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    require(not unknown, f"unknown option(s) {', '.join(unknown)} in {where}; valid: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: None if v is None and _optional(hints[k]) else coerce(v, hints[k], k) for k, v in values.items()}
    return cls(**kwargs)


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML preset (a mapping); one-line errors for a missing or malformed file.

    A preset may name another as ``base: FILE.yaml`` (relative to its own folder): the base is read first and
    this file's values override it, key by key within ``train:``, ``data:`` and ``method_args:`` (a variant
    states only what it changes). The run's saved ``config.yaml`` is the resolved whole, with no ``base``.
    """
    p = Path(path)
    require(p.is_file(), f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    require(isinstance(data, dict), f"config file {path} must hold a mapping, got {type(data).__name__}")
    if "base" not in data:
        return data
    base = data.pop("base")
    require(isinstance(base, str) and base.strip() != "",
            f"'base:' in config file {path} must name a YAML file, got {base!r}")
    base_path = (p.parent / base).resolve()
    chain = (*_seen, p.resolve())
    require(base_path not in chain, f"config file {path}: 'base: {base}' leads back to "
                                    f"{base_path.name} (a cycle of bases)")
    require(base_path.is_file(), f"config file {path}: its base {base} (= {base_path}) was not found")
    merged = load_yaml(base_path, chain)
    for key, value in data.items():
        if key in (*SECTIONS, "method_args") and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


SECTIONS = {"train": TrainConfig, "data": DataConfig}


def build_run_config(yaml_values: dict, overrides: dict) -> RunConfig:
    """Merge YAML sections (top level, ``train:``, ``data:``, ``method_args:``) with flat CLI overrides.

    A flat override goes to whichever part owns that name: the run, the trainer, the data, or else
    the method's own config (checked later against the method's dataclass).
    """
    top = {k: v for k, v in yaml_values.items() if k not in SECTIONS and k != "method_args"}
    for name in (*SECTIONS, "method_args"):
        v = yaml_values.get(name) or {}
        require(isinstance(v, dict), f"'{name}:' in the config file must be a mapping, got {type(v).__name__}")
    sections = {name: dict(yaml_values.get(name) or {}) for name in SECTIONS}
    method_args = dict(yaml_values.get("method_args") or {})
    run_fields = {f.name for f in dataclasses.fields(RunConfig)} - set(SECTIONS) - {"method_args"}
    section_fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}
    # before the routing below sends a former name on to the method's options
    for cls, where in ((RunConfig, "run settings"), *((c, f"{n} settings") for n, c in SECTIONS.items())):
        reject_former_options(cls, [*top, *overrides], where)
    for k, v in overrides.items():
        if k in run_fields:
            top[k] = v
        elif (sec := next((s for s, f in section_fields.items() if k in f), None)) is not None:
            sections[sec][k] = v
        else:
            method_args[k] = v
    train = build_dataclass(TrainConfig, sections["train"], "train settings")
    data = build_dataclass(DataConfig, sections["data"], "data settings")
    unknown_top = sorted(set(top) - run_fields)
    require(not unknown_top, f"unknown option(s) {', '.join(unknown_top)} in the config file")
    run = build_dataclass(RunConfig, {**top, "train": train, "data": data, "method_args": method_args}, "run settings")
    return run


def to_dict(cfg) -> dict:
    """A dataclass (nested) as plain dict, for YAML/JSON."""
    return dataclasses.asdict(cfg)


def save_yaml(data: dict, path: Path) -> None:
    """Write a mapping as YAML (keys in definition order)."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
