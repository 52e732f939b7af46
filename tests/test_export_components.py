"""What an export carries over from its teacher: clean scheduler configs, the safety checker."""

from __future__ import annotations

import json
import logging
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
        method = SimpleNamespace(teacher=SimpleNamespace(prediction_type="epsilon"))
        sch, cls = ProgressiveDistillation.export_scheduler(method, pndm), EulerDiscreteScheduler
    sch.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert "skip_prk_steps" not in saved
    assert set(saved) - {"_class_name", "_diffusers_version"} <= set(cls._get_init_keys(cls))
    assert saved["beta_schedule"] == "scaled_linear" and saved["steps_offset"] in (0, 1)
    assert not [m for m in _load_warnings(cls, tmp_path) if "not expected" in m]
