"""Export: a trained student + its scheduler preset -> a complete diffusers pipeline folder (and a LoRA).

``export_student`` is the one export path: ``diffdistill distill`` calls it at the end of a run and
``diffdistill export`` on a checkpoint (``export_run.py``), so both write the same pipeline, LoRA and model card.
``DiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps=N)`` samples the student in
a process that never imports diffdistill. Every export is written to a temporary folder, reloaded
from disk and sampled once, and only then renamed into place: a failed or interrupted (SIGINT/SIGTERM)
export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch

from .digits import DATASET_KEY, DIGITS_DATASET, DIGITS_MARKER
from .loading import quiet_loading
from .outputs import replace_dir

EXPORT_INFO = "diffdistill.json"


def float32(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself when all its weights are float32, else a float32 copy (the training copy is left as it is)."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(torch.float32)


def build_pipeline(teacher, unet, scheduler, dtype_of_teacher: bool = True, safety: bool = False, vae=None):
    """The teacher family's pipeline from the teacher's VAE (or ``vae``, e.g. a distilled AutoencoderTiny), text
    encoders and tokenizers plus ``unet`` (the student network) and ``scheduler`` (``Teacher.build_pipeline``).

    ``dtype_of_teacher=False`` takes float32 copies of a half-precision VAE and text encoder (for export);
    ``safety=True`` adds the teacher's safety checker and feature extractor where it has them (for export)."""
    return teacher.build_pipeline(unet, scheduler, dtype_of_teacher=dtype_of_teacher, safety=safety, vae=vae)


def verify_pipeline(folder: Path, prompt: str, steps: int, guidance_scale: float, load_kwargs: dict | None = None,
                    sample_kwargs: dict | None = None) -> torch.Tensor:
    """Reload ``folder`` with plain DiffusionPipeline.from_pretrained and sample once; returns the image.
    ``load_kwargs``: components the folder leaves out (e.g. ``text_encoder_3=None`` of an SD3 without T5);
    ``sample_kwargs``: the call's size or noise levels where the pipeline's defaults are not the student's
    (``Teacher.sample_kwargs``)."""
    from diffusers import DiffusionPipeline

    with quiet_loading():
        pipe = DiffusionPipeline.from_pretrained(str(folder), **(load_kwargs or {}))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, **(sample_kwargs or {}),
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    if not torch.isfinite(image).all():
        raise RuntimeError(f"export check failed: {folder} produced non-finite pixels")
    return image


def export_pipeline(teacher, unet, scheduler, folder: Path, steps: int, guidance_scale: float,
                    info: dict, prompt: str, vae=None, inert_guidance: bool = True) -> Path:
    """Write the teacher family's pipeline folder for ``unet`` + ``scheduler``, verified by reload-and-sample.

    ``info`` (method, steps, guidance, ...) is stored as ``diffdistill.json`` beside model_index.json.
    A UNet without a guidance embedding is saved with an inert one (``Teacher.export_net``) unless
    ``inert_guidance=False`` (a student guided by the pipeline's CFG, like its teacher). ``vae``: see build_pipeline.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # A student with its guidance baked in must not be guided again by the pipeline's default 7.5.
    baked = teacher.guidance_baked(unet, inert_guidance)
    unet = teacher.export_net(unet.to(torch.float32), inert_guidance)
    # Every component is saved in float32 (training may hold the teacher's VAE and text encoder in half
    # precision): a folder of mixed dtypes fails in a plain StableDiffusionPipeline call.
    pipe = build_pipeline(teacher, unet, scheduler, dtype_of_teacher=False, safety=True, vae=vae)
    try:
        with quiet_loading():
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        call = teacher.sample_kwargs(steps)  # what the pipeline call needs beyond its defaults (the card's usage)
        # ... and at the step counts a benchmark samples it at (bench reads them: eval.config.read_call_kwargs)
        by_steps = {str(n): kw for n in sorted({1, 2, 4, 8, steps}) if (kw := teacher.sample_kwargs(n))}
        (tmp / EXPORT_INFO).write_text(json.dumps({**info, "num_inference_steps": steps,
                                                   "recommended_guidance_scale": guidance_scale,
                                                   "guidance_baked": baked,
                                                   **({"call_kwargs": call} if call else {}),
                                                   **({"call_kwargs_by_steps": by_steps} if by_steps else {})},
                                                  indent=2) + "\n")
        verify_pipeline(tmp, prompt, steps, guidance_scale, teacher.absent_parts, call)
        replace_dir(tmp, folder)
    except BaseException:  # an error or a signal (Terminated, KeyboardInterrupt): no temporary folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def export_lora(teacher, lora_state: dict, folder: Path, scheduler, steps: int, prompt: str) -> Path:
    """Write a diffusers-format LoRA (``pytorch_lora_weights.safetensors``) and check that
    ``load_lora_weights`` on the teacher family's pipeline accepts it and samples."""
    import diffusers

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline_cls = getattr(diffusers, teacher.pipeline_class_name)
    try:
        pipeline_cls.save_lora_weights(str(tmp), safe_serialization=True, **{teacher.lora_layers_key: lora_state})
        scheduler.save_pretrained(str(tmp / "scheduler"))
        # A fresh copy of the teacher from disk, exactly as a user would load it.
        with quiet_loading():
            pipe = pipeline_cls.from_pretrained(teacher.source, **teacher.reload_kwargs())
            pipe.load_lora_weights(str(tmp))
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = type(scheduler).from_config(scheduler.config)
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=1.0, **teacher.sample_kwargs(steps),
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
        if not torch.isfinite(image).all():
            raise RuntimeError(f"LoRA check failed: {folder} produced non-finite pixels")
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_model_card(folder: Path, title: str, details: dict, usage: str, table_md: str | None) -> None:
    """A README.md model card: what the student is, how to sample it, and its measured quality."""
    lines = [f"# {title}", "", "Distilled with diffdistill, a diffusion-model distillation suite.", "",
             "## Details", ""]
    lines += [f"- **{k}**: {v}" for k, v in details.items()]
    lines += ["", "## Usage", "", "```python", usage.strip(), "```", ""]
    if table_md:
        lines += ["## Measured quality", "", table_md.strip(), ""]
    (Path(folder) / "README.md").write_text("\n".join(lines))


def bench_table(pipeline_dir: Path, out: Path, steps: list[int], guidance: float, num_samples: int,
                label: str) -> str | None:
    """A small FID/IS/KID-vs-steps benchmark of the export for its model card (digits teachers only): Markdown."""
    if num_samples <= 0:
        return None
    from .eval.bench import BenchConfig, report_markdown_table, run_bench

    cfg = BenchConfig(pipelines=[str(pipeline_dir)], steps=steps, output=str(out), num_samples=num_samples,
                      guidance=guidance, labels=[label])
    return report_markdown_table(run_bench(cfg))


def digits_student(run) -> bool:
    """A student is a digits pipeline (``DIGITS_MARKER`` in its diffdistill.json, what bench's digits defaults
    need) when its teacher folder is one or it was trained on --dataset digits."""
    teacher_info = Path(run.teacher) / EXPORT_INFO
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if json.loads(teacher_info.read_text()).get(DATASET_KEY) == DIGITS_DATASET:
            return True
    return run.data.dataset == DIGITS_DATASET


def export_student(run, method, teacher, pipeline_dir: Path, lora_dir: Path, prompt: str, train_steps: int, *,
                   unwrap=lambda m: m, info: dict | None = None, stopped_by: str = "max_train_steps",
                   bench_dir: Path | None = None) -> dict:
    """Export ``method``'s student as it holds its weights now (the caller swaps in an EMA first): the pipeline
    with its scheduler preset, the LoRA where one was trained, both verified by reload-and-sample with ``prompt``;
    then the card benchmark (digits runs with ``benchmark_samples``; in ``bench_dir``, else a temporary folder)
    and the model card. ``info`` adds fields to the pipeline's ``diffdistill.json``.
    Returns {"pipeline": folder, "lora": folder or None}."""
    # The student's own step count: --steps, unless a time limit stopped a staged run early.
    n = method.sampling_steps()
    guidance = method.recommended_guidance_scale
    info = {**(info or {}), "method": run.method, "teacher": run.teacher, "train_steps": train_steps,
            **(DIGITS_MARKER if digits_student(run) else {})}
    unet = method.export_unet(unwrap)
    scheduler = method.export_scheduler(teacher.scheduler)
    pipeline_dir = export_pipeline(teacher, unet, scheduler, Path(pipeline_dir), n, guidance, info, prompt,
                                   vae=method.export_vae(unwrap), inert_guidance=not method.needs_cfg())
    lora_state = method.lora_state_dict(unwrap)
    lora = None if lora_state is None else export_lora(teacher, lora_state, Path(lora_dir), scheduler, n, prompt)
    table = None
    if run.benchmark_samples and run.data.dataset == "digits":
        steps = sorted({s for s in (1, 2, 4, 8, n) if s <= min(max(8, n), method.max_sampling_steps())})
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(bench_dir) if bench_dir is not None else Path(tmp) / "benchmark"
            shutil.rmtree(out, ignore_errors=True)
            table = bench_table(pipeline_dir, out, steps, guidance, run.benchmark_samples, f"{run.method} student")
    details = {"method": f"{run.method} ({method.__class__.__name__})", "teacher": run.teacher,
               "intended steps": n, "recommended guidance_scale": guidance,
               "scheduler": type(scheduler).__name__, "training steps": train_steps,
               **method.card_details()}
    exported = json.loads((pipeline_dir / EXPORT_INFO).read_text())
    baked = exported.get("guidance_baked", False)
    # baked guidance the pipeline ignores (an inert guidance embedding) or must be sampled at scale 1 (SD3)
    scale_ignored = baked and teacher.guidance_embedding
    if scale_ignored:
        details["guidance"] = "baked into the weights: guidance_scale has no effect (one UNet pass per step)"
    elif baked:
        details["guidance"] = ("baked into the weights: sample with guidance_scale=1 (one pass per step; a larger "
                               "scale adds a classifier-free-guidance pass on top)")
    if scheduler.config.get("stochastic_sampling") and n > 1:
        details["sampling noise"] = ("the scheduler noises the student's x0 afresh between steps, from torch's global "
                                     "RNG (the pipeline does not hand its generator to the scheduler): call "
                                     "torch.manual_seed before the pipeline for reproducible images")
    if run.drop_safety_checker:
        details["safety checker"] = ("dropped (--drop-safety-checker): this pipeline does not filter its outputs, "
                                     "whatever the teacher did")
    elif teacher.safety_parts:
        details["safety checker"] = "the teacher's, kept with its feature extractor"
    if stopped_by != "max_train_steps":
        details["training stopped"] = f"early, by --{stopped_by.replace('_', '-')}, at step {train_steps}"
    # components the folder leaves out (SD3 without T5) must be named to from_pretrained; a size (Flux) or noise
    # levels (SD3 from 2 steps) where the pipeline's defaults are not the student's
    absent = "".join(f", {k}=None" for k in teacher.absent_parts)
    size = "".join(f", {k}={v}" for k, v in exported.get("call_kwargs", {}).items())  # as export_pipeline wrote it
    usage = (f'from diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained("{pipeline_dir}"{absent})\n'
             f'image = pipe("{prompt}", num_inference_steps={n}{size}'
             + (").images[0]" if scale_ignored else f", guidance_scale={guidance}).images[0]"))
    if table:
        table = (f"{run.benchmark_samples} samples per step count, FID/KID against the real digits with the shipped "
                 f"digits classifier as feature extractor (`diffdistill bench`).\n\n" + table)
    write_model_card(pipeline_dir, f"{run.method} student of {run.teacher} ({n} steps)", details, usage, table)
    return {"pipeline": pipeline_dir, "lora": lora}
