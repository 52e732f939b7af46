"""A copy of a pipeline folder whose vae is another pipeline's (e.g. the AutoencoderTiny a tiny-decoder run exported),
checked by a plain diffusers load and one sample. For measuring one tiny decoder beside several UNets without
training it again:

    python benchmarks/tools/with_vae.py assets/digits-sd runs/digits-composed/pipeline runs/teacher-taesd
    python benchmarks/tools/with_vae.py runs/digits-kd-tiny/pipeline runs/digits-composed/pipeline runs/kd-tiny-taesd
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def with_vae(pipeline: Path, vae_from: Path, out: Path) -> Path:
    """Copy ``pipeline`` to ``out`` with ``vae_from``'s vae/ folder and model_index entry."""
    if out.exists():
        raise SystemExit(f"error: {out} exists")
    shutil.copytree(pipeline, out)
    shutil.rmtree(out / "vae")
    shutil.copytree(vae_from / "vae", out / "vae")
    index = json.loads((out / "model_index.json").read_text())
    index["vae"] = json.loads((vae_from / "model_index.json").read_text())["vae"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "README.md").unlink(missing_ok=True)  # the card described the other vae
    return out


if __name__ == "__main__":
    import torch
    from diffusers import DiffusionPipeline

    folder = with_vae(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    image = pipe("a handwritten digit 7", num_inference_steps=2, output_type="pt").images
    assert torch.isfinite(image).all()
    print(f"{folder}: unet {type(pipe.unet).__name__}, vae {type(pipe.vae).__name__}, samples")
