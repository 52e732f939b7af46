"""Crash-safe folder writes and output-folder ownership.

* ``replace_dir``: build in a temporary folder, flush every file to disk, then rename into place.
* ``OUTPUT_MARKER``: every folder a command writes as its ``--output`` carries ``diffdistill.json`` with
  ``"command": <name>``; ``check_output`` lets a command replace (with ``--overwrite``) only a folder its
  own earlier invocation wrote, never a user's folder or file.
* ``check_writable``: every folder a command writes is probed before any work starts (one line, exit 2).
* ``FolderLock``: an exclusive ``flock`` on a run folder; a second run is refused with the holder's PID.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError, require

OUTPUT_MARKER = "diffdistill.json"
LOCK_FILE = ".diffdistill.lock"


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, then the folders themselves (their entries), deepest first."""
    dirs = []
    for root, _, files in os.walk(folder):
        dirs.append(Path(root))
        for name in files:
            fsync_path(Path(root) / name)
    for d in reversed(dirs):
        fsync_path(d)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``; its files are on disk before the rename, and an older
    ``final`` is removed only once the new one is in place (a power loss leaves the old or the new, never a
    complete-looking folder of empty files)."""
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def marker_command(folder: Path) -> str | None:
    """The command named by ``folder``'s marker (``diffdistill.json``), or None when it has none."""
    try:
        data = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("command") if isinstance(data, dict) else None


def check_writable(folder: Path, flag: str = "--output", beside: bool = True) -> None:
    """One-line UserError, before any work, for a ``folder`` this process could not create and fill: one under
    a file, on a read-only or virtual filesystem (/proc, /sys), without permission (which ``os.access`` does not
    tell for root). Probes where the writes will go, by making and removing an empty folder there (nothing is
    left behind): ``folder`` itself when it exists; the nearest existing folder above it when ``folder`` is to be
    created there, or when the command builds ``.<name>.tmp`` beside it and renames it in (``beside``)."""
    folder = Path(folder)
    blocker = next((p for p in [folder, *folder.absolute().parents] if os.path.lexists(p) and not p.is_dir()), None)
    require(blocker is None, f"{flag} {folder}: {blocker} exists and is not a folder")
    absolute = folder.absolute()
    places = [absolute] if absolute.is_dir() else []
    if (beside or not places) and absolute.parents:
        places.append(next(p for p in absolute.parents if p.is_dir()))
    for place in places:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".diffdistill-probe-", dir=place))
        except OSError as e:
            raise UserError(f"{flag} {folder}: cannot write in {place} ({e.strerror or e})") from None


def check_output(out: Path, command: str, overwrite: bool, resumable: bool = False) -> bool:
    """Validate ``--output`` of ``diffdistill <command>``, leaving nothing behind: absent or empty is fine; a folder
    that an earlier ``diffdistill <command>`` wrote needs ``--overwrite`` (or, for a run, resuming); anything else
    (a file, a user's folder, another command's output, a place that cannot be written) is refused. Returns
    whether it holds an earlier output."""
    check_writable(out, beside=command != "distill")  # a run writes inside its folder; the others swap it in
    if not out.exists() or not [p for p in out.iterdir() if p.name != LOCK_FILE]:
        return False
    require(marker_command(out) == command,
            f"--output {out} is not empty and was not written by diffdistill {command}; choose a new or empty folder")
    require(overwrite or resumable,
            f"--output {out} already holds the output of an earlier diffdistill {command}; pass --overwrite to replace it"
            + (" or --resume-from-checkpoint latest to continue it" if command == "distill" else ""))
    return True


def write_marker(folder: Path, command: str, **fields) -> None:
    """Mark ``folder`` as the output of ``diffdistill <command>`` (``fields`` are stored beside the name)."""
    (folder / OUTPUT_MARKER).write_text(json.dumps({"command": command, **fields}, indent=2) + "\n")


class FolderLock:
    """An exclusive lock on ``folder`` (``flock`` on its lock file, which holds the PID); the OS releases it
    when the process dies, so a crashed run never leaves a stale lock."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"--output {self.path.parent} is in use by another diffdistill run (PID {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
