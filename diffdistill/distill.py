"""``diffdistill distill``: config -> teacher + method -> trainer -> export -> small benchmark -> model card.

Every check that can fail on user input runs before the output folder is touched, so a bad
invocation leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from .config import RunConfig, build_dataclass, save_yaml, to_dict
from .data import build_dataset
from .errors import require
from .export import EXPORT_INFO, export_lora, export_pipeline, write_model_card
from .methods import get_method
from .models import load_teacher
from .trainer import Trainer, list_checkpoints, make_accelerator

FINISHED_MARKER = "model_index.json"


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen networks run in: the lowest precision the run asked for (fp32 otherwise)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def check_output_folder(run: RunConfig) -> Path:
    """Validate --output: writable, and no finished export in it unless --overwrite (or resuming)."""
    require(bool(run.output), "--output is required")
    out = Path(run.output)
    blocker = next((p for p in [out, *out.absolute().parents] if os.path.lexists(p) and not p.is_dir()), None)
    require(blocker is None, f"--output {out}: {blocker} exists and is not a folder")
    finished = (out / "pipeline" / FINISHED_MARKER).is_file()
    resuming = bool(run.train.resume_from_checkpoint)
    require(not finished or run.overwrite or resuming,
            f"--output {out} already holds a finished export (pipeline/); pass --overwrite to replace it")
    parent = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), Path("/"))
    require(os.access(parent, os.W_OK), f"--output {out}: {parent} is not writable")
    return out


def check_xformers(run: RunConfig) -> None:
    """--enable-xformers needs the xformers package (the [gpu] extra)."""
    if run.train.enable_xformers:
        try:
            import xformers  # noqa: F401
        except ImportError:
            from .errors import UserError

            raise UserError("--enable-xformers needs xformers: pip install 'diffdistill[gpu]'") from None


def bench_table(pipeline_dir: Path, out: Path, steps: list[int], guidance: float, num_samples: int,
                label: str) -> tuple[dict | None, str | None]:
    """A small FID/IS/KID-vs-steps benchmark of the export for its model card (digits teachers only)."""
    if num_samples <= 0:
        return None, None
    from .eval.bench import BenchConfig, report_markdown_table, run_bench

    cfg = BenchConfig(pipelines=[str(pipeline_dir)], steps=steps, output=str(out), num_samples=num_samples,
                      guidance=guidance, labels=[label])
    report = run_bench(cfg)
    return report, report_markdown_table(report)


def run_distill(run: RunConfig, dry_run: bool = False) -> dict:
    """Train, export, verify and document one student. Returns a summary dict (also saved as summary.json)."""
    spec = get_method(run.method)
    method_cfg = build_dataclass(spec.config_cls, run.method_args, f"--method {run.method} options")
    out = check_output_folder(run)
    check_xformers(run)
    method = spec.method_cls(method_cfg, run)
    total = getattr(method, "total_steps", None)
    if total is not None and total != run.train.max_train_steps:
        # Staged methods own their length (sum of their stages); the saved config records it.
        run.train.max_train_steps = total
    resolved = to_dict(run)
    resolved["method_args"] = to_dict(method_cfg)
    if dry_run:
        return {"config": resolved}

    accelerator = make_accelerator(run.train)
    teacher = load_teacher(run.teacher, run.revision, run.variant, run.local_files_only,
                           device=accelerator.device, dtype=weight_dtype(run.train.mixed_precision))
    method.validate(teacher)
    dataset = build_dataset(run.data, teacher.image_size)
    require(len(dataset) > 0, f"--dataset {run.data.dataset}: no examples")

    # Input is valid: from here on the output folder is written.
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(resolved, out / "config.yaml")
    accelerator.wait_for_everyone()
    t0 = time.time()
    trainer = Trainer(run, method, teacher, out, dataset, accelerator=accelerator)
    result = trainer.fit()
    summary: dict = {"method": run.method, "teacher": run.teacher, "steps": run.steps,
                     "train_steps": result.steps, "stopped_by": result.stopped_by,
                     "train_minutes": round(result.minutes, 2),
                     "peak_memory_mb": round(result.peak_memory_mb, 1), "memory_kind": result.memory_kind,
                     "last_logs": result.last_logs, "num_processes": accelerator.num_processes,
                     "rank_weight_checksums": result.rank_checksums}
    if accelerator.is_main_process:
        summary.update(export_run(run, method, teacher, trainer, out, result.stopped_by))
        summary["total_minutes"] = round((time.time() - t0) / 60, 2)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    return summary


def export_run(run: RunConfig, method, teacher, trainer: Trainer, out: Path,
               stopped_by: str = "max_train_steps") -> dict:
    """Export pipeline/ (and lora/), reload-and-sample each, then benchmark and write the model card."""
    prompt = trainer.validation_prompts()[0]
    # The student's own step count: --steps, unless a time limit stopped a staged run early.
    n = method.sampling_steps()
    guidance = method.recommended_guidance_scale
    info = {"method": run.method, "teacher": run.teacher, "train_steps": trainer.step}
    with trainer.export_ema_weights():
        unet = method.export_unet(trainer.accelerator.unwrap_model)
        scheduler = method.export_scheduler(teacher.scheduler)
        pipeline_dir = export_pipeline(teacher, unet, scheduler, out / "pipeline", n, guidance, info, prompt)
        lora_state = method.lora_state_dict(trainer.accelerator.unwrap_model)
        lora_dir = None
        if lora_state is not None:
            lora_dir = export_lora(teacher, lora_state, out / "lora", scheduler, n, prompt)
    steps = sorted({s for s in (1, 2, 4, 8, n) if s <= min(max(8, n), method.max_sampling_steps())})
    table = None
    if run.benchmark_samples and run.data.dataset == "digits":
        bench_dir = out / "benchmark"
        shutil.rmtree(bench_dir, ignore_errors=True)
        _, table = bench_table(pipeline_dir, bench_dir, steps, guidance, run.benchmark_samples,
                               f"{run.method} student")
    details = {"method": f"{run.method} ({method.__class__.__name__})", "teacher": run.teacher,
               "intended steps": n, "recommended guidance_scale": guidance,
               "scheduler": type(scheduler).__name__, "training steps": trainer.step,
               **method.card_details()}
    baked = json.loads((pipeline_dir / EXPORT_INFO).read_text()).get("guidance_baked", False)
    if baked:
        details["guidance"] = "baked into the weights: guidance_scale has no effect (one UNet pass per step)"
    if stopped_by != "max_train_steps":
        details["training stopped"] = f"early, by --{stopped_by.replace('_', '-')}, at step {trainer.step}"
    usage = (f'from diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained("{pipeline_dir}")\n'
             f'image = pipe("{prompt}", num_inference_steps={n}'
             + (").images[0]" if baked else f", guidance_scale={guidance}).images[0]"))
    if table:
        table = (f"{run.benchmark_samples} samples per step count, FID/KID against the real digits with the shipped "
                 f"digits classifier as feature extractor (`diffdistill bench`).\n\n" + table)
    write_model_card(pipeline_dir, f"{run.method} student of {run.teacher} ({n} steps)", details, usage, table)
    res = {"pipeline": str(pipeline_dir), "checkpoints": [str(p) for p in list_checkpoints(trainer.checkpoints_dir)]}
    if lora_dir is not None:
        res["lora"] = str(lora_dir)
    stages = out / "stages"
    if stages.is_dir():
        res["stages"] = sorted(str(p) for p in stages.iterdir() if (p / "model_index.json").is_file())
    return res
