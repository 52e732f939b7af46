"""``diffdistill export``: a checkpoint of a distill run -> the same verified pipeline (and LoRA, and model card)
that the run itself exports, through the one export path (``export.export_student``).

``--output`` is the pipeline folder; a LoRA run's adapter goes into its ``lora/`` subfolder. A checkpoint of an FSDP
run (``--sharding fsdp2``) is read whole in this one process, every rank's shards put together (``checkpoint.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import load_ema_into, load_state_modules, read_trainer_state, resolve_resume
from .config import build_run_config, load_yaml
from .data import build_dataset, validation_prompts
from .errors import require
from .export import export_student
from .methods import build_method_config, get_method
from .outputs import OUTPUT_MARKER, check_output, marker_command
from .teachers import load_teacher


def run_id_of(run_dir: Path) -> str:
    """The run id a distill run folder's marker holds (its checkpoints must carry the same)."""
    require(marker_command(run_dir) == "distill", f"{run_dir} is not a diffdistill distill run folder (no {OUTPUT_MARKER})")
    return json.loads((run_dir / OUTPUT_MARKER).read_text()).get("run_id")


def load_for_export(method, ckpt: Path) -> int:
    """Load checkpoint ``ckpt`` into a set-up ``method`` as the run's export sees it: the state modules, then
    the trainer's student EMA (when the run kept one) over the student's trainable weights. Returns its step."""
    load_state_modules(ckpt, method.state_modules())
    load_ema_into(ckpt, [p for p in method.student.parameters() if p.requires_grad])
    step = int(read_trainer_state(ckpt)["step"])
    method.on_resume(step)
    return step


def export_checkpoint(run_dir: str, checkpoint: str, output: str, overwrite: bool = False) -> Path:
    """Rebuild the run's method from its saved config, load ``checkpoint`` and export it to ``output``."""
    out = Path(output)
    check_output(out, "export", overwrite)  # first: a bad --output is one line, before any checkpoint warning
    rd = Path(run_dir)
    require((rd / "config.yaml").is_file(), f"{run_dir} is not a distill run folder (no config.yaml)")
    run = build_run_config(load_yaml(rd / "config.yaml"), {})
    spec = get_method(run.method)
    method_cfg = build_method_config(run.method, run.method_args, f"{run_dir}/config.yaml method_args")
    # Only this run's whole checkpoints: 'latest' skips (with a warning) any that is not.
    ckpt = resolve_resume(checkpoint, rd / "checkpoints", run_id_of(rd))
    require(ckpt is not None, f"no checkpoint in {rd / 'checkpoints'}")
    teacher = load_teacher(run.teacher, run.revision, run.variant, run.local_files_only,
                           safety_checker=not run.drop_safety_checker, single_file_config=run.single_file_config)
    method = spec.method_cls(method_cfg, run)
    method.validate(teacher)
    prompt = validation_prompts(run.data, build_dataset(run.data, teacher.image_size))[0]
    method.setup(teacher)
    step = load_for_export(method, ckpt)
    info = {"command": "export", "checkpoint": str(ckpt)}
    return export_student(run, method, teacher, out, out / "lora", prompt, step, info=info)["pipeline"]
