"""The shipped students in pipelines/: each loads with plain diffusers in a process that never imports
diffdistill and samples one finite image of the right size at its intended step count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.parent for p in (ROOT / "pipelines").glob("*/model_index.json"))

PROBE = r"""
import json, sys
import torch
from diffusers import DiffusionPipeline
folder = sys.argv[1]
info = json.load(open(folder + "/diffdistill.json"))
pipe = DiffusionPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
image = pipe("a handwritten digit 7", num_inference_steps=info["num_inference_steps"], output_type="pt",
             generator=torch.Generator().manual_seed(0)).images
assert "diffdistill" not in sys.modules, "a shipped student must not need diffdistill"
assert all(p.dtype == torch.float32 for p in pipe.unet.parameters()), "float16 storage loads as float32"
print(json.dumps({"shape": list(image.shape), "finite": bool(torch.isfinite(image).all()),
                  "std": float(image.std()), "steps": info["num_inference_steps"]}))
"""


def test_pipelines_folder_holds_only_pipelines():
    folder = ROOT / "pipelines"
    if not folder.is_dir():
        pytest.skip("no pipelines/ shipped in this checkout")
    stray = [p.name for p in folder.iterdir() if p.is_dir() and not (p / "model_index.json").is_file()]
    assert not stray, f"folders without model_index.json in pipelines/: {stray}"


@pytest.mark.slow
@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_student_samples_in_plain_diffusers(folder):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, timeout=300,
                       env=env, cwd=str(folder.parent))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["finite"] and out["shape"] == [1, 3, 32, 32]
    assert out["std"] > 0.05, "a blank image: the student did not load its weights"
    card = (folder / "README.md").read_text()
    assert "Measured quality" in card, "every shipped student's card carries its measured table"
    assert json.loads((folder / "diffdistill.json").read_text())["num_inference_steps"] == out["steps"]
