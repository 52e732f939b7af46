"""One tolerance for float32 results whose two sides sum in a different order.

A batched pass against separate passes, a fused LoRA against an unfused one, 1 thread against 2, AVX2 against
AVX-512 kernels: the same float32 quantity, reduced in another order, differs by rounding. That rounding scales
with the magnitude of the terms summed, not with the result: eps_c - eps_u of two O(1) outputs carries O(1e-7)
absolute error however small the difference is. So the comparison is absolute, at a fraction of the scale of
the inputs (``scale``; by default the largest |expected|), never elementwise-relative (which fails on values
near zero) and never a fixed atol (which is too tight for large values and meaningless for small ones).

REORDER_REL = 5e-5: float32's epsilon is 1.2e-7, and a re-ordered sum of K terms errs by about sqrt(K) eps of
their magnitude; the tiny UNets chain a dozen such sums (3x3 convolutions over up to 128 channels, attention
over 64 tokens). Measured with every comparison that uses it, at 1 and 2 threads: at most 1.1e-6 of the scale
on AMD EPYC (AVX2, torch 2.14) and on Intel Xeon (AVX-512, torch 2.11) alike (the fused LoRA and the DMD
gradient; the SDS gradient, which had missed a fixed atol of 1e-5 on AMD with 1 thread, 6e-7). 5e-5 leaves
45x for other kernels, while a wrong sign, weight, guidance scale or missing term is off by 1e-2 of the scale
or more (the SDS test asserts that w = 3 against w = 2 would be).
"""

from __future__ import annotations

import torch

REORDER_REL = 5e-5


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, scale: float | torch.Tensor | None = None,
                          rel: float = REORDER_REL) -> None:
    """|actual - expected| <= rel * scale everywhere (``scale``: the magnitude of the terms that were summed;
    default max |expected|)."""
    scale = float(expected.abs().max() if scale is None else scale)
    assert scale > 0, "a zero scale would compare at tolerance 0: pass the magnitude of the summed terms"
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale)
