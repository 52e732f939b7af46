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
* under ``--sharding fsdp2`` the weights, optimiser moments and student EMA are sharded instead: every rank
  writes its own shard, ``model_<name>.rank<r>.safetensors``, ``optimizer_<phase>.rank<r>.pt`` and
  ``ema.rank<r>.safetensors``, and rank 0 a JSON index per file group (``model_<name>.index.json``,
  ``ema.index.json``: every tensor's global shape and the dimension it is sharded on), from which a single
  process gathers full weights (``diffdistill export``); a resume reads each rank's own shard back
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
from .sharding import like_param, local, shard_dim

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
    for name, meta in state["modules"].items():
        for f in module_files(name, meta):
            if f not in files:
                return f"{path / f} is missing"
    return None


def module_files(name: str, meta: dict) -> list[str]:
    """The files a checkpoint holds for state module ``name`` (one, or one per rank and an index when sharded)."""
    shards = meta.get("shards", 0)
    if not shards:
        return [f"model_{name}.safetensors"]
    return [shard_file(f"model_{name}", r) for r in range(shards)] + [f"model_{name}{SHARD_INDEX}"]


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


SHARD_INDEX = ".index.json"


def shard_file(stem: str, rank: int) -> str:
    """The file of rank ``rank``'s shards of the tensor group ``stem`` (``model_student``, ``ema``)."""
    return f"{stem}.rank{rank}.safetensors"


def save_local_shards(folder: Path, stem: str, rank: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write this rank's part of ``tensors`` (a DTensor's local shard, a plain tensor whole) as
    ``<stem>.rank<r>.safetensors``; rank 0 also writes ``<stem>.index.json`` (key -> global shape, sharded dim)."""
    save_file({k: local(v).detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / shard_file(stem, rank)))
    if rank == 0:
        index = {k: {"shape": list(v.shape), "shard_dim": shard_dim(v)} for k, v in tensors.items()}
        (folder / f"{stem}{SHARD_INDEX}").write_text(json.dumps(index))


def read_full_shards(path: Path, stem: str, shards: int) -> dict[str, torch.Tensor]:
    """The whole tensors of group ``stem`` of a sharded checkpoint: every rank's shard concatenated, in rank
    order, on the dimension the index names (FSDP2 splits a tensor like ``torch.chunk``)."""
    index = read_checkpoint_file(path / f"{stem}{SHARD_INDEX}", _read_json)
    parts = [read_checkpoint_file(path / shard_file(stem, r), lambda f: load_file(str(f))) for r in range(shards)]
    full = {}
    for key, info in index.items():
        d = info["shard_dim"]
        full[key] = parts[0][key] if d is None else torch.cat([p[key] for p in parts], d)
        require(list(full[key].shape) == info["shape"],
                f"checkpoint {path}: the shards of {stem} {key} make {list(full[key].shape)}, not {info['shape']}")
    return full


def load_local_shards(path: Path, stem: str, rank: int, tensors: dict[str, torch.Tensor]) -> None:
    """Copy rank ``rank``'s shards of group ``stem`` into ``tensors`` (their local shards, in place)."""
    f = path / shard_file(stem, rank)
    saved = read_checkpoint_file(f, lambda f: load_file(str(f)))
    require(saved.keys() == tensors.keys(), f"checkpoint {path}: {f.name} holds other tensors than this run's "
                                            f"{stem} ({sorted(saved.keys() ^ tensors.keys())[:3]})")
    with torch.no_grad():
        for k, t in tensors.items():
            local(t).copy_(saved[k])


def save_shards(folder: Path, rank: int, modules: dict[str, torch.nn.Module], optimizers: dict, ema=None) -> None:
    """Write this rank's shards of every FSDP module, optimiser and the student EMA into ``folder``."""
    for name, module in modules.items():
        save_local_shards(folder, f"model_{name}", rank, module.state_dict())
    for phase, opt in optimizers.items():
        sd = opt.state_dict()
        sd["state"] = {i: {k: local(v).detach().cpu() if torch.is_tensor(v) else v for k, v in st.items()}
                       for i, st in sd["state"].items()}
        torch.save(sd, folder / f"optimizer_{phase}.rank{rank}.pt")
    if ema is not None:
        save_local_shards(folder, "ema", rank, {f"shadow_{i}": p for i, p in enumerate(ema.shadow_params)})


def checkpoint_shards(state: dict) -> int:
    """Over how many ranks a checkpoint's weights are sharded (0: whole, not sharded)."""
    return max([m.get("shards", 0) for m in state["modules"].values()], default=0)


def require_sharding(path: Path, shards: int) -> None:
    """A resume reads checkpoint ``path`` back only as it was written: whole (``shards`` 0), or sharded over as
    many ranks as this run has (one-line UserError otherwise)."""
    written = checkpoint_shards(read_trainer_state(path))
    if written != shards:
        how = f"sharded over {written} processes (--sharding fsdp2)" if written else "whole (not sharded)"
        now = f"--sharding fsdp2 on {shards} processes" if shards else "no sharding"
        raise UserError(f"checkpoint {path} was written {how}; this run has {now}: resume it as it was written")


def save_ema_weights(params: list[torch.Tensor], file: Path) -> None:
    """Write student-EMA weights as a checkpoint's ``ema.safetensors`` (the layout ``load_ema_into`` reads)."""
    save_file({f"shadow_{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}, str(file))


def write_checkpoint(tmp: Path, final: Path, *, step: int, batches_seen: int, method: str, num_processes: int,
                     run_id: str, modules: dict[str, torch.nn.Module], optimizers: dict, lr_schedulers: dict,
                     ema=None, shards: int = 0) -> None:
    """Write the main process's part of a checkpoint into ``tmp`` (unwrapped ``modules``, optimisers and LR
    schedules per phase, a diffusers ``EMAModel`` or None), ``trainer_state.json`` last, then rename to ``final``.
    ``shards`` > 0: every rank already wrote its shards of the weights, moments and EMA (``save_shards``)."""
    meta = {}
    for name, module in modules.items():
        if shards:
            meta[name] = {"partial": False, "shards": shards}
            continue
        state, partial = module_state(module)
        save_file(state, str(tmp / f"model_{name}.safetensors"))
        meta[name] = {"partial": partial}
    for phase, opt in optimizers.items():
        if not shards:
            torch.save(opt.state_dict(), tmp / f"optimizer_{phase}.pt")
        sd = {k: v for k, v in lr_schedulers[phase].state_dict().items() if k != "lr_lambdas"}
        (tmp / f"lr_scheduler_{phase}.json").write_text(json.dumps(sd))
    if ema is not None:
        if not shards:
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


def load_state_modules(path: Path, modules: dict[str, torch.nn.Module], unwrap=lambda m: m,
                       rank: int | None = None) -> None:
    """Load each module's weights from checkpoint ``path`` (strict, except partial LoRA-only saves). A sharded
    checkpoint is read whole into plain modules, or (``rank`` given: an FSDP resume) rank by rank into the shards."""
    state = read_trainer_state(path)
    for name, module in modules.items():
        shards = state["modules"].get(name, {}).get("shards", 0)
        if shards and rank is not None:
            load_local_shards(path, f"model_{name}", rank, unwrap(module).state_dict())
            continue
        f = path / f"model_{name}.safetensors"
        weights = (read_full_shards(path, f"model_{name}", shards) if shards
                   else read_checkpoint_file(f, lambda f: load_file(str(f))))
        missing, unexpected = unwrap(module).load_state_dict(weights, strict=False)
        require(not unexpected, f"checkpoint {path}: {f.name} has unexpected keys {unexpected[:3]}")
        if not state["modules"].get(name, {}).get("partial"):
            require(not missing, f"checkpoint {path}: {f.name} is missing keys {missing[:3]}")


def load_optimizers(path: Path, optimizers: dict, lr_schedulers: dict, rank: int | None = None) -> None:
    """Restore each phase's optimiser state and LR-schedule position from checkpoint ``path`` (``rank`` given:
    that rank's shards of a sharded checkpoint, placed like the optimiser's DTensor parameters)."""
    for phase, opt in optimizers.items():
        name = f"optimizer_{phase}.pt" if rank is None else f"optimizer_{phase}.rank{rank}.pt"
        sd = read_checkpoint_file(path / name, lambda f: torch.load(f, map_location="cpu", weights_only=True))
        if rank is not None:
            params = [p for group in opt.param_groups for p in group["params"]]
            sd["state"] = {i: {k: like_param(v, params[int(i)]) if torch.is_tensor(v) else v for k, v in st.items()}
                           for i, st in sd["state"].items()}
        opt.load_state_dict(sd)
        sd = read_checkpoint_file(path / f"lr_scheduler_{phase}.json", _read_json)
        lr_schedulers[phase].load_state_dict({**lr_schedulers[phase].state_dict(), **sd})


def load_ema_into(path: Path, params: list[torch.nn.Parameter]) -> bool:
    """Copy a checkpoint's student-EMA weights into ``params``; False when it has none."""
    f = path / "ema.safetensors"
    if (path / f"ema{SHARD_INDEX}").is_file():
        shadow = read_full_shards(path, "ema", int(read_trainer_state(path)["num_processes"]))
    elif not f.is_file():
        return False
    else:
        shadow = read_checkpoint_file(f, lambda f: load_file(str(f)))
    require(len(shadow) == len(params), f"checkpoint {path}: EMA holds {len(shadow)} tensors, model has {len(params)}")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(shadow[f"shadow_{i}"])
    return True


def load_ema(path: Path, ema, rank: int | None = None) -> None:
    """Restore a diffusers ``EMAModel`` (shadow weights and step count) from checkpoint ``path``, if it has one
    (``rank`` given: that rank's shards of a sharded checkpoint)."""
    if rank is not None and (path / shard_file("ema", rank)).is_file():
        load_local_shards(path, "ema", rank, {f"shadow_{i}": p for i, p in enumerate(ema.shadow_params)})
        ema.optimization_step = read_checkpoint_file(path / "ema.json", _read_json)["optimization_step"]
    elif load_ema_into(path, ema.shadow_params):
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
