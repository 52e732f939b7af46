#!/usr/bin/env python
"""Train digits-flow: a tiny SD3-style flow-matching text-to-image model on scikit-learn's handwritten digits.

The project's stand-in for SD3 (and, through the same transformer plumbing, Flux) where no SD3 weights can be
downloaded: an ``SD3Transformer2DModel`` (MMDiT, 4 joint blocks, width 128, 2x2 patches) trained with
rectified flow matching (x_t = (1 - sigma) x_0 + sigma eps, velocity target eps - x_0) on noise levels drawn as
SD3 draws them (logit-normal, then SD3's static timestep shift, 3.0). It reuses digits-SD's parts:
its VAE (4x8x8 latents; a ``shift_factor`` is added, as SD3's VAE has one) and its frozen tiny CLIP text encoder
in both of SD3's CLIP slots (with an identity text projection), and runs without T5 (``text_encoder_3=None``,
as StableDiffusion3Pipeline allows). Captions are ``a handwritten digit K``; 10% empty-prompt dropout makes
classifier-free guidance work. Saved with ``StableDiffusion3Pipeline.save_pretrained`` (safetensors).

    python train_scripts/train_digits_flow.py --output assets/digits-flow

Deterministic for a given --seed on CPU. Training uses diffdistill's SD3 teacher adapter for the conditioning
and the transformer call, which folds the 256 zero T5 rows into one attention token (an exact identity,
``teachers/sd3.FoldedTokensJointAttnProcessor``): the pipeline computes the same output with the rows unfolded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_digits_sd import apply_update, optimizer_schedule_ema, save_digits_pipeline  # noqa: E402  (shared by the digits teachers)

from diffdistill.denoiser import shift_sigmas  # noqa: E402
from diffdistill.digits import DIGIT_PROMPTS, load_digits_32  # noqa: E402

TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
                   num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128,
                   pooled_projection_dim=64, pos_embed_max_size=4)


def clip_with_projection(text_encoder):
    """digits-SD's CLIPTextModel as the CLIPTextModelWithProjection SD3 needs: the same weights, and an identity
    text projection (the pooled embedding as it is)."""
    from transformers import CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(text_encoder.config)
    model.text_model.load_state_dict(text_encoder.state_dict())  # transformers 5: CLIPTextModel is the text model
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(model.text_projection.weight.shape[0]))
    return model.eval().requires_grad_(False)


def train(teacher, latents_mean, latents_std, labels, args, log):
    """Flow-matching training (velocity target, logit-normal shifted sigmas), CFG dropout, EMA weights."""
    net = teacher.unet
    g = torch.Generator().manual_seed(args.seed + 1)
    opt, sched, ema = optimizer_schedule_ema(net, args.lr, args.steps, args.ema_decay)
    text = teacher.encode_prompts(DIGIT_PROMPTS)  # (10, L + 1, D), packed as the adapter's methods see it
    uncond = teacher.encode_prompts([""])
    scaling, shift_factor = teacher.vae.config.scaling_factor, teacher.vae.config.shift_factor
    net.train().requires_grad_(True)
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, labels.shape[0], (args.batch_size,), generator=g)
        z = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=g)
        x0 = (z - shift_factor) * scaling
        cond = text[labels[idx]]
        drop = torch.rand(args.batch_size, generator=g) < args.uncond_prob
        cond = torch.where(drop[:, None, None], uncond.expand_as(cond), cond)
        u = torch.sigmoid(torch.randn(args.batch_size, generator=g) * args.logit_std + args.logit_mean)
        sigma = shift_sigmas(u, args.shift)
        noise = torch.randn(x0.shape, generator=g)
        s = sigma[:, None, None, None]
        x_t = (1 - s) * x0 + s * noise
        v = teacher.net_call(net, x_t, sigma * 1000.0, cond)
        loss = F.mse_loss(v, noise - x0)
        apply_update(loss, net, opt, sched, ema)
        if step % 100 == 0 or step == args.steps - 1:
            rate = (step + 1) / (time.time() - t0)
            log(f"step {step + 1}/{args.steps} loss {loss.item():.4f} ({rate:.2f} it/s)")
    ema.copy_to(net.parameters())
    net.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("assets/digits-flow"), help="pipeline folder to write (default: %(default)s)")
    p.add_argument("--digits-sd", type=Path, default=Path("assets/digits-sd"),
                   help="digits-SD pipeline whose VAE, text encoder and tokenizer are reused (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5000, help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the saved weights (default: %(default)s)")
    p.add_argument("--uncond-prob", type=float, default=0.1, help="empty-prompt dropout for CFG (default: %(default)s)")
    p.add_argument("--shift", type=float, default=3.0, help="SD3's static timestep shift (default: %(default)s)")
    p.add_argument("--logit-mean", type=float, default=0.0, help="logit-normal mean of the noise levels (default: %(default)s)")
    p.add_argument("--logit-std", type=float, default=1.0, help="logit-normal std of the noise levels (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch default (default: %(default)s)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0.0 <= args.uncond_prob < 1.0:
        p.error(f"--uncond-prob must be in [0, 1), got {args.uncond_prob}")
    if args.shift <= 0 or args.logit_std <= 0:
        p.error("--shift and --logit-std must be > 0")
    if not (args.digits_sd / "model_index.json").is_file():
        p.error(f"--digits-sd {args.digits_sd} is not a pipeline folder (no model_index.json)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffdistill.loading import quiet_loading
    from diffdistill.teachers.sd3 import SD3Teacher

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t_start = time.time()
    src = str(args.digits_sd)
    with quiet_loading():
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae").eval().requires_grad_(False)
        clip = CLIPTextModel.from_pretrained(src, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
    images, labels = load_digits_32()
    with torch.no_grad():
        post = vae.encode(images).latent_dist
        latents_mean, latents_std = post.mean, post.std
    # SD3's VAE convention: latents = (z - shift_factor) * scaling_factor, zero-mean and unit-variance here.
    shift_factor = round(float(latents_mean.mean()), 4)
    scaling = round(float(1.0 / (latents_mean - shift_factor).flatten().std()), 4)
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling)
    log(f"latents: shift_factor {shift_factor}, scaling_factor {scaling}")

    torch.manual_seed(args.seed)
    transformer = SD3Transformer2DModel(**TRANSFORMER)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=args.shift), vae=vae,
        text_encoder=clip_with_projection(clip), tokenizer=tokenizer, text_encoder_2=clip_with_projection(clip),
        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    teacher = SD3Teacher(pipe=pipe, schedule=SD3Teacher.flow_schedule(pipe), prediction_type="flow",
                         source="(training)")
    n_params = sum(q.numel() for q in transformer.parameters())
    log(f"transformer: {n_params / 1e6:.2f} M parameters")
    t_train = time.time()
    train(teacher, latents_mean, latents_std, labels, args, log)
    minutes = (time.time() - t_train) / 60

    save_digits_pipeline(pipe, args.output, {
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "ema_decay": args.ema_decay, "uncond_prob": args.uncond_prob, "shift": args.shift,
        "logit_mean": args.logit_mean, "logit_std": args.logit_std, "transformer_parameters": n_params,
        "vae_shift_factor": shift_factor, "vae_scaling_factor": scaling, "train_minutes": round(minutes, 2),
    }, t_start, log)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
