"""What an export carries over from its teacher: clean scheduler configs, the safety checker."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from diffusers import EulerDiscreteScheduler, LCMScheduler, PNDMScheduler

from diffdistill.methods.progressive import ProgressiveDistillation
from diffdistill.solvers import lcm_scheduler

PNDM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            skip_prk_steps=True, steps_offset=1)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_warnings(cls, folder) -> list[str]:
    """What diffusers logs while ``cls`` loads the scheduler saved in ``folder``."""
    log = logging.getLogger("diffusers")
    handler = _Records()
    log.addHandler(handler)
    try:
        cls.from_pretrained(str(folder))
    finally:
        log.removeHandler(handler)
    return handler.messages


@pytest.mark.parametrize("preset", ["lcm", "progressive"])
def test_a_pndm_teachers_export_scheduler_has_only_the_target_class_keys(preset, tmp_path):
    pndm = PNDMScheduler(**PNDM)
    if preset == "lcm":
        sch, cls = lcm_scheduler(pndm, 50, 10.0, "epsilon"), LCMScheduler
    else:
        from diffdistill.teachers import Teacher

        method = SimpleNamespace(teacher=Teacher(pipe=None, schedule=None, prediction_type="epsilon", source=""))
        sch, cls = ProgressiveDistillation.export_scheduler(method, pndm), EulerDiscreteScheduler
    sch.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert "skip_prk_steps" not in saved
    assert set(saved) - {"_class_name", "_diffusers_version"} <= set(cls._get_init_keys(cls))
    assert saved["beta_schedule"] == "scaled_linear" and saved["steps_offset"] in (0, 1)
    assert not [m for m in _load_warnings(cls, tmp_path) if "not expected" in m]


@pytest.fixture(scope="module")
def tiny_sd_safe(tmp_path_factory):
    """The tiny digits-SD teacher with a (tiny random) safety checker and requires_safety_checker: true."""
    from diffdistill.tiny_pipelines import save_pipeline

    return save_pipeline(tmp_path_factory.mktemp("tiny-sd-safe") / "pipe", safety_checker=True)


def _components(folder) -> dict:
    index = json.loads((folder / "model_index.json").read_text())
    return {k: index[k] for k in ("safety_checker", "feature_extractor", "requires_safety_checker")}


@pytest.mark.slow
@pytest.mark.parametrize("drop", [False, True])
def test_the_teachers_safety_checker_is_exported_unless_dropped(drop, tiny_sd_safe, tmp_path, one_thread):
    from diffusers import DiffusionPipeline
    from test_cli import TINY

    from diffdistill.cli import main

    out = tmp_path / "run"
    flags = ["--drop-safety-checker"] if drop else []
    assert main(["distill", "--method", "lcm", "--teacher", tiny_sd_safe, "--output", str(out), *TINY, *flags]) == 0
    card = (out / "pipeline" / "README.md").read_text()
    assert json.loads((out / "pipeline" / "diffdistill.json").read_text())["dataset"] == "digits"  # bench's defaults
    if drop:
        assert _components(out / "pipeline") == {"safety_checker": [None, None], "feature_extractor": [None, None],
                                                 "requires_safety_checker": False}
        assert "dropped (--drop-safety-checker)" in card
        return
    assert _components(out / "pipeline") == _components(Path(tiny_sd_safe))
    assert "the teacher's, kept" in card
    pipe = DiffusionPipeline.from_pretrained(str(out / "pipeline"))
    assert type(pipe.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    assert pipe.feature_extractor is not None and pipe.config.requires_safety_checker is True


@pytest.mark.slow
def test_a_pndm_teachers_export_loads_without_unexpected_config_attributes(tmp_path, one_thread):
    from test_cli import TINY

    from diffdistill.cli import main
    from diffdistill.digits import DIGITS_MARKER
    from diffdistill.tiny_pipelines import build_pipeline

    teacher = tmp_path / "pndm-teacher"
    pipe = build_pipeline()
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.save_pretrained(str(teacher), safe_serialization=True)
    (teacher / "diffdistill.json").write_text(json.dumps(DIGITS_MARKER))
    assert json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())["skip_prk_steps"] is True
    out = tmp_path / "run"
    assert main(["distill", "--method", "lcm", "--teacher", str(teacher), "--output", str(out), *TINY]) == 0
    saved = json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "LCMScheduler" and "skip_prk_steps" not in saved
    assert not [m for m in _load_warnings(LCMScheduler, out / "pipeline" / "scheduler") if "not expected" in m]
