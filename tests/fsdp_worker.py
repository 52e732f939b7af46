"""One rank of the two-process FSDP test (``tests/test_fsdp.py``), started by ``accelerate launch --use_fsdp``.

Two ``diffdistill distill`` runs in one launch (one start-up of the process group instead of two): ``ref``,
uninterrupted to ``--max-train-steps``; then ``res``, a copy of ``ref`` as a run killed right after its
half-way checkpoint would have left it (the later checkpoints, export and summary gone), resumed with
``latest`` to the end; with ``--ddp-too``, then ``ddp``: the same run under DDP (``--sharding none``).
Usage: fsdp_worker.py TEACHER ROOT STEPS {--|--ddp-too} DISTILL_ARGS
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from diffdistill.checkpoint import checkpoint_step, list_checkpoints
from diffdistill.cli import main


def cut_after(run: Path, step: int) -> None:
    """Remove what ``run`` wrote after its checkpoint of ``step``: later checkpoints, the export, the summary."""
    for ckpt in list_checkpoints(run / "checkpoints"):
        if checkpoint_step(ckpt) > step:
            shutil.rmtree(ckpt)
    for name in ("pipeline", "samples", "summary.json"):
        p = run / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


if __name__ == "__main__":
    teacher, root, steps = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    args = ["distill", "--teacher", teacher, *sys.argv[5:], "--max-train-steps", steps]
    code = main([*args, "--output", str(root / "ref")])
    if code:
        sys.exit(code)
    if dist.get_rank() == 0:
        shutil.copytree(root / "ref", root / "res")
        cut_after(root / "res", int(steps) // 2)
    dist.barrier()
    code = main([*args, "--output", str(root / "res"), "--resume-from-checkpoint", "latest"])
    if code or "--ddp-too" not in sys.argv[4:5]:
        sys.exit(code)
    os.environ.pop("ACCELERATE_USE_FSDP")  # the same run under DDP (accelerate's CPU fallback for the launch)
    sys.exit(main([*args, "--output", str(root / "ddp")]))
