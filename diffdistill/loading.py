"""Reading diffusers pipeline folders: a one-line check of the layout, and quiet loading (no per-component bars)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .errors import UserError, require


def check_pipeline_folder(path: str | Path, what: str = "pipeline folder") -> dict:
    """The model_index.json of a saved diffusers pipeline folder; a one-line UserError for anything else."""
    folder = Path(path)
    require(folder.exists(), f"{what} not found: {folder}")
    require(folder.is_dir(), f"{what} {folder} is a file, not a diffusers pipeline folder")
    index_file = folder / "model_index.json"
    require(index_file.is_file(), f"{what} {folder} is not a diffusers pipeline (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{index_file} is not valid JSON ({e})") from None
    require(isinstance(index, dict) and "_class_name" in index, f"{index_file} has no _class_name")
    for name, spec in index.items():
        # Components are [library, class]; [null, null] marks an absent optional one (e.g. safety_checker).
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        require((folder / name).is_dir(), f"{folder}: component folder {name}/ listed in model_index.json is missing")
    return index


@contextlib.contextmanager
def quiet_loading():
    """Inside the block, diffusers/transformers show no loading bars and log errors only."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    levels = (dlog.get_verbosity(), tlog.get_verbosity())
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()
