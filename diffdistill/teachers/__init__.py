"""Teachers: one adapter per model family, loaded by the ``_class_name`` of the pipeline.

``load_teacher`` reads the pipeline class of a local folder or hub id and gives the family's adapter
(``sd.Teacher`` for SD 1.x/2.x, ``sd3.SD3Teacher`` for SD3/SD3.5), frozen, with one-line errors; the methods
speak only the adapter's interface (see ``sd.py``).
"""

from __future__ import annotations

import torch

from ..denoiser import NoiseSchedule, scheduler_prediction_type
from ..errors import UserError, require
from ..loading import (
    absent_parts,
    check_pipeline_folder,
    check_variant,
    hub_kwargs,
    is_hub_id,
    is_single_file,
    load_error_line,
    load_single_file,
    quiet_loading,
)
from .flux import FluxTeacher
from .sd import PROMPT_CACHE_SIZE, UNET_LORA_TARGETS, Teacher
from .sd3 import SD3Teacher
from .sdxl import SDXLTeacher

__all__ = ["PROMPT_CACHE_SIZE", "SUPPORTED_PIPELINES", "UNET_LORA_TARGETS", "FluxTeacher", "SD3Teacher",
           "SDXLTeacher", "Teacher", "check_teacher_folder", "load_teacher"]

# pipeline class -> adapter
FAMILIES: dict[str, type[Teacher]] = {"StableDiffusionPipeline": Teacher, "StableDiffusionXLPipeline": SDXLTeacher,
                                      "StableDiffusion3Pipeline": SD3Teacher, "FluxPipeline": FluxTeacher}
SUPPORTED_PIPELINES = tuple(FAMILIES)


def _require_supported(cls: str, source) -> None:
    require(cls in FAMILIES, f"teacher {source} is a {cls or 'unknown'} pipeline; supported: {', '.join(SUPPORTED_PIPELINES)}")


def check_teacher_folder(path) -> dict:
    """model_index.json of a local pipeline folder of a supported family, or a one-line UserError."""
    info = check_pipeline_folder(path, what="teacher")
    _require_supported(info.get("_class_name", ""), path)
    return info


def _hub_model_index(source: str, kwargs: dict) -> dict:
    """model_index.json of a hub pipeline (one small download), or a one-line UserError."""
    from diffusers import DiffusionPipeline

    try:
        with quiet_loading():
            return dict(DiffusionPipeline.load_config(source, **kwargs))
    except Exception as e:  # noqa: BLE001 - any failure to reach the pipeline is one line for the user
        raise UserError(f"cannot load teacher {source!r}: {load_error_line(e)}") from None


def load_teacher(source: str, revision: str = "", variant: str = "", local_files_only: bool = False,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 safety_checker: bool = False, single_file_config: str = "assets/digits-sd") -> Teacher:
    """Load a teacher of a supported family from a local folder, a hub id or an SD single-file checkpoint (read
    with the configs of the folder ``single_file_config``), frozen, with one-line errors.

    ``safety_checker=True`` also loads an SD teacher's safety checker and feature extractor (for the export), kept
    on the CPU in ``Teacher.safety_parts``; the training pipeline ``Teacher.pipe`` never holds them."""
    import diffusers

    if is_single_file(source):  # the SD 1.x/2.x layout of community fine-tunes
        require(not variant, f"--variant {variant} does not apply to the single-file teacher {source}")
        family, absent = Teacher, {}
        kwargs = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
        pipe = load_single_file(source, single_file_config, "teacher", dtype=dtype, **kwargs)
    else:
        if is_hub_id(source):
            kwargs = hub_kwargs(revision, local_files_only)
            info = _hub_model_index(source, kwargs)
            _require_supported(info.get("_class_name", ""), source)
        else:
            info = check_teacher_folder(source)
            check_variant(source, variant, "teacher")
            FAMILIES[info["_class_name"]].check_folder(source)
            kwargs = {}
        if variant:
            kwargs["variant"] = variant
        family = FAMILIES[info["_class_name"]]
        absent = absent_parts(info)
        kwargs.update(absent)
        if family is Teacher and not safety_checker:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            with quiet_loading():
                pipe = getattr(diffusers, family.pipeline_class_name).from_pretrained(source, dtype=dtype, **kwargs)
        except Exception as e:  # noqa: BLE001 - any load failure becomes one line for the user
            raise UserError(f"cannot load teacher {source!r}: {load_error_line(e)}") from None
    pipe.set_progress_bar_config(disable=True)
    if family.prediction_type_of_family is None:  # a VP family: the scheduler says
        teacher = _vp_teacher(family, pipe, source)
    else:
        teacher = family(pipe=pipe, schedule=family.flow_schedule(pipe), prediction_type=family.prediction_type_of_family,
                         source=source)
    teacher.absent_parts = absent
    for m in teacher.frozen_parts():
        m.requires_grad_(False)
        m.eval()
    with quiet_loading():
        pipe.to(device)
        pipe.vae.to(torch.float32)  # the VAE stays in fp32: SD's VAE overflows in fp16
    return teacher


def _vp_teacher(family: type[Teacher], pipe, source: str) -> Teacher:
    """An SD 1.x/2.x or SDXL adapter: the safety checker set aside for the export, the VP schedule of the scheduler."""
    from diffusers import DDPMScheduler

    from ..solvers import scheduler_from_config

    safety_parts = {}
    if getattr(pipe, "safety_checker", None) is not None:
        safety_parts = {"safety_checker": pipe.safety_checker.requires_grad_(False).eval(),
                        "feature_extractor": pipe.feature_extractor,
                        "requires_safety_checker": bool(pipe.config.requires_safety_checker)}
        pipe.safety_checker, pipe.feature_extractor = None, None
        pipe.register_to_config(requires_safety_checker=False)
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    require(prediction_type in ("epsilon", "v_prediction"),
            f"teacher {source}: prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")
    # The training noise schedule comes from the scheduler config (DDPM holds it without inference state).
    ddpm = scheduler_from_config(DDPMScheduler, pipe.scheduler.config)
    schedule = NoiseSchedule.from_scheduler(ddpm, final_alphas_cumprod=float(ddpm.alphas_cumprod[0]))
    return family(pipe=pipe, schedule=schedule, prediction_type=scheduler_prediction_type(pipe.scheduler),
                  source=source, safety_parts=safety_parts)
