"""The on-disk checkpoint format: what a checkpoint holds, how it is written atomically and read back
exactly, and which checkpoints to trust.

A checkpoint folder ``checkpoint-<step>`` holds

* ``model_<name>.safetensors``      each state module's weights (only the trainable tensors of a partly
                                    frozen module, e.g. a LoRA: ``"partial"`` in the state file)
* ``optimizer_<phase>.pt``           AdamW state (plain tensors and numbers; read with ``weights_only=True``)
* ``lr_scheduler_<phase>.json``      the LR schedule's position
* ``ema.safetensors`` + ``ema.json`` the trainer's student EMA (``shadow_<i>`` tensors) and its step count
* ``rng_<rank>.safetensors``         every rank's torch RNG states
* ``method_state_<rank>.safetensors`` every rank's method state that no module holds (``extra_state``: DMD's
                                    and ADD's regression pool), when there is any
* ``trainer_state.json``             written last: step, data position, method, module metadata, the run id
                                    of the run folder that wrote it and the size of every other file

It is written into a temporary folder, flushed to disk and renamed (``outputs.replace_dir``).
``checkpoint_problem`` checks the run id and the sizes without loading any tensor, so ``latest`` never picks a
truncated, half-synced or foreign checkpoint.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError, first_line, require
from .outputs import replace_dir

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


# ---------------------------------------------------------------------------------------------------------
# Writing and reading the format
# ---------------------------------------------------------------------------------------------------------

def checkpoint_folders(checkpoints_dir: Path, step: int) -> tuple[Path, Path]:
    """(final, temporary) folder of the checkpoint of ``step``; the temporary one is never listed."""
    return checkpoints_dir / f"{CHECKPOINT_PREFIX}{step}", checkpoints_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"


def start_checkpoint(tmp: Path) -> None:
    """An empty temporary folder for a checkpoint being written (a leftover of an interrupted save is removed)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def module_state(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors a checkpoint keeps: only trainable ones when the module is partly frozen (LoRA)."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    state = module.state_dict()
    partial = 0 < len(names) < len(list(module.parameters()))
    if partial:
        state = {k: v for k, v in state.items() if k in names}
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}, partial


def save_rng_state(folder: Path, rank: int) -> None:
    """Write this rank's torch RNG states (CPU, and every CUDA device) as ``rng_<rank>.safetensors``."""
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(folder / f"rng_{rank}.safetensors"))


def save_method_state(folder: Path, rank: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write this rank's method ``extra_state`` as ``method_state_<rank>.safetensors`` (nothing when empty)."""
    if tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / f"method_state_{rank}.safetensors"))


def load_method_state(path: Path, rank: int) -> dict[str, torch.Tensor]:
    """This rank's method state from checkpoint ``path`` ({} when it holds none)."""
    f = path / f"method_state_{rank}.safetensors"
    return read_checkpoint_file(f, lambda f: load_file(str(f))) if f.is_file() else {}


def save_ema_weights(params: list[torch.Tensor], file: Path) -> None:
    """Write student-EMA weights as a checkpoint's ``ema.safetensors`` (the layout ``load_ema_into`` reads)."""
    save_file({f"shadow_{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}, str(file))


def write_checkpoint(tmp: Path, final: Path, *, step: int, batches_seen: int, method: str, num_processes: int,
                     run_id: str, modules: dict[str, torch.nn.Module], optimizers: dict, lr_schedulers: dict,
                     ema=None) -> None:
    """Write the main process's part of a checkpoint into ``tmp`` (unwrapped ``modules``, optimisers and LR
    schedules per phase, a diffusers ``EMAModel`` or None), ``trainer_state.json`` last, then rename to ``final``."""
    meta = {}
    for name, module in modules.items():
        state, partial = module_state(module)
        save_file(state, str(tmp / f"model_{name}.safetensors"))
        meta[name] = {"partial": partial}
    for phase, opt in optimizers.items():
        torch.save(opt.state_dict(), tmp / f"optimizer_{phase}.pt")
        sd = {k: v for k, v in lr_schedulers[phase].state_dict().items() if k != "lr_lambdas"}
        (tmp / f"lr_scheduler_{phase}.json").write_text(json.dumps(sd))
    if ema is not None:
        save_ema_weights(ema.shadow_params, tmp / "ema.safetensors")
        (tmp / "ema.json").write_text(json.dumps({"optimization_step": ema.optimization_step}))
    state = {"step": step, "batches_seen": batches_seen, "method": method, "num_processes": num_processes,
             "modules": meta, "run_id": run_id, "files": file_manifest(tmp)}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # written last: marks completeness
    replace_dir(tmp, final)


def read_checkpoint_file(f: Path, reader):
    """``reader(f)``, with a one-line UserError naming ``f`` when the file cannot be read back."""
    require(f.is_file(), f"checkpoint {f.parent} lacks {f.name}")
    try:
        return reader(f)
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and JSON readers raise many types
        raise UserError(f"checkpoint file {f} is unreadable: {first_line(e)}") from None


def _read_json(f: Path):
    return json.loads(f.read_text())


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's ``trainer_state.json`` (one-line UserError when it cannot be read)."""
    return read_checkpoint_file(path / STATE_FILE, _read_json)


def load_state_modules(path: Path, modules: dict[str, torch.nn.Module], unwrap=lambda m: m) -> None:
    """Load each module's weights from checkpoint ``path`` (strict, except partial LoRA-only saves)."""
    state = read_trainer_state(path)
    for name, module in modules.items():
        f = path / f"model_{name}.safetensors"
        weights = read_checkpoint_file(f, lambda f: load_file(str(f)))
        missing, unexpected = unwrap(module).load_state_dict(weights, strict=False)
        require(not unexpected, f"checkpoint {path}: {f.name} has unexpected keys {unexpected[:3]}")
        if not state["modules"].get(name, {}).get("partial"):
            require(not missing, f"checkpoint {path}: {f.name} is missing keys {missing[:3]}")


def load_optimizers(path: Path, optimizers: dict, lr_schedulers: dict) -> None:
    """Restore each phase's optimiser state and LR-schedule position from checkpoint ``path``."""
    for phase, opt in optimizers.items():
        opt.load_state_dict(read_checkpoint_file(path / f"optimizer_{phase}.pt", lambda f: torch.load(
            f, map_location="cpu", weights_only=True)))
        sd = read_checkpoint_file(path / f"lr_scheduler_{phase}.json", _read_json)
        lr_schedulers[phase].load_state_dict({**lr_schedulers[phase].state_dict(), **sd})


def load_ema_into(path: Path, params: list[torch.nn.Parameter]) -> bool:
    """Copy a checkpoint's student-EMA weights into ``params``; False when it has none."""
    f = path / "ema.safetensors"
    if not f.is_file():
        return False
    shadow = read_checkpoint_file(f, lambda f: load_file(str(f)))
    require(len(shadow) == len(params), f"checkpoint {path}: EMA holds {len(shadow)} tensors, model has {len(params)}")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(shadow[f"shadow_{i}"])
    return True


def load_ema(path: Path, ema) -> None:
    """Restore a diffusers ``EMAModel`` (shadow weights and step count) from checkpoint ``path``, if it has one."""
    if load_ema_into(path, ema.shadow_params):
        ema.optimization_step = read_checkpoint_file(path / "ema.json", _read_json)["optimization_step"]


def restore_rng_state(path: Path, rank: int) -> None:
    """Set this rank's torch RNG states from checkpoint ``path`` (CUDA ones only on as many devices as were saved)."""
    rng_file = path / f"rng_{rank}.safetensors"
    if rng_file.is_file():
        rng = read_checkpoint_file(rng_file, lambda f: load_file(str(f)))
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
