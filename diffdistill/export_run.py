"""``diffdistill export``: a checkpoint of a distill run -> a verified diffusers pipeline folder."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import STATE_FILE, resolve_resume
from .config import build_dataclass, build_run_config, load_yaml
from .errors import require
from .export import export_pipeline
from .methods import get_method
from .outputs import OUTPUT_MARKER, check_output, marker_command
from .teachers import load_teacher
from .trainer import load_ema_into, load_state_modules, read_checkpoint_file


def run_id_of(run_dir: Path) -> str:
    """The run id a distill run folder's marker holds (its checkpoints must carry the same)."""
    require(marker_command(run_dir) == "distill", f"{run_dir} is not a diffdistill distill run folder (no {OUTPUT_MARKER})")
    return json.loads((run_dir / OUTPUT_MARKER).read_text()).get("run_id")


def export_checkpoint(run_dir: str, checkpoint: str, output: str, overwrite: bool = False) -> Path:
    """Rebuild the run's method from its saved config, load ``checkpoint`` and export it to ``output``."""
    rd = Path(run_dir)
    require((rd / "config.yaml").is_file(), f"{run_dir} is not a distill run folder (no config.yaml)")
    run = build_run_config(load_yaml(rd / "config.yaml"), {})
    spec = get_method(run.method)
    method_cfg = build_dataclass(spec.config_cls, run.method_args, f"{run_dir}/config.yaml method_args")
    # Only this run's whole checkpoints: 'latest' skips (with a warning) any that is not.
    ckpt = resolve_resume(checkpoint, rd / "checkpoints", run_id_of(rd))
    require(ckpt is not None, f"no checkpoint in {rd / 'checkpoints'}")
    out = Path(output)
    check_output(out, "export", overwrite)
    teacher = load_teacher(run.teacher, run.revision, run.variant, run.local_files_only)
    method = spec.method_cls(method_cfg, run)
    method.validate(teacher)
    method.setup(teacher)
    load_state_modules(ckpt, method.state_modules())
    load_ema_into(ckpt, [p for p in method.student.parameters() if p.requires_grad])
    method.on_resume(read_checkpoint_file(ckpt / STATE_FILE, lambda f: json.loads(f.read_text()))["step"])
    from .digits import DIGIT_PROMPTS

    prompt = DIGIT_PROMPTS[0] if run.data.dataset == "digits" else "a photo"
    info = {"command": "export", "method": run.method, "teacher": run.teacher, "checkpoint": str(ckpt)}
    return export_pipeline(teacher, method.export_unet(lambda m: m), method.export_scheduler(teacher.scheduler),
                           out, method.sampling_steps(), method.recommended_guidance_scale, info, prompt)
