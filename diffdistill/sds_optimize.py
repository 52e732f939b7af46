"""``diffdistill sds``: optimise latents for a prompt with score-distillation sampling (the classic 2D SDS).

The generator is ``LatentGenerator`` (the latents are the parameters); any ``DifferentiableGenerator``
(a NeRF renderer, a Gaussian rasteriser) can take its place in ``optimise``. Writes ``result.png``
(the decoded images), ``progress.png`` (a strip of decodes over the run) and ``result.json``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .config import opt, require_seed
from .errors import require
from .methods.score import (
    WEIGHTINGS,
    DifferentiableGenerator,
    LatentGenerator,
    check_timestep_range,
    inject_gradient,
    sample_timesteps,
    sds_gradient,
)
from .outputs import check_output, replace_dir, write_marker


@dataclass
class SDSOptimizeConfig:
    """Options of ``diffdistill sds``."""

    FORMER_OPTIONS: ClassVar[dict[str, str]] = {"guidance_scale": "was renamed: use --teacher-guidance-scale"}

    teacher: str = opt("assets/digits-sd", "teacher: a diffusers Stable Diffusion folder or hub id")
    prompt: str = opt("", "prompt to optimise for (required)")
    output: str = opt("", "output folder (required)")
    num_images: int = opt(4, "images optimised side by side (different seeds)")
    iters: int = opt(300, "optimisation steps")
    lr: float = opt(0.05, "Adam learning rate on the latents")
    teacher_guidance_scale: float = opt(7.5, "the teacher's classifier-free guidance scale (SDS needs a high one)")
    t_min: int = opt(20, "smallest timestep")
    t_max: int = opt(980, "largest timestep at the start")
    t_max_end: int = opt(500, "t_max at the end (linear annealing; -1: none)")
    weighting: str = opt("dreamfusion", f"w(t): {', '.join(WEIGHTINGS)}")
    seed: int = opt(0, "seed of the initial latents and the noise")
    snapshots: int = opt(8, "decodes in the progress strip")
    overwrite: bool = opt(False, "replace an existing result in --output")

    def __post_init__(self):
        require(bool(self.prompt.strip()), "--prompt must not be empty")
        require(bool(self.output), "--output is required")
        for name in ("num_images", "iters", "snapshots"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        require(self.teacher_guidance_scale >= 0, f"--teacher-guidance-scale must be >= 0, got {self.teacher_guidance_scale}")
        check_timestep_range(self.t_min, self.t_max, self.t_max_end)
        require(self.weighting in WEIGHTINGS, f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        require_seed(self.seed)


def optimise(generator: DifferentiableGenerator, teacher, cond, uncond, cfg: SDSOptimizeConfig, on_snapshot=None):
    """Run SDS on ``generator``'s parameters; returns the final latents. ``on_snapshot(i, latents)`` is called
    ``cfg.snapshots`` times."""
    from tqdm.auto import tqdm

    shape = (cond.shape[0], *teacher.latent_shape)
    den = teacher.denoiser()
    opt_ = torch.optim.Adam(generator.parameters(), lr=cfg.lr)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    every = max(1, cfg.iters // cfg.snapshots)
    for i in tqdm(range(cfg.iters), desc="sds", dynamic_ncols=True):
        x = generator(torch.zeros(shape, device=cond.device), cond)
        require(tuple(x.shape) == shape, f"generator output shape {tuple(x.shape)} does not match the teacher's "
                                         f"latents {shape}")
        t = sample_timesteps(cfg, shape[0], i / max(cfg.iters - 1, 1), cond.device, generator=g)
        noise = torch.randn(shape, generator=g).to(cond.device)
        grad = sds_gradient(x, den, cond, uncond, cfg.teacher_guidance_scale, t, noise, cfg.weighting)
        opt_.zero_grad(set_to_none=True)
        inject_gradient(x, grad).backward()
        opt_.step()
        if on_snapshot is not None and ((i + 1) % every == 0 or i == cfg.iters - 1):
            on_snapshot(i + 1, x.detach())
    return generator(torch.zeros(shape, device=cond.device), cond).detach()


def run_sds(cfg: SDSOptimizeConfig) -> dict:
    """Load the teacher, optimise, decode and save result.png, progress.png and result.json."""
    from .teachers import load_teacher

    out = Path(cfg.output)
    check_output(out, "sds", cfg.overwrite)
    teacher = load_teacher(cfg.teacher)
    torch.manual_seed(cfg.seed)
    cond = teacher.encode_prompts([cfg.prompt] * cfg.num_images)
    uncond = teacher.encode_prompts([""])
    gen = LatentGenerator((cfg.num_images, *teacher.latent_shape), generator=torch.Generator().manual_seed(cfg.seed))
    gen.to(cond.device)
    snaps: list[torch.Tensor] = []
    latents = optimise(gen, teacher, cond, uncond, cfg, lambda i, x: snaps.append(teacher.decode_latents(x[:1])))
    images = (teacher.decode_latents(latents) + 1) / 2  # (N, 3, H, W) in [0, 1]
    tmp = out.absolute().with_name(f".{out.absolute().name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_result(tmp, images, snaps, cfg)
        replace_dir(tmp, out)
    except BaseException:  # an error or a signal: no half-written result stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return json.loads((out / "result.json").read_text())


def _write_result(tmp: Path, images: torch.Tensor, snaps: list[torch.Tensor], cfg: SDSOptimizeConfig) -> None:
    """result.png, progress.png, result.json (with the digits classifier's verdict where it applies), marker."""
    from .digits import caption_to_label
    from .images import save_grid

    save_grid(images, tmp / "result.png", cfg.num_images, pad_value=255)
    save_grid((torch.cat(snaps) + 1) / 2, tmp / "progress.png", len(snaps), pad_value=255)
    result = {"prompt": cfg.prompt, "num_images": cfg.num_images, "iters": cfg.iters, "teacher": cfg.teacher}
    label = caption_to_label(cfg.prompt)
    if label is not None:  # digits-SD: judge the result with the shipped classifier
        from .eval.digits_classifier import load_digits_classifier

        clf = load_digits_classifier()
        with torch.no_grad():
            pred = clf(images.cpu()).argmax(1)
        result["predicted_digits"] = pred.tolist()
        result["accuracy"] = float((pred == label).float().mean())
    (tmp / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    write_marker(tmp, "sds")
