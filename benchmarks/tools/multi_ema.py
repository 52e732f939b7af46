"""Run ``diffdistill distill`` while keeping extra student EMAs and saving snapshots, so one run answers
"which EMA decay, and how many iterations" without a run per choice.

    SNAP_DIR=runs/x/snaps EXTRA_EMA=0.99,0.995 SNAP_AT=800,1000,1200 \
        python benchmarks/tools/multi_ema.py distill --config train_scripts/digits/add.yaml --output runs/x

At each step of SNAP_AT it writes ``{decay}_{step}``, ``main_{step}`` (the run's own EMA) and ``raw_{step}``
(the trained weights) as safetensors in the trainer's EMA checkpoint layout; ``export_snapshot.sh`` turns one
into a pipeline. The extra EMAs use diffusers' warm-up, min(decay, n / (n + 9)) at step n, like the run's own.
"""
import os
import sys
from pathlib import Path

import diffusers.training_utils as training_utils
import torch

from diffdistill.checkpoint import save_ema_weights

DECAYS = [float(d) for d in os.environ.get("EXTRA_EMA", "0.99,0.995,0.997,0.998").split(",") if d]
SAVE_AT = {int(s) for s in os.environ.get("SNAP_AT", "800,1000,1200").split(",") if s}
OUT = Path(os.environ["SNAP_DIR"])


class MultiEMA(training_utils.EMAModel):
    def __init__(self, parameters, *args, **kwargs):
        parameters = list(parameters)
        super().__init__(parameters, *args, **kwargs)
        self.extra = {d: [p.detach().clone() for p in parameters] for d in DECAYS}

    @torch.no_grad()
    def step(self, parameters):
        parameters = list(parameters)
        super().step(parameters)
        n = self.optimization_step
        for decay, shadow in self.extra.items():
            d = min(decay, n / (n + 9))  # diffusers: step = n - 1, (1 + step) / (10 + step)
            for s, p in zip(shadow, parameters):
                s.mul_(d).add_(p.detach(), alpha=1 - d)
        if n in SAVE_AT:
            OUT.mkdir(parents=True, exist_ok=True)
            for decay, shadow in self.extra.items():
                save_ema_weights(shadow, OUT / f"{decay}_{n}.safetensors")
            save_ema_weights(self.shadow_params, OUT / f"main_{n}.safetensors")
            save_ema_weights(parameters, OUT / f"raw_{n}.safetensors")


training_utils.EMAModel = MultiEMA
from diffdistill.cli import main  # noqa: E402 - after the patch

sys.exit(main(sys.argv[1:]))
