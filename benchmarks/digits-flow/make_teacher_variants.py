"""Two copies of the digits-flow teacher for `diffdistill bench` (benchmarks/digits-flow/README.md), weights shared
by symlinks, diffdistill.json changed:

- OUT/teacher-grid: its Euler solver at the noise levels its N-step students train and sample at
  (``student_grid_call_kwargs``, as the students' exports state them: unshifted sigmas 1.0 -> 0.5 at 2 steps,
  which the scheduler shifts to 1.0 -> 0.75), as ``call_kwargs_by_steps``. diffusers' default N-step grid ends at
  the scheduler's smallest sigma instead (1.0 -> 0.009 at 2 steps).
- OUT/teacher-g1: recommended guidance 1.0 instead of 1.5 (one bench run holds both scales beside other lines).

The Heun line is `python benchmarks/tools/teacher_with_solver.py assets/digits-flow OUT/teacher-heun flow-heun`.
Usage: python benchmarks/digits-flow/make_teacher_variants.py OUT
"""

import json
import shutil
import sys
from pathlib import Path

from diffdistill.teachers.sd3 import student_grid_call_kwargs

TEACHER = Path(__file__).resolve().parents[2] / "assets" / "digits-flow"


def linked_copy(dst: Path, info: dict) -> None:
    """dst: every entry of the teacher folder as a symlink, but diffdistill.json (``info``) and the card."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for p in TEACHER.iterdir():
        if p.name not in ("diffdistill.json", "README.md"):
            (dst / p.name).symlink_to(p)
    (dst / "diffdistill.json").write_text(json.dumps(info, indent=2) + "\n")


def main(out: Path) -> None:
    info = json.loads((TEACHER / "diffdistill.json").read_text())
    T = json.loads((TEACHER / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"]
    grid = {str(n): student_grid_call_kwargs(T, n) for n in (2, 4, 8, 50)}
    linked_copy(out / "teacher-grid", {**info, "call_kwargs_by_steps": grid})
    linked_copy(out / "teacher-g1", {**info, "recommended_guidance_scale": 1.0})
    print(f"wrote {out / 'teacher-grid'} and {out / 'teacher-g1'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/digits-flow-teacher"))
