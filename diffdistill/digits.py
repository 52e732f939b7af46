"""The built-in handwritten-digits data set (scikit-learn's ``load_digits``) used by digits-SD.

Each 8x8 digit (grey levels 0..16) is upscaled 4x by nearest neighbour to 32x32 and copied into
three channels, so 4x4 average pooling of a perfect 32x32 sample gives back the 8x8 digit exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CAPTION_TEMPLATE = "a handwritten digit {}"
DIGIT_PROMPTS = [CAPTION_TEMPLATE.format(k) for k in range(10)]
IMAGE_SIZE = 32
UPSCALE = 4
# A pipeline folder's diffdistill.json with "dataset": "digits" marks a digits pipeline (digits-SD, its students,
# the tiny test pipelines): bench scores those, and only those, against the real digits by default.
DATASET_KEY, DIGITS_DATASET = "dataset", "digits"
DIGITS_MARKER = {DATASET_KEY: DIGITS_DATASET}


def digit_caption(label: int) -> str:
    """Return the caption digits-SD was trained with for ``label`` (0..9)."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"digit label must be in 0..9, got {label}")
    return CAPTION_TEMPLATE.format(int(label))


def caption_to_label(prompt: str) -> int | None:
    """Return K for a prompt ``a handwritten digit K``, else None."""
    prompt = prompt.strip()
    prefix = CAPTION_TEMPLATE.format("")
    if prompt.startswith(prefix) and prompt[len(prefix):].isdigit():
        k = int(prompt[len(prefix):])
        return k if 0 <= k <= 9 else None
    return None


def load_digits_8x8() -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images (N, 8, 8) float in [0, 1], labels (N,) long) for all 1,797 digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0)  # (N, 8, 8)
    labels = torch.from_numpy(d.target.astype(np.int64))
    return images, labels


def upscale_digits(images_8x8: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) in [0, 1] -> (N, 3, 32, 32) in [-1, 1], nearest upscaling, grey in 3 channels."""
    x = images_8x8[:, None]  # (N, 1, 8, 8)
    x = F.interpolate(x, scale_factor=UPSCALE, mode="nearest")  # (N, 1, 32, 32)
    return (x * 2.0 - 1.0).repeat(1, 3, 1, 1)


def downscale_to_8x8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, 8, 8) grey in [0, 1] by channel mean and average pooling."""
    grey = images.float().mean(dim=1, keepdim=True)
    if grey.shape[-1] != 8 or grey.shape[-2] != 8:
        grey = F.adaptive_avg_pool2d(grey, (8, 8))
    return grey[:, 0]


def load_digits_32() -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images (N, 3, 32, 32) in [-1, 1], labels (N,)) for the whole digits set."""
    images, labels = load_digits_8x8()
    return upscale_digits(images), labels


def digits_uint8(images_minus1_1: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, 3, H, W), the form torch-fidelity reads."""
    x = ((images_minus1_1.clamp(-1, 1) + 1.0) * 127.5).round()
    return x.to(torch.uint8)
