"""One rank of the two-process FSDP test (``tests/test_fsdp.py``), started by ``accelerate launch --use_fsdp``.

Three ``diffdistill distill`` runs in one launch (one start-up of the process group instead of three):
``ref``, uninterrupted to ``--max-train-steps``; ``res``, stopped at half of it (its final sharded checkpoint);
``res`` again, resumed from that checkpoint to the end. Usage: fsdp_worker.py TEACHER ROOT STEPS -- DISTILL_ARGS
"""

from __future__ import annotations

import sys

from diffdistill.cli import main

if __name__ == "__main__":
    teacher, root, steps = sys.argv[1:4]
    args = ["distill", "--teacher", teacher, *sys.argv[5:]]
    half = str(int(steps) // 2)
    for extra in (["--output", f"{root}/ref", "--max-train-steps", steps],
                  ["--output", f"{root}/res", "--max-train-steps", half],
                  ["--output", f"{root}/res", "--max-train-steps", steps, "--resume-from-checkpoint", "latest"]):
        code = main([*args, *extra])
        if code:
            sys.exit(code)
