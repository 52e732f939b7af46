"""The one grid writer (diffdistill/images.py) and the memory readers (diffdistill/memory.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from diffdistill.images import save_grid
from diffdistill.memory import peak_memory_mb


def test_float_grid_equals_torchvision_save_image(tmp_path):
    from torchvision.utils import save_image

    x = torch.rand(7, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1  # some out of [0, 1]
    save_image(x, str(tmp_path / "tv.png"), nrow=3, padding=2, pad_value=1.0)
    save_grid(x, tmp_path / "ours.png", 3, pad_value=255)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "tv.png")), np.asarray(Image.open(tmp_path / "ours.png")))


def test_small_cells_are_blown_up_and_rows_capped(tmp_path):
    x = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    save_grid(x, tmp_path / "g.png", 10, max_rows=2, min_cell=64)
    img = np.asarray(Image.open(tmp_path / "g.png"))
    assert img.shape == (2 + 2 * (64 + 2), 2 + 10 * (64 + 2), 3)  # 2 rows of 10 cells, 2x nearest upscale
    assert np.array_equal(img[2:4, 2:4], np.broadcast_to(x[0, :, 0, 0].numpy(), (2, 2, 3)))  # a pixel became 2x2


def test_peak_memory_sees_an_allocation():
    mb, kind = peak_memory_mb(torch.device("cpu"))
    assert kind == "cpu_peak_rss" and mb > 10
    # In a fresh process: in this one, memory freed by earlier tests stays resident and the allocator may serve
    # the block from it, so the resident set need not grow at all.
    code = ("import torch\nfrom diffdistill.memory import PeakMemory\n"
            "with PeakMemory(torch.device('cpu')) as mem:\n"
            "    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched\n"
            "    block += 1\n"
            "print(mem.peak - mem.baseline)\n")
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown > 32 * 2**20
