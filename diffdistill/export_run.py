"""``diffdistill export``: a checkpoint of a distill run -> a verified diffusers pipeline folder."""

from __future__ import annotations

import json
from pathlib import Path

from .config import build_dataclass, build_run_config, load_yaml
from .errors import require
from .export import export_pipeline
from .methods import get_method
from .models import load_teacher
from .trainer import load_ema_into, load_state_modules, resolve_resume


def export_checkpoint(run_dir: str, checkpoint: str, output: str, overwrite: bool = False) -> Path:
    """Rebuild the run's method from its saved config, load ``checkpoint`` and export it to ``output``."""
    rd = Path(run_dir)
    require((rd / "config.yaml").is_file(), f"{run_dir} is not a distill run folder (no config.yaml)")
    run = build_run_config(load_yaml(rd / "config.yaml"), {})
    spec = get_method(run.method)
    method_cfg = build_dataclass(spec.config_cls, run.method_args, f"{run_dir}/config.yaml method_args")
    ckpt = resolve_resume(checkpoint, rd / "checkpoints")
    require(ckpt is not None, f"no checkpoint in {rd / 'checkpoints'}")
    out = Path(output)
    require(overwrite or not (out / "model_index.json").exists(),
            f"--output {out} already holds a pipeline; pass --overwrite to replace it")
    teacher = load_teacher(run.teacher, run.revision, run.variant, run.local_files_only)
    method = spec.method_cls(method_cfg, run)
    method.validate(teacher)
    method.setup(teacher)
    load_state_modules(ckpt, method.state_modules())
    load_ema_into(ckpt, [p for p in method.student.parameters() if p.requires_grad])
    method.on_resume(json.loads((ckpt / "trainer_state.json").read_text())["step"])
    from .digits import DIGIT_PROMPTS

    prompt = DIGIT_PROMPTS[0] if run.data.dataset == "digits" else "a photo"
    info = {"method": run.method, "teacher": run.teacher, "checkpoint": str(ckpt)}
    return export_pipeline(teacher, method.export_unet(lambda m: m), method.export_scheduler(teacher.scheduler),
                           out, method.sampling_steps(), method.recommended_guidance_scale, info, prompt)
