"""Shared fixtures: tiny random-weight digits-SD pipelines saved to disk (about a second each)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Path of an untrained (random) digits-SD pipeline with an epsilon-prediction DDIM scheduler."""
    from diffdistill.tiny_pipelines import save_pipeline

    return save_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    """The same tiny pipeline with a v-prediction scheduler."""
    from diffdistill.tiny_pipelines import save_pipeline

    return save_pipeline(tmp_path_factory.mktemp("tiny-sd-v") / "pipe", prediction_type="v_prediction")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny torch and BLAS ops on 2 cores shared with other jobs run far faster single-threaded (no spin-waits)."""
    from threadpoolctl import threadpool_limits  # ships with scikit-learn

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state; tests that change mixed precision need a fresh one."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """Path of an untrained (random) tiny SD3 pipeline: MMDiT, CLIP pair + tiny T5, shifted flow matching."""
    from diffdistill.tiny_pipelines import save_sd3_pipeline

    return save_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3") / "pipe")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Path of an untrained (random) tiny SDXL pipeline: added text_time conditions, two CLIP text encoders."""
    from diffdistill.tiny_pipelines import save_sdxl_pipeline

    return save_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "pipe")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """Path of an untrained (random) tiny Flux-dev-style pipeline: packed latents, guidance input, dynamic shift."""
    from diffdistill.tiny_pipelines import save_flux_pipeline

    return save_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "pipe")
