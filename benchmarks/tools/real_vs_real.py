#!/usr/bin/env python
"""FID/IS/KID of real digits against real digits: the floor that generated samples are judged against.

    python benchmarks/tools/real_vs_real.py   # writes benchmarks/real_vs_real.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffdistill.digits import digits_uint8, load_digits_32  # noqa: E402
from diffdistill.eval.fidelity import compute_metrics  # noqa: E402


def main() -> int:
    images, _ = load_digits_32()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    half = len(images) // 2
    rows = {
        "1000 real (subset) vs all 1797 real": compute_metrics(digits_uint8(images[perm[:1000]]), "digits"),
        f"{half} real vs the other {half} real (disjoint)": compute_metrics(
            digits_uint8(images[perm[:half]]), digits_uint8(images[perm[half: 2 * half]]), kid_subset_size=half),
    }
    out = Path(__file__).resolve().parents[1] / "real_vs_real.json"
    out.write_text(json.dumps({k: {m: round(v, 4) for m, v in r.items()} for k, r in rows.items()}, indent=2) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
