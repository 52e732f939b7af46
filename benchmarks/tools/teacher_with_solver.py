#!/usr/bin/env python
"""Copy a pipeline folder with another scheduler as its own, so one `diffdistill bench` run can hold the teacher's
best training-free solver beside students that keep their folders' schedulers (bench's --schedulers applies to
every pipeline of a run).

    python benchmarks/tools/teacher_with_solver.py assets/digits-sd runs/teacher-dpmpp "dpmsolver++:timestep_spacing=trailing"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffdistill.eval.config import parse_scheduler_spec  # noqa: E402
from diffdistill.eval.sampling import make_scheduler  # noqa: E402
from diffdistill.loading import absent_parts  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="a diffusers pipeline folder")
    p.add_argument("dest", type=Path, help="the copy to write (must not exist)")
    p.add_argument("scheduler", help="a bench scheduler spec, e.g. dpmsolver++:timestep_spacing=trailing")
    args = p.parse_args()
    if args.dest.exists():
        sys.exit(f"error: {args.dest} exists")
    parse_scheduler_spec(args.scheduler)  # a bad spec fails before anything is copied
    from diffusers import DiffusionPipeline

    index = json.loads((args.source / "model_index.json").read_text())
    base = DiffusionPipeline.from_pretrained(str(args.source), **absent_parts(index)).scheduler  # e.g. SD3 without T5
    tmp = args.dest.with_name(f".{args.dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(args.source, tmp, ignore=shutil.ignore_patterns("README.md", "*.png"))
    shutil.rmtree(tmp / "scheduler")
    scheduler = make_scheduler(args.scheduler, base)
    scheduler.save_pretrained(str(tmp / "scheduler"))
    index = json.loads((tmp / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]  # from_pretrained builds the class named here
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    tmp.rename(args.dest)
    print(f"wrote {args.dest} ({args.scheduler})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
