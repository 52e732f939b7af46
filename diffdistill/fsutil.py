"""Crash-safe folder writes: build in a temporary folder, then rename into place."""

from __future__ import annotations

import shutil
from pathlib import Path


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``; an older ``final`` is removed only once the new one is in place."""
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
