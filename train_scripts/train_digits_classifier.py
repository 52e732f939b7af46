#!/usr/bin/env python
"""Train the digits classifier that judges digits-SD samples (FID/IS/KID features, prompt accuracy).

A small CNN (``diffdistill.eval.digits_classifier.DigitsClassifier``) on scikit-learn's 1,797 8x8 digits,
with a stratified, seeded validation split held out. Augmentation: random shifts of up to one pixel,
small Gaussian pixel noise and a mild contrast jitter, so slightly imperfect generated digits are still
read correctly. Weights are saved as safetensors with a config.json and a README.md.

    python train_scripts/train_digits_classifier.py --output assets/digits-classifier

Deterministic for a given --seed and --threads (one thread by default); about 20 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffdistill.digits import load_digits_8x8  # noqa: E402
from diffdistill.eval.digits_classifier import DigitsClassifier, save_digits_classifier  # noqa: E402


def stratified_split(labels: torch.Tensor, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): the same fraction of every class goes to validation."""
    train, val = [], []
    for k in labels.unique().tolist():
        idx = (labels == k).nonzero()[:, 0]
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n_val = round(idx.numel() * val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def augment(x: torch.Tensor, generator: torch.Generator, noise_std: float) -> torch.Tensor:
    """(B, 8, 8) in [0, 1] -> shifted by -1..1 px (zero fill), contrast-jittered, noised, clamped to [0, 1]."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))  # (B, 10, 10)
    dy = torch.randint(0, 3, (b,), generator=generator)
    dx = torch.randint(0, 3, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, :, None]  # (B, 8, 1)
    cols = (dx[:, None] + torch.arange(8))[:, None, :]  # (B, 1, 8)
    shifted = padded[torch.arange(b)[:, None, None], rows, cols]  # (B, 8, 8)
    contrast = 0.8 + 0.4 * torch.rand(b, 1, 1, generator=generator)
    noisy = shifted * contrast + noise_std * torch.randn(shifted.shape, generator=generator)
    return noisy.clamp(0.0, 1.0)


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` (N, 8, 8) whose predicted label equals ``labels``."""
    return (model.predict(images) == labels).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("assets/digits-classifier"),
                   help="folder to write model.safetensors, config.json, README.md (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, init and batches (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=40, help="passes over the training split (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate, cosine decay (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction per class (default: %(default)s)")
    p.add_argument("--noise-std", type=float, default=0.05, help="Gaussian pixel noise in augmentation (default: %(default)s)")
    p.add_argument("--channels", type=int, nargs=2, default=[16, 32], metavar=("C1", "C2"),
                   help="conv widths; small so scoring thousands of images stays cheap (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; fixed so results do not depend on the core count (default: %(default)s)")
    args = p.parse_args(argv)
    if args.epochs <= 0 or args.batch_size <= 0:
        p.error("--epochs and --batch-size must be > 0")
    if not 0.0 < args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    t0 = time.time()
    images, labels = load_digits_8x8()  # (N, 8, 8) in [0, 1], (N,)
    g = torch.Generator().manual_seed(args.seed)
    train_idx, val_idx = stratified_split(labels, args.val_fraction, g)
    x_train, y_train = images[train_idx], labels[train_idx]
    x_val, y_val = images[val_idx], labels[val_idx]

    torch.manual_seed(args.seed)
    model = DigitsClassifier(channels=(args.channels[0], args.channels[1]))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = -(-x_train.shape[0] // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.1)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(x_train.shape[0], generator=g)
        total = 0.0
        for i in range(0, order.numel(), args.batch_size):
            idx = order[i:i + args.batch_size]
            x = augment(x_train[idx], g, args.noise_std)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.numel()
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1}/{args.epochs} loss {total / x_train.shape[0]:.4f} "
                  f"val acc {accuracy(model, x_val, y_val):.4f}", flush=True)

    model.eval()
    val_acc = accuracy(model, x_val, y_val)
    train_acc = accuracy(model, x_train, y_train)
    info = {
        "seed": args.seed, "channels": list(args.channels), "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "val_fraction": args.val_fraction, "noise_std": args.noise_std, "threads": args.threads,
        "num_train": int(x_train.shape[0]), "num_val": int(x_val.shape[0]),
        "val_accuracy": round(val_acc, 4), "train_accuracy": round(train_acc, 4),
        "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
    }
    save_digits_classifier(model, args.output, extra={"training": info})
    (args.output / "README.md").write_text(readme_text(info))
    print(f"validation accuracy {val_acc:.4f} on {x_val.shape[0]} held-out digits "
          f"(train {train_acc:.4f}); saved {args.output} in {info['train_seconds']} s")
    return 0


def readme_text(info: dict) -> str:
    """The README.md written next to the weights."""
    return f"""# digits-classifier

A small CNN (`diffdistill.eval.digits_classifier.DigitsClassifier`: three 3x3 convolutions with
{info['channels'][0]}/{info['channels'][1]}/{info['channels'][1]} channels, two 2x2 max-pools, a 64-d feature layer, a 10-way head) that reads 8x8 grey digits. Any input
(N, 3, H, W) in [0, 1] is averaged to grey and pooled to 8x8 first, so it judges 32x32 digits-SD samples.

It is the feature extractor `digits-classifier` for FID/KID (64-d features) and IS (unbiased logits) in
`diffdistill.eval.fidelity`, and the judge of prompt accuracy in `diffdistill bench`.

## How it was trained

    python train_scripts/train_digits_classifier.py --output assets/digits-classifier --seed {info['seed']} \\
        --channels {info['channels'][0]} {info['channels'][1]}

scikit-learn's 1,797 digits, stratified split: {info['num_train']} train / {info['num_val']} validation
(seed {info['seed']}). {info['epochs']} epochs, batch {info['batch_size']}, AdamW with a one-cycle schedule
(peak lr {info['lr']}), label smoothing 0.05, dropout 0.2. Augmentation: random shifts of -1..1 pixel,
contrast x0.8..1.2, Gaussian pixel noise (std {info['noise_std']}). {info['threads']} CPU thread(s),
deterministic algorithms; {info['train_seconds']} s, torch {info['torch']}.

## Accuracy

- validation (held out): **{info['val_accuracy']:.4f}**
- training split: {info['train_accuracy']:.4f}

Files: `model.safetensors` (weights), `config.json` (architecture + this training record). No pickles.
"""


if __name__ == "__main__":
    sys.exit(main())
