"""``diffdistill distill``: config -> teacher + method -> trainer -> export -> small benchmark -> model card.

Every check that can fail on user input runs before the output folder is touched, so a bad
invocation leaves nothing half-written. The run folder is then locked (one run at a time), marked with
``diffdistill.json`` (command and run id) and owned by this run: ``--overwrite`` replaces only a folder that
an earlier ``diffdistill distill`` wrote, and starts it clean.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .checkpoint import new_run_id, require_sharding, resolve_resume
from .config import RunConfig, require_adam_step_fits, save_yaml, to_dict
from .data import LatentCache, TarShards, build_dataset, holds_images, require_images
from .errors import require
from .export import export_student
from .methods import build_method_config, get_method
from .outputs import OUTPUT_MARKER, FolderLock, check_output, write_marker
from .teachers import load_teacher
from .trainer import Trainer, list_checkpoints, make_accelerator

# What a run writes into its folder: --overwrite removes exactly these (a user's other files stay).
RUN_ENTRIES = (OUTPUT_MARKER, "config.yaml", "logs.csv", "logs.csv.tmp", "summary.json", "checkpoints", "samples",
               "pipeline", "lora", "stages", "benchmark", "tensorboard", ".pipeline.tmp", ".lora.tmp",
               "pipeline.old", "lora.old")


def asked_of_accelerate(kind: str) -> bool:
    """Whether the accelerate launch (its config or flags) asked for ``kind`` (FSDP, DEEPSPEED, MEGATRON_LM), even
    where accelerate then falls back to DDP (on CPU)."""
    return os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() in ("1", "true")


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen networks run in: the lowest precision the run asked for (fp32 otherwise)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def check_output_folder(run: RunConfig) -> tuple[Path, str | None]:
    """Validate --output without writing: new or empty, or an earlier distill run (to resume, or to replace with
    --overwrite). Returns the folder and the run id it continues (None: a new run)."""
    require(bool(run.output), "--output is required")
    require(not (run.overwrite and run.train.resume_from_checkpoint),
            "--overwrite starts the run over and cannot be combined with --resume-from-checkpoint")
    out = Path(run.output)
    earlier = check_output(out, "distill", run.overwrite, resumable=bool(run.train.resume_from_checkpoint))
    return out, (run_id_in(out) if earlier and not run.overwrite else None)


def run_id_in(out: Path) -> str | None:
    """The run id in a run folder's marker."""
    return json.loads((out / OUTPUT_MARKER).read_text()).get("run_id")


def claim_run_folder(out: Path, run: RunConfig) -> FolderLock:
    """Lock ``out`` for this process, then (checked again under the lock) start it clean for a new run
    (marker with a fresh run id) or keep it for a resumed one. Main process only."""
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out).acquire()
    try:
        _, run_id = check_output_folder(run)
        if run_id is None:
            for name in RUN_ENTRIES:  # only an earlier run of ours gets here with entries (--overwrite)
                p = out / name
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            write_marker(out, "distill", run_id=new_run_id())
    except BaseException:
        lock.release()
        raise
    return lock


def check_xformers(run: RunConfig) -> None:
    """--enable-xformers needs the xformers package (the [gpu] extra)."""
    if run.train.enable_xformers:
        try:
            import xformers  # noqa: F401
        except ImportError:
            from .errors import UserError

            raise UserError("--enable-xformers needs xformers: pip install 'diffdistill[gpu]'") from None


def run_distill(run: RunConfig, dry_run: bool = False) -> dict:
    """Train, export, verify and document one student. Returns a summary dict (also saved as summary.json)."""
    spec = get_method(run.method)
    method_cfg = build_method_config(run.method, run.method_args, f"--method {run.method} options")
    out, run_id = check_output_folder(run)
    check_xformers(run)
    if asked_of_accelerate("FSDP"):  # accelerate's FSDP config selects our own FSDP2 path (it falls back to DDP on CPU)
        run.train = dataclasses.replace(run.train, sharding="fsdp2")  # validated again
    method = spec.method_cls(method_cfg, run)
    if run.train.sharding == "fsdp2":
        problem = method.sharding_problem()
        require(problem is None, f"--sharding fsdp2: {problem}")
    total = method.total_steps()
    if total is not None and total != run.train.max_train_steps:
        # Staged methods own their length (sum of their stages); the saved config records it.
        run.train.max_train_steps = total
    resolved = to_dict(run)
    resolved["method_args"] = to_dict(method_cfg)
    if dry_run:
        return {"config": resolved}

    for kind in ("DEEPSPEED", "MEGATRON_LM"):  # asked for (checked before accelerate fails on a missing package)
        require(not asked_of_accelerate(kind), f"accelerate is configured for {kind}, which diffdistill does not "
                                               "support; use DDP, or FSDP (--sharding fsdp2)")
    accelerator = make_accelerator(run.train)
    if asked_of_accelerate("FSDP") and accelerator.is_main_process:
        print("[diffdistill] accelerate selected FSDP: diffdistill shards with its own FSDP2 path (--sharding fsdp2; "
              "per-block fully_shard, teacher whole on every rank); accelerate's other FSDP options are not used",
              file=sys.stderr, flush=True)
    require(run.train.sharding != "fsdp2" or accelerator.num_processes > 1,
            "--sharding fsdp2 shards across processes: start it with accelerate launch --num_processes N (N > 1)")
    require(not (run.train.mixed_precision == "fp16" and accelerator.device.type == "cpu"),
            "--mixed-precision fp16 needs a GPU (this run would train on the CPU); use bf16 or no")
    for phase in method.phases:
        require_adam_step_fits(method.learning_rate(phase, run.train.learning_rate), run.train.adam_beta1,
                               f"the learning rate of phase {phase}")
    teacher = load_teacher(run.teacher, run.revision, run.variant, run.local_files_only,
                           device=accelerator.device, dtype=weight_dtype(run.train.mixed_precision),
                           safety_checker=not run.drop_safety_checker, single_file_config=run.single_file_config)
    method.validate(teacher)
    teacher.check_teacher_guidance(method.teacher_guidance_scales())
    method.initial_unet(teacher)  # --student-from is loaded and checked before anything is written
    dataset = build_dataset(run.data, teacher.image_size)
    require(len(dataset) > 0, f"--dataset {run.data.dataset}: no examples")
    if method.needs_images() is not None:
        require_images(holds_images(dataset), method.needs_images())
    if isinstance(dataset, TarShards):
        dataset.require_streams(accelerator.num_processes, run.data.dataloader_num_workers)
    resume = resolve_resume(run.train.resume_from_checkpoint, out / "checkpoints", run_id, warn=None)
    if resume is not None:  # a sharded checkpoint resumes only as it was written (checked before any write)
        require_sharding(resume, accelerator.num_processes if run.train.sharding == "fsdp2" else 0)
    if run.data.cache_latents:
        dataset = cache_latents(dataset, teacher, run.train.batch_size, accelerator)

    # Input is valid: from here on the output folder is written.
    lock = claim_run_folder(out, run) if accelerator.is_main_process else None
    try:
        accelerator.wait_for_everyone()
        return _train_and_export(run, method, teacher, dataset, out, resolved, accelerator)
    finally:
        if lock is not None:
            lock.release()


def cache_latents(dataset, teacher, batch_size: int, accelerator) -> LatentCache:
    """``--cache-latents``: the dataset with every image encoded once to its VAE posterior (every rank encodes the
    whole dataset, before the run folder is written; a resumed run encodes it again)."""
    require(holds_images(dataset), "--cache-latents needs images: --dataset must hold images, not only prompts")
    require(not isinstance(dataset, torch.utils.data.IterableDataset),
            "--cache-latents needs a dataset that fits in memory; webdataset shards stream instead: drop --cache-latents")
    t0 = time.time()
    cached = LatentCache(dataset, teacher.encode_posterior, batch_size)
    accelerator.print(f"[diffdistill] cached the VAE latents of {len(cached)} images in {time.time() - t0:.1f} s")
    return cached


def _train_and_export(run: RunConfig, method, teacher, dataset, out: Path, resolved: dict, accelerator) -> dict:
    """The writing half of ``run_distill`` (the run folder is locked and marked)."""
    if accelerator.is_main_process:
        save_yaml(resolved, out / "config.yaml")
    accelerator.wait_for_everyone()
    t0 = time.time()
    trainer = Trainer(run, method, teacher, out, dataset, accelerator=accelerator, run_id=run_id_in(out))
    result = trainer.fit()
    summary: dict = {"method": run.method, "teacher": run.teacher, "steps": run.steps,
                     "train_steps": result.steps, "stopped_by": result.stopped_by,
                     "train_minutes": round(result.minutes, 2),
                     "peak_memory_mb": round(result.peak_memory_mb, 1), "memory_kind": result.memory_kind,
                     "last_logs": result.last_logs, "num_processes": accelerator.num_processes,
                     "rank_weight_sha256": result.rank_checksums,
                     "skipped_images": {"count": len(result.skipped_images), "files": result.skipped_images}}
    exported = export_run(run, method, teacher, trainer, out, result.stopped_by)  # every rank: FSDP gathers
    if accelerator.is_main_process:
        summary.update(exported)
        summary["total_minutes"] = round((time.time() - t0) / 60, 2)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    return summary


def export_run(run: RunConfig, method, teacher, trainer: Trainer, out: Path,
               stopped_by: str = "max_train_steps") -> dict:
    """Export pipeline/ (and lora/) with the student EMA swapped in, through the one export path; the summary's
    files. Every rank calls it (under FSDP the full weights are gathered to the main process first, which alone
    exports); the other ranks get {}."""
    with trainer.export_ema_weights(), trainer.full_weights() as unwrap:
        if not trainer.accelerator.is_main_process:
            return {}
        exported = export_student(run, method, teacher, out / "pipeline", out / "lora",
                                  trainer.validation_prompts()[0], trainer.step, unwrap=unwrap,
                                  stopped_by=stopped_by, bench_dir=out / "benchmark")
    res = {"pipeline": str(exported["pipeline"]),
           "checkpoints": [str(p) for p in list_checkpoints(trainer.checkpoints_dir)]}
    if exported["lora"] is not None:
        res["lora"] = str(exported["lora"])
    stages = out / "stages"
    if stages.is_dir():
        res["stages"] = sorted(str(p) for p in stages.iterdir() if (p / "model_index.json").is_file())
    return res
