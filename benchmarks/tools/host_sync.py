#!/usr/bin/env python
"""What per-step host synchronisation costs a GPU training loop (issue #16), measured on the trainer itself.

Three ways of logging, the same steps otherwise (same seeds, data, model):

* ``device``     the trainer as it is: losses stay on the GPU and are summed there; one host sync per step (the
                 finiteness check) and one transfer per log row (``--log-every``, here once per run)
* ``log_every_1``  the trainer with a log row every step: one more transfer per step
* ``item_per_value``  the former loop: every logged value read with ``.item()`` inside the loss (several
                 syncs per phase per step), emulated by wrapping the method's loss

Each case trains ``--warmup`` steps, then times ``--steps`` steps between two ``torch.cuda.synchronize()``;
checkpoints and sample grids are switched off so only the loop is timed. Writes ``host_sync.json``.

    python benchmarks/tools/host_sync.py --output OUT [--sd15] [--repeats 2]
    python benchmarks/tools/host_sync.py --output OUT --quick      # CPU: a few steps, to check the script
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

VARIANTS = ("device", "log_every_1", "item_per_value")


def measure(teacher, accelerator, teacher_path: str, method_name: str, variant: str, steps: int, warmup: int,
            batch_size: int, out: Path, extra: dict) -> float:
    """Steps per second of ``variant`` over ``steps`` timed steps."""
    from diffdistill.config import build_run_config
    from diffdistill.data import build_dataset
    from diffdistill.methods import get_method
    from diffdistill.trainer import Trainer

    run = build_run_config({}, {"teacher": teacher_path, "output": str(out), "max_train_steps": warmup + steps,
                                "batch_size": batch_size, "checkpointing_steps": 0, "validation_steps": 0,
                                "lr_warmup_steps": 0, "learning_rate": 1e-5,
                                "mixed_precision": "fp16" if torch.cuda.is_available() else "no",
                                "log_every": 1 if variant == "log_every_1" else 10**6, **extra})
    spec = get_method(method_name)
    method = spec.method_cls(spec.config_cls(**run.method_args), run)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(run, method, teacher, out, build_dataset(run.data, teacher.image_size), accelerator=accelerator)
    trainer.save_checkpoint = lambda: None  # time the loop only
    trainer.save_validation_grid = lambda name: None
    if variant == "item_per_value":
        loss_fn = method.loss

        def loss_with_items(phase, batch, step):
            loss, logs = loss_fn(phase, batch, step)
            return loss, {k: (v.item() if torch.is_tensor(v) else v) for k, v in logs.items()}

        method.loss = loss_with_items
    marks = {}
    after = method.after_step

    def timed_after_step(step):
        after(step)
        if step in (warmup, warmup + steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks[step] = time.perf_counter()

    method.after_step = timed_after_step
    trainer.fit()
    accelerator.free_memory()  # the prepared models and optimisers of this case
    return steps / (marks[warmup + steps] - marks[warmup])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True, help="folder for host_sync.json")
    p.add_argument("--sd15", action="store_true", help="also an SD-1.5-sized UNet (random weights, 64x64 latents)")
    p.add_argument("--repeats", type=int, default=2, help="repeats of every case, interleaved (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="CPU check of the script: 3 timed steps at batch 4")
    p.add_argument("--sd15-only", action="store_true", help="only the SD-1.5-sized case")
    args = p.parse_args(argv)
    from accelerate import Accelerator

    from diffdistill.teachers import load_teacher
    from diffdistill.tiny_pipelines import save_sd15_sized_pipeline

    cuda = torch.cuda.is_available()
    assert cuda or args.quick, "host_sync.py measures a GPU (--quick checks the script on the CPU)"
    args.output.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision="fp16" if cuda else "no")
    cases = [("digits-sd", "assets/digits-sd", "lcm", 64, 200, 20, {"num_ddim_timesteps": 50}),
             ("digits-sd", "assets/digits-sd", "dmd", 64, 100, 10, {"steps": 1, "fake_updates": 2})]
    if args.quick:
        cases = [(m, path, meth, 4, 3, 1, extra) for m, path, meth, _, _, _, extra in cases]
    tmp = tempfile.mkdtemp()
    if args.sd15_only:
        cases = []
    if args.sd15 or args.sd15_only:
        save_sd15_sized_pipeline(Path(tmp) / "sd15", False)
        cases.append(("sd15-sized", str(Path(tmp) / "sd15"), "lcm", 8, 30, 5, {"resolution": 512}))
    results = []
    for model, path, method, bs, steps, warmup, extra in cases:
        teacher = load_teacher(path, device=accelerator.device, dtype=torch.float16 if cuda else torch.float32)
        rates = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            for v in VARIANTS:
                rate = measure(teacher, accelerator, path, method, v, steps, warmup, bs, Path(tmp) / f"{model}-{v}-{r}",
                               {**extra, "steps": extra.get("steps", 4)})
                rates[v].append(rate)
                print(f"{model} {method} batch {bs} {v}: {rate:.2f} it/s", flush=True)
        row = {"model": model, "method": method, "batch_size": bs, "timed_steps": steps,
               "it_per_s": {v: [round(x, 3) for x in xs] for v, xs in rates.items()}}
        best = {v: max(xs) for v, xs in rates.items()}
        row["slowdown_vs_device_%"] = {v: round(100 * (best["device"] / best[v] - 1), 1) for v in VARIANTS}
        results.append(row)
        del teacher
        if cuda:
            torch.cuda.empty_cache()
    info = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__, "cases": results,
            "note": "it/s between two synchronize() calls after warm-up; slowdown from the best of the repeats"}
    (args.output / "host_sync.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
