"""The bench cache: reference features and finished cells, keyed by content, stored as safetensors + JSON.

A key is the SHA-256 of everything that decides the numbers: the bytes of every file in the pipeline folder
(weights, configs, tokenizer; model cards excepted), the scheduler's resolved config, steps, guidance,
seeds, N, prompts, batch size, dtype, device, the feature extractor's and classifier's weights, the CLIP
model and the library versions. Renaming or copying a folder keeps its entries; retraining invalidates
them. Nothing here is a pickle: tensors go to ``.safetensors`` with a JSON string in its metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from diffdistill.eval.fidelity import file_sha256

CACHE_FORMAT = 1
META_KEY = "diffdistill_bench"
SKIPPED_SUFFIXES = (".md",)  # model cards and notes do not change a single sample


def folder_fingerprint(folder: str | Path) -> str:
    """SHA-256 over (relative path, content hash) of every file under ``folder`` except Markdown."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in SKIPPED_SUFFIXES):
        h.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()


def make_key(parts: dict[str, Any]) -> str:
    """SHA-256 of ``parts`` as canonical JSON (sorted keys; non-JSON values by ``str``)."""
    versions = {"torch": torch.__version__, "format": CACHE_FORMAT}
    with_versions = {**parts, "versions": {**versions, **parts.get("versions", {})}}
    return hashlib.sha256(json.dumps(with_versions, sort_keys=True, default=str).encode()).hexdigest()


def _entry_path(root: Path, kind: str, key: str) -> Path:
    return root / kind / f"{key}.safetensors"


def load_entry(root: Path | None, kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, JSON metadata) of a cache entry, or None when absent, unreadable or disabled."""
    if root is None:
        return None
    path = _entry_path(root, kind, key)
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError):
        return None  # a damaged entry is recomputed (and overwritten), never trusted
    return tensors, meta


def save_entry(root: Path | None, kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write an entry atomically (temporary file, then rename); a cache that cannot be written is skipped."""
    if root is None:
        return
    from safetensors.torch import save_file

    path = _entry_path(root, kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
    except OSError:
        return
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
