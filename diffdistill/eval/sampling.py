"""Sampling and measurement for ``diffdistill bench``: load a pipeline, swap its scheduler, sample a cell
exactly as plain diffusers does, and time it, count its denoiser calls and measure its peak memory.

Image i of every cell uses ``torch.Generator().manual_seed(seed + i)`` and prompt i, at every step count
and for every pipeline: that shared noise is what makes comparisons between cells paired.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from diffdistill.errors import UserError, first_line
from diffdistill.eval.config import SCHEDULERS, parse_scheduler_spec
from diffdistill.images import save_grid as images_grid
from diffdistill.loading import absent_parts, quiet_loading, refused_pickle
from diffdistill.solvers import scheduler_from_config

GRID_COLUMNS = 10  # one column per digit prompt
GRID_ROWS = 10
GRID_MIN_CELL = 64  # nearest-upscale smaller samples so 32x32 digits are visible in the grid
GRID_MAX_CELL = 256


# ----------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------

def load_pipeline(folder: str, device: torch.device, dtype: torch.dtype, variant: str = ""):
    """``DiffusionPipeline.from_pretrained(folder, variant=...)`` moved to ``device``; load failures become UserErrors."""
    from diffusers import DiffusionPipeline

    # float32 is from_pretrained's default; only half precision needs the (renamed in 0.36+) dtype argument.
    kwargs = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    if variant:
        kwargs["variant"] = variant
    with contextlib.suppress(OSError, ValueError):  # an unreadable model_index.json fails in from_pretrained below
        kwargs.update(absent_parts(json.loads((Path(folder) / "model_index.json").read_text())))
    try:
        with quiet_loading(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        refused = refused_pickle(e)
        if refused:
            raise UserError(f"could not load a diffusers pipeline from {folder}: {refused}") from None
        raise UserError(f"could not load a diffusers pipeline from {folder}: {type(e).__name__}: {first_line(e)}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_scheduler(folder: str):
    """The folder's own scheduler (``scheduler/scheduler_config.json``), without loading any weights."""
    import diffusers

    path = Path(folder) / "scheduler"
    try:
        cls_name = json.loads((path / "scheduler_config.json").read_text())["_class_name"]
        return getattr(diffusers, cls_name).from_pretrained(str(path))
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise UserError(f"could not load the scheduler of {folder}: {type(e).__name__}: {e}") from None


def pipeline_class_name(folder: str) -> str:
    """The pipeline class named in the folder's model_index.json."""
    try:
        return str(json.loads((Path(folder) / "model_index.json").read_text())["_class_name"])
    except (OSError, ValueError, KeyError):
        return "unknown"


def make_scheduler(spec: str, base_scheduler: Any):
    """A fresh scheduler for ``spec`` (``name[:key=value...]``): ``Scheduler.from_config(base.config, **overrides)``.

    ``default`` rebuilds the folder's own scheduler class, so state from an earlier line never leaks in.
    Overrides given in ``spec`` win over the preset's (e.g. ``pndm:skip_prk_steps=false``).
    """
    import diffusers

    name, user_overrides = parse_scheduler_spec(spec)
    preset = SCHEDULERS[name]
    cls, overrides = (type(base_scheduler), {}) if preset is None else (getattr(diffusers, preset[0]), dict(preset[1]))
    return scheduler_from_config(cls, base_scheduler.config, **{**overrides, **user_overrides})


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
                device: torch.device, on_batch=None, call_kwargs: dict | None = None) -> tuple[torch.Tensor, float, float]:
    """Sample ``len(prompts)`` images; image i uses ``torch.Generator().manual_seed(seed + i)`` (and each batch's
    pipeline call the global seed ``seed + start``, for noise a scheduler draws unseeded); ``call_kwargs``:
    further pipeline-call arguments (the folder's ``read_call_kwargs``, ``folded_call_kwargs``).

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
            # The global RNG too, on a forked state: a scheduler whose step draws noise without the pipeline's
            # generator (SD3/Flux consistency students' FlowMatchEuler with stochastic_sampling) is then seeded.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + start)
                out = pipe(batch, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                           output_type="pt", **(call_kwargs or {}))
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
    """A bench sample grid: up to ``GRID_ROWS`` rows of uint8 (N, 3, H, W) images, small cells blown up."""
    images_grid(images, path, columns, pad_value=128, max_rows=GRID_ROWS, min_cell=GRID_MIN_CELL,
                max_cell=GRID_MAX_CELL)


def slug(text: str) -> str:
    """A file-name-safe version of a line name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "line"
