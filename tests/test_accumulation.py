"""Gradient accumulation is right for every method: k micro-batches of size b give the update of one batch of
k*b, phase by phase, repeated phases included (DMD's extra fake-score update).

Randomness is the one thing that differs between the two ways of cutting a batch: a method draws its noise,
timesteps and guidance scales per call, so b rows drawn twice are not the 2b rows drawn once. The test gives
every row its own random numbers instead, keyed by the row's content and the draw's place in the loss, so
both ways see the same noise for the same image; everything else is the trainer's real loop.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from diffdistill.config import build_run_config
from diffdistill.data import build_dataset
from diffdistill.methods import get_method
from diffdistill.teachers import load_teacher
from diffdistill.trainer import Trainer

CASES = {
    "lcm": {"method": "lcm", "num_ddim_timesteps": 10, "w_min": 1.0, "w_max": 2.0},
    "lcm_lora": {"method": "lcm", "num_ddim_timesteps": 10, "lora_rank": 4, "ema_decay": 0.0},
    "add": {"method": "add", "r1_weight": 0.01},
    "dmd": {"method": "dmd", "steps": 1, "fake_updates": 2, "gan_weight": 0.1},
    "sds": {"method": "sds", "steps": 1},
    "progressive": {"method": "progressive", "start_steps": 8, "guidance_iters": 1, "iters_per_stage": 1},
    "kd": {"method": "kd", "student_width": 0.5},
    "tiny_decoder": {"method": "tiny-decoder", "vae_channels": 16, "vae_blocks": 1, "decoder_feature_weight": 0.5,
                     "learning_rate": 4e-3},  # a larger step, so that half the data (the control) shows
}


REAL_RANDOM = {name: getattr(torch, name) for name in ("randn", "rand", "randint")}  # before any patch


class RowKeyedRandom:
    """Stand-ins for torch's random functions that draw each batch row from its own generator, seeded by the
    row's key and the draw's index within the current loss call; draws of another leading size get the draw
    index alone. A loss on rows [a, b] then sees the same numbers for a and b as one on [a, b, c, d]."""

    def __init__(self, monkeypatch):
        self.keys: list[int] = []
        self.calls = 0
        real = REAL_RANDOM

        def draw(kind, shape, dtype, device, low=0, high=None):
            shape = tuple(int(n) for n in shape)
            self.calls += 1

            def one(seed, size):
                g = torch.Generator().manual_seed(seed)
                if kind == "randint":
                    return real["randint"](low, high, size, generator=g)
                return real[kind](size, generator=g, dtype=dtype or torch.float32)

            if self.keys and shape and shape[0] == len(self.keys):
                out = torch.stack([one(hash((self.calls, k)) % 2**62, shape[1:]) for k in self.keys])
            else:
                out = one(self.calls, shape)
            return out.to(device=device or "cpu", dtype=dtype or out.dtype)

        def shape_of(size):
            return tuple(size[0]) if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size) else size

        monkeypatch.setattr(torch, "randn", lambda *size, generator=None, device=None, dtype=None, **_:
                            draw("randn", shape_of(size), dtype, device))
        monkeypatch.setattr(torch, "rand", lambda *size, generator=None, device=None, dtype=None, **_:
                            draw("rand", shape_of(size), dtype, device))
        monkeypatch.setattr(torch, "randn_like", lambda x, **_: draw("randn", x.shape, x.dtype, x.device))
        monkeypatch.setattr(torch, "rand_like", lambda x, **_: draw("rand", x.shape, x.dtype, x.device))

        def randint(*args, generator=None, device=None, dtype=None, **_):
            low, high, size = (0, *args) if len(args) == 2 else args
            return draw("randint", size, dtype or torch.int64, device, low, high)

        monkeypatch.setattr(torch, "randint", randint)

    def wrap(self, loss):
        def keyed(phase, batch, step):
            pixels = batch["pixel_values"]
            self.keys = [int.from_bytes(hashlib.sha256(p.numpy().tobytes() + q.encode()).digest()[:7], "little")
                         for p, q in zip(pixels, batch["prompt"])]
            self.calls = 0
            return loss(phase, batch, step)
        return keyed


def _train(tiny_sd, out, case, batch_size, accumulation, monkeypatch):
    args = {k: v for k, v in CASES[case].items() if k != "method"}
    run = build_run_config({}, {"teacher": tiny_sd, "output": str(out), "max_train_steps": 2, "batch_size": batch_size,
                                "gradient_accumulation_steps": accumulation, "checkpointing_steps": 0,
                                "validation_steps": 0, "lr_warmup_steps": 0, "learning_rate": 1e-3,
                                "adam_epsilon": 1e-2,
                                "steps": args.pop("steps", 2), **args})
    spec = get_method(CASES[case]["method"])
    method = spec.method_cls(spec.config_cls(**run.method_args), run)
    out.mkdir(parents=True)
    trainer = Trainer(run, method, load_teacher(tiny_sd), out, build_dataset(run.data, 32), run_id="acc")
    rng = RowKeyedRandom(monkeypatch)
    method.loss = rng.wrap(method.loss)
    trainer.fit()
    return {name: {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(m).state_dict().items()}
            for name, m in method.state_modules().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_k_micro_batches_give_the_update_of_one_batch(case, tiny_sd, tmp_path, monkeypatch):
    whole = _train(tiny_sd, tmp_path / "whole", case, 4, 1, monkeypatch)
    split = _train(tiny_sd, tmp_path / "split", case, 2, 2, monkeypatch)
    half = _train(tiny_sd, tmp_path / "half", case, 2, 1, monkeypatch)  # half the data per step
    # AdamW's first steps are ~lr * g / (|g| + eps): with the default eps a gradient component within float
    # rounding of zero would flip sign between the two cuts and move its weight by ~lr. eps = 1e-2 keeps the
    # update Lipschitz in the gradient (constant lr / eps = 0.1), so the two cuts, whose gradients differ by
    # float32 summation order (~1e-6 of the largest component), end within ~1e-7 of each other; half the data
    # per step (the control) moves weights by orders of magnitude more.
    diff = max((whole[n][k].float() - split[n][k].float()).abs().max().item() for n in whole for k in whole[n])
    control = max((whole[n][k].float() - half[n][k].float()).abs().max().item() for n in whole for k in whole[n])
    assert diff < 1e-6, (case, diff, control)
    assert control > 1e-4, (case, diff, control)  # the test can tell a wrong update apart
