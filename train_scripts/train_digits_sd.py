#!/usr/bin/env python
"""Train digits-SD: a real (tiny) Stable Diffusion pipeline on scikit-learn's handwritten digits.

It is the project's stand-in for Stable Diffusion 1.5 where no SD weights can be downloaded:
a tiny AutoencoderKL (32x32 RGB <-> 4x8x8 latents), a frozen tiny CLIP text encoder with a
tokenizer built from a 13-word vocabulary, and an epsilon-prediction UNet2DConditionModel with
SD's scaled_linear betas, trained with 10% empty-prompt dropout so classifier-free guidance works.
The result is saved with ``StableDiffusionPipeline.save_pretrained`` (safetensors).

    python train_scripts/train_digits_sd.py --output assets/digits-sd

Deterministic for a given --seed on CPU; the defaults take about half an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffdistill.digits import DIGIT_PROMPTS, DIGITS_MARKER, load_digits_32  # noqa: E402
from diffdistill.loading import quiet_loading  # noqa: E402
from diffdistill.tiny_pipelines import (  # noqa: E402
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int, log) -> None:
    """Reconstruction training: L1 + MSE with a tiny KL term (as SD's VAE, minus the GAN)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.05)
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.4f} kl {kl.item():.1f}")
    vae.eval()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """(P, L, 32) text embeddings exactly as StableDiffusionPipeline computes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def optimizer_schedule_ema(net, lr: float, steps: int, ema_decay: float):
    """AdamW (weight decay 0.01), linear warm-up over min(200, steps / 10) steps then cosine decay to 10% of
    ``lr``, and an EMA of ``net`` (with EMA warm-up): the digits teachers' optimisation (digits-SD, digits-flow)."""
    from diffusers.training_utils import EMAModel

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    warmup = min(200, max(steps // 10, 1))

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    return opt, sched, EMAModel(net.parameters(), decay=ema_decay, use_ema_warmup=True, power=0.75)


def apply_update(loss, net, opt, sched, ema) -> None:
    """One optimisation step of a digits teacher: gradients of ``loss``, clipped to norm 1, the optimiser and LR
    schedule stepped, the EMA updated."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    sched.step()
    ema.step(net.parameters())


def train_unet(unet, latents_mean, latents_std, scaling, labels, text_emb, uncond_emb, scheduler, args, log):
    """Epsilon-prediction denoising training with 10% empty-prompt dropout and an EMA copy."""
    g = torch.Generator().manual_seed(args.seed + 1)
    opt, sched, ema = optimizer_schedule_ema(unet, args.unet_lr, args.unet_steps, args.ema_decay)
    alphas_cumprod = scheduler.alphas_cumprod
    unet.train()
    t0 = time.time()
    for step in range(args.unet_steps):
        idx = torch.randint(0, labels.shape[0], (args.batch_size,), generator=g)
        z0 = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=g)
        z0 = z0 * scaling  # SD trains on VAE latents times scaling_factor
        cond = text_emb[labels[idx]]
        drop = torch.rand(args.batch_size, generator=g) < args.uncond_prob
        cond = torch.where(drop[:, None, None], uncond_emb.expand_as(cond), cond)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = alphas_cumprod[t].sqrt()[:, None, None, None]
        s = (1 - alphas_cumprod[t]).sqrt()[:, None, None, None]
        zt = a * z0 + s * noise
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        apply_update(loss, unet, opt, sched, ema)
        if step % 100 == 0 or step == args.unet_steps - 1:
            rate = (step + 1) / (time.time() - t0)
            log(f"unet step {step + 1}/{args.unet_steps} loss {loss.item():.4f} ({rate:.2f} it/s)")
    ema.copy_to(unet.parameters())
    unet.eval()


def save_digits_pipeline(pipe, output: Path, info: dict, t_start: float, log) -> None:
    """Save a digits teacher: the pipeline (safetensors), training_info.json (``info`` plus total minutes, threads
    and torch version) and the digits marker (bench's digits defaults apply; the recommended guidance is measured
    afterwards and added by hand)."""
    output.mkdir(parents=True, exist_ok=True)
    with quiet_loading():
        pipe.save_pretrained(output, safe_serialization=True)
    info = {**info, "total_minutes": round((time.time() - t_start) / 60, 2),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    (output / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (output / "diffdistill.json").write_text(json.dumps(DIGITS_MARKER, indent=2) + "\n")
    log(f"saved {output} ({info['total_minutes']} min total)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("assets/digits-sd"), help="pipeline folder to write (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: %(default)s)")
    p.add_argument("--vae-steps", type=int, default=1000, help="VAE training steps (default: %(default)s)")
    p.add_argument("--vae-batch-size", type=int, default=64, help="VAE batch size (default: %(default)s)")
    p.add_argument("--vae-lr", type=float, default=1e-3, help="VAE learning rate (default: %(default)s)")
    p.add_argument("--unet-steps", type=int, default=3000, help="UNet training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="UNet batch size (default: %(default)s)")
    p.add_argument("--unet-lr", type=float, default=5e-4, help="UNet peak learning rate (default: %(default)s)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="UNet EMA decay (default: %(default)s)")
    p.add_argument("--uncond-prob", type=float, default=0.1, help="empty-prompt dropout for CFG (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch default (default: %(default)s)")
    args = p.parse_args(argv)
    for name in ("vae_steps", "unet_steps", "batch_size", "vae_batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0.0 <= args.uncond_prob < 1.0:
        p.error(f"--uncond-prob must be in [0, 1), got {args.uncond_prob}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import StableDiffusionPipeline

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    torch.manual_seed(args.seed)
    t_start = time.time()
    images, labels = load_digits_32()  # (N, 3, 32, 32) in [-1, 1]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp) / "tok")
        text_encoder = build_text_encoder(tokenizer, args.seed)

    torch.manual_seed(args.seed)
    vae = build_vae()
    t_vae = time.time()
    train_vae(vae, images, args.vae_steps, args.vae_batch_size, args.vae_lr, args.seed, log)
    vae_minutes = (time.time() - t_vae) / 60
    with torch.no_grad():
        post = vae.encode(images).latent_dist
        latents_mean, latents_std = post.mean, post.std
        rec = vae.decode(latents_mean).sample
        rec_mse = F.mse_loss(rec, images).item()
    scaling = float(1.0 / latents_mean.flatten().std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"vae done in {vae_minutes:.1f} min: reconstruction MSE {rec_mse:.5f}, scaling_factor {scaling:.4f}")

    text_emb = encode_prompts(tokenizer, text_encoder, DIGIT_PROMPTS)  # (10, L, 32)
    uncond_emb = encode_prompts(tokenizer, text_encoder, [""])  # (1, L, 32)

    torch.manual_seed(args.seed + 2)
    unet = build_unet()
    scheduler = build_scheduler()
    t_unet = time.time()
    train_unet(unet, latents_mean, latents_std, scaling, labels, text_emb, uncond_emb, scheduler, args, log)
    unet_minutes = (time.time() - t_unet) / 60

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    save_digits_pipeline(pipe, args.output, {
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "vae_batch_size": args.vae_batch_size,
        "unet_steps": args.unet_steps,
        "unet_batch_size": args.batch_size,
        "unet_lr": args.unet_lr,
        "ema_decay": args.ema_decay,
        "uncond_prob": args.uncond_prob,
        "vae_reconstruction_mse": rec_mse,
        "vae_scaling_factor": scaling,
        "vae_minutes": round(vae_minutes, 2),
        "unet_minutes": round(unet_minutes, 2),
    }, t_start, log)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
