"""Image grids: the one PNG writer behind validation grids, `diffdistill sds` results and bench sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) floats in [0, 1] -> uint8 with torchvision's rounding (x * 255 + 0.5, clamped); uint8 as is."""
    if images.dtype == torch.uint8:
        return images.cpu()
    return images.detach().float().cpu().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, columns: int, pad_value: int = 128, max_rows: int | None = None,
              min_cell: int = 0, max_cell: int | None = None) -> None:
    """Save (N, 3, H, W) images (floats in [0, 1] or uint8) as one PNG grid of ``columns`` columns.

    ``max_rows`` keeps the first rows only; cells smaller than ``min_cell`` pixels are blown up by nearest
    neighbour (crisp 32x32 digits), larger than ``max_cell`` shrunk with antialiasing (a 10x10 grid of 512x512
    samples stays a few MB). Padding is 2 pixels of ``pad_value`` (0..255)."""
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.utils import make_grid

    columns = max(1, columns)
    x = to_uint8(images)
    if max_rows is not None:
        x = x[: columns * max_rows]
    size = x.shape[-1]
    if min_cell and size < min_cell:
        x = F.interpolate(x.float(), scale_factor=math.ceil(min_cell / size), mode="nearest").round().to(torch.uint8)
    elif max_cell is not None and size > max_cell:
        x = F.interpolate(x.float(), scale_factor=max_cell / size, mode="bilinear", antialias=True)
        x = x.round().clamp(0, 255).to(torch.uint8)
    grid = make_grid(x, nrow=columns, padding=2, pad_value=pad_value)  # (3, H', W') uint8
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
