"""Which checkpoints to trust: the run that wrote them (a run id) and whether they are whole (a file manifest).

A checkpoint folder ``checkpoint-<step>`` ends with ``trainer_state.json`` (written last), which names the
run id of the run folder that wrote it and the size of every other file in it. ``checkpoint_problem`` checks
both without loading any tensor, so ``latest`` never picks a truncated, half-synced or foreign checkpoint.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import require

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
STATE_KEYS = ("step", "batches_seen", "method", "modules", "run_id", "files")


def new_run_id() -> str:
    """A fresh run id: every checkpoint of a run carries it."""
    return uuid.uuid4().hex


def checkpoint_step(path: Path) -> int:
    """The step number in a ``checkpoint-<step>`` folder name."""
    return int(path.name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in ``folder`` that finished writing (have trainer_state.json), oldest first; temporary
    folders are never listed. Whether each is whole and this run's is ``checkpoint_problem``'s question."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def file_manifest(folder: Path) -> dict[str, int]:
    """name -> size in bytes of every file of a checkpoint being written (trainer_state.json aside)."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != STATE_FILE}


def read_state(path: Path) -> dict | None:
    """A checkpoint's trainer_state.json, or None when it is unreadable or lacks a field."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and all(k in state for k in STATE_KEYS) else None


def checkpoint_problem(path: Path, run_id: str | None) -> str | None:
    """Why ``path`` cannot be trusted (one line naming the file), or None when it is whole and ``run_id``'s."""
    state = read_state(path)
    if state is None:
        return f"{path / STATE_FILE} is unreadable or incomplete"
    if state["run_id"] != run_id:
        return f"{path} was written by another run (run id {state['run_id']}, this run's is {run_id})"
    files = state["files"]
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} holds {f.stat().st_size} bytes, {size} were written"
        if name.endswith(".json"):
            try:
                json.loads(f.read_text())
            except ValueError:
                return f"{f} is not valid JSON"
    for name in state["modules"]:
        if f"model_{name}.safetensors" not in files:
            return f"{path / f'model_{name}.safetensors'} is missing"
    return None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def newest_valid_checkpoint(folder: Path, run_id: str | None, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest whole checkpoint of run ``run_id`` in ``folder``; each newer one that is not gets a one-line
    ``warn``ing. None when the folder has no checkpoint at all."""
    found = list_checkpoints(folder)
    problems = []
    for p in reversed(found):
        problem = checkpoint_problem(p, run_id)
        if problem is None:
            return p
        problems.append(problem)
        if warn is not None:
            warn(f"warning: skipping {p.name}: {problem}")
    require(not found, f"no usable checkpoint in {folder}: {problems[0] if problems else ''}")
    return None


def resolve_resume(spec: str, checkpoints_dir: Path, run_id: str | None,
                   warn: Callable[[str], None] | None = _stderr) -> Path | None:
    """'' -> None; 'latest' -> the newest whole checkpoint of this run (None when there is none at all);
    else the named folder, which must be whole and this run's (one-line UserError naming the file)."""
    if not spec:
        return None
    if spec == "latest":
        return newest_valid_checkpoint(checkpoints_dir, run_id, warn)
    p = Path(spec)
    if not p.is_absolute() and not p.exists():
        p = checkpoints_dir / spec
    require(p.is_dir() and (p / STATE_FILE).is_file(), f"checkpoint {spec}: not a complete checkpoint folder")
    problem = checkpoint_problem(p, run_id)
    require(problem is None, f"checkpoint {spec}: {problem}")
    return p
