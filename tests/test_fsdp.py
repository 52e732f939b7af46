"""FSDP2 for real: two CPU processes (gloo) under ``accelerate launch --use_fsdp``, for lcm and dmd.

Each test starts one launch (``fsdp_worker.py``) that runs an uninterrupted run and then resumes a copy of it cut
back to its half-way checkpoint, then checks: the checkpoints are sharded (every rank's own shard of every weight, optimiser moment
and EMA), the resumed run's final checkpoint equals the uninterrupted run's bit for bit (same shards, same
reduction order: gloo's sums are deterministic), and the export holds exactly the full weights gathered from
the shards and loads with plain ``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tolerance import assert_close_at_scale

WORKER = Path(__file__).with_name("fsdp_worker.py")
TINY = ["--batch-size", "2", "--checkpointing-steps", "2", "--checkpoints-total-limit", "0", "--validation-steps", "0",
        "--benchmark-samples", "0", "--lr-warmup-steps", "0", "--learning-rate", "1e-3", "--log-every", "1"]


def _launch(teacher: str, root: Path, port: int, *method_args: str, ddp_too: bool = False) -> str:
    """The runs of ``fsdp_worker.py`` on 2 gloo processes; ``accelerate launch --use_fsdp`` (accelerate itself
    falls back to DDP on CPU: diffdistill's own FSDP2 path is what the flag selects, as on GPUs)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), str(WORKER), teacher, str(root), "4", "--ddp-too" if ddp_too else "--",
           *method_args, *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout + r.stderr


def _gathered(ckpt: Path, stem: str) -> dict[str, torch.Tensor]:
    """The full tensors of a sharded checkpoint group, put together here from the two ranks' files."""
    index = json.loads((ckpt / f"{stem}.index.json").read_text())
    parts = [load_file(str(ckpt / f"{stem}.rank{r}.safetensors")) for r in (0, 1)]
    out = {}
    for key, info in index.items():
        d = info["shard_dim"]
        out[key] = parts[0][key] if d is None else torch.cat([p[key] for p in parts], d)
        assert list(out[key].shape) == info["shape"], key
    return out


def _check_sharded(ckpt: Path, modules: list[str]) -> None:
    """Every module is held as two ranks' shards: each rank has half of the rows of a sharded weight."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert {n: m["shards"] for n, m in state["modules"].items()} == dict.fromkeys(modules, 2)
    assert not list(ckpt.glob("model_*[!0-9].safetensors")) and not list(ckpt.glob("optimizer_*[!0-9].pt"))
    for name in modules:
        index = json.loads((ckpt / f"model_{name}.index.json").read_text())
        r0, r1 = (load_file(str(ckpt / f"model_{name}.rank{r}.safetensors")) for r in (0, 1))
        sharded = [k for k, v in index.items() if v["shard_dim"] == 0]
        assert len(sharded) > 0.9 * len(index)  # every parameter; buffers (none in a UNet) would be whole
        for k in sharded:
            rows = index[k]["shape"][0]
            assert (r0[k].shape[0], r1[k].shape[0]) == ((rows + 1) // 2, rows // 2), k


def _check_resume_exact(root: Path, output: str) -> None:
    """The resumed run started at step 2 (it did not train anew) and its checkpoint-4 equals the uninterrupted run's: every shard file of weights, EMA,
    optimiser moments and method state, tensor for tensor, bit for bit; the LR schedules too."""
    assert f"resumed from {root / 'res' / 'checkpoints' / 'checkpoint-2'} at step 2" in output
    ref, res = root / "ref" / "checkpoints" / "checkpoint-4", root / "res" / "checkpoints" / "checkpoint-4"
    names = sorted(p.name for p in ref.iterdir() if p.name != "trainer_state.json" and not p.name.startswith("rng"))
    assert names == sorted(p.name for p in res.iterdir() if p.name != "trainer_state.json"
                           and not p.name.startswith("rng"))
    for name in names:
        if name.endswith(".safetensors"):
            a, b = load_file(str(ref / name)), load_file(str(res / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        elif name.endswith(".pt"):
            a, b = (torch.load(d / name, weights_only=True)["state"] for d in (ref, res))
            assert a.keys() == b.keys(), name
            for i in a:
                assert all(torch.equal(a[i][k], b[i][k]) for k in ("step", "exp_avg", "exp_avg_sq")), (name, i)
        else:
            assert json.loads((ref / name).read_text()) == json.loads((res / name).read_text()), name
    resumed = json.loads((root / "res" / "summary.json").read_text())
    assert resumed["train_steps"] == 4 and (root / "res" / "pipeline" / "model_index.json").is_file()
    assert [int(r["step"]) for r in csv.DictReader((root / "res" / "logs.csv").open())] == [1, 2, 3, 4]
    assert resumed["rank_weight_sha256"] == json.loads((root / "ref" / "summary.json").read_text())["rank_weight_sha256"]


def _check_trains_like_ddp(root: Path, teacher: str) -> None:
    """The FSDP run trains as the same run under DDP does: the same first loss (same weights, same batch), and
    after 4 steps the same weight updates up to rounding: a relative difference of 2e-5 in norm was measured
    (FSDP2 divides gradients by sqrt(2) before and after its reduction, DDP by 2 once; clipping sums the squared
    norm shard by shard; AdamW magnifies the last bits of near-zero gradients), 1e-3 is allowed, while gradients
    left unsynchronised (each rank its own batch) would differ by O(1)."""
    from diffusers import UNet2DConditionModel

    logs = {r: [float(row["loss"]) for row in csv.DictReader((root / r / "logs.csv").open())] for r in ("ref", "ddp")}
    assert_close_at_scale(torch.tensor(logs["ref"][0]), torch.tensor(logs["ddp"][0]))
    init = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet").state_dict()
    fsdp = _gathered(root / "ref" / "checkpoints" / "checkpoint-4", "model_student")
    ddp = load_file(str(root / "ddp" / "checkpoints" / "checkpoint-4" / "model_student.safetensors"))
    assert fsdp.keys() == ddp.keys()
    keys = [k for k in ddp if k in init]  # the guidance embedding starts at random: not an update from the teacher
    u_fsdp, u_ddp = (torch.cat([(w[k] - init[k]).flatten() for k in keys]) for w in (fsdp, ddp))
    assert u_ddp.norm() > 0 and (u_fsdp - u_ddp).norm() <= 1e-3 * u_ddp.norm()


def _exported_unet(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))


def _loads_and_samples(pipeline: Path, steps: int) -> None:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(pipeline))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a digit 3", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images
    assert image.shape[0] == 1 and torch.isfinite(image).all()


def _student_digest(weights: dict[str, torch.Tensor]) -> str:
    """The trainer's rank digest (``Trainer.rank_checksums``) of full student weights."""
    import hashlib

    digest = hashlib.sha256()
    for k in sorted(weights):
        digest.update(k.encode() + b"\0" + weights[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_fsdp_lcm_two_processes_shard_resume_exactly_and_export_full_weights(tiny_sd, tmp_path):
    """lcm, full UNet with a guidance embedding: the student and its EMA target network sharded; it trains as
    DDP does; the export is the target network (no student EMA), gathered whole, and ``diffdistill export`` of the
    sharded checkpoint (one process, reading every rank's shard) writes the same weights."""
    output = _launch(tiny_sd, tmp_path, 29521, "--method", "lcm", "--num-ddim-timesteps", "10", "--w-min", "1",
                     "--w-max", "2", "--steps", "2", ddp_too=True)
    ckpt = tmp_path / "ref" / "checkpoints" / "checkpoint-4"
    _check_sharded(ckpt, ["student", "target"])
    _check_resume_exact(tmp_path, output)
    _check_trains_like_ddp(tmp_path, tiny_sd)
    target, student = _gathered(ckpt, "model_target"), _gathered(ckpt, "model_student")
    assert not all(torch.equal(target[k], student[k]) for k in target)  # the EMA target lags the student
    exported = _exported_unet(tmp_path / "ref")
    assert exported.keys() == target.keys() and all(torch.equal(exported[k], target[k]) for k in target)
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["rank_weight_sha256"] == [_student_digest(student)] * 2  # both ranks gathered the same
    _loads_and_samples(tmp_path / "ref" / "pipeline", 2)

    from diffdistill.cli import main

    assert main(["export", str(tmp_path / "ref"), "--checkpoint", "latest", "--output", str(tmp_path / "again")]) == 0
    again = load_file(str(tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)


@pytest.mark.slow
def test_fsdp_dmd_two_processes_shard_resume_exactly_and_export_full_weights(tiny_sd, tmp_path):
    """dmd with two fake-score updates per step and a student EMA: generator, fake score network and EMA
    sharded; the export is the student EMA, gathered whole."""
    output = _launch(tiny_sd, tmp_path, 29523, "--method", "dmd", "--steps", "1", "--fake-updates", "2",
                     "--student-ema-decay", "0.9")
    ckpt = tmp_path / "ref" / "checkpoints" / "checkpoint-4"
    _check_sharded(ckpt, ["student", "fake_score"])
    assert (ckpt / "ema.rank0.safetensors").is_file() and (ckpt / "ema.rank1.safetensors").is_file()
    _check_resume_exact(tmp_path, output)
    from diffusers import UNet2DConditionModel

    # The EMA holds the student's trainable weights in parameter order: the teacher's UNet names them.
    names = [n for n, _ in UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").named_parameters()]
    ema = _gathered(ckpt, "ema")
    assert len(ema) == len(names)
    exported = _exported_unet(tmp_path / "ref")
    assert all(torch.equal(exported[n], ema[f"shadow_{i}"]) for i, n in enumerate(names))
    student = _gathered(ckpt, "model_student")
    assert not all(torch.equal(exported[n], student[n]) for n in names)  # the EMA, not the raw student
    _loads_and_samples(tmp_path / "ref" / "pipeline", 1)
    assert (tmp_path / "ref" / "samples" / "final.png").is_file()  # the grid: sampled whole on rank 0

    from diffdistill.cli import main

    # One process, the student EMA put together from both ranks' shards: the same export.
    assert main(["export", str(tmp_path / "ref"), "--checkpoint", "latest", "--output", str(tmp_path / "again")]) == 0
    again = load_file(str(tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)


@pytest.mark.slow
def test_fsdp_lcm_on_a_flux_transformer_shards_resumes_exactly_and_exports(tiny_flux, tmp_path):
    """The case FSDP is for at Flux scale: a full transformer student (Flux-dev style, guidance input, packed
    latents) and its EMA target sharded block by block over two processes; resume is bit-exact; the export is
    the gathered target network and samples in plain diffusers at its step count and the teacher's size."""
    output = _launch(tiny_flux, tmp_path, 29525, "--method", "lcm", "--num-ddim-timesteps", "10", "--w-min", "1",
                     "--w-max", "3", "--steps", "2")
    ckpt = tmp_path / "ref" / "checkpoints" / "checkpoint-4"
    _check_sharded(ckpt, ["student", "target"])
    _check_resume_exact(tmp_path, output)
    target = _gathered(ckpt, "model_target")
    exported = load_file(str(tmp_path / "ref" / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == target.keys() and all(torch.equal(exported[k], target[k]) for k in target)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "ref" / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    info = json.loads((tmp_path / "ref" / "pipeline" / "diffdistill.json").read_text())
    image = pipe("a digit 3", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                 **info["call_kwargs"]).images
    assert type(pipe).__name__ == "FluxPipeline" and image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


@pytest.mark.parametrize("args, message", [
    ({"mixed_precision": "fp16"}, "fp16's loss scaling"),
    ({"torch_compile": True}, "--torch-compile is not supported"),
    ({"sharding": "fsdp1"}, "--sharding must be one of none, fsdp2"),
    ({"method": "lcm", "lora_rank": 4, "ema_decay": 0.0}, "a LoRA student is not supported under FSDP"),
    ({"method": "add"}, "--method add is not supported under FSDP yet"),
    ({"method": "dmd", "steps": 1, "gan_weight": 0.1}, "DMD2's GAN head (--gan-weight > 0) is not supported"),
    ({"method": "lcm"}, "start it with accelerate launch --num_processes N (N > 1)"),  # one process: nothing to shard
])
def test_fsdp_refusals_are_one_line_and_write_nothing(tiny_sd, tmp_path, args, message):
    """What --sharding fsdp2 does not support (yet) is refused with one line before the run folder is made."""
    from diffdistill.config import build_run_config
    from diffdistill.distill import run_distill
    from diffdistill.errors import UserError

    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        run_distill(build_run_config({}, {"teacher": tiny_sd, "output": str(out), "sharding": "fsdp2", **args}))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_a_sharded_checkpoint_resumes_only_as_it_was_written(tmp_path):
    """A checkpoint sharded over 2 ranks is refused (one line, naming both) by a run without sharding or on
    another number of ranks; a whole one by a sharded run."""
    from diffdistill.checkpoint import require_sharding
    from diffdistill.errors import UserError

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    state = {"step": 2, "batches_seen": 2, "method": "lcm", "run_id": "r", "files": {}, "num_processes": 2,
             "modules": {"student": {"partial": False, "shards": 2}, "target": {"partial": False, "shards": 2}}}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    require_sharding(ckpt, 2)
    for shards, now in ((0, "no sharding"), (4, "--sharding fsdp2 on 4 processes")):
        with pytest.raises(UserError, match=f"sharded over 2 processes .*this run has {now}"):
            require_sharding(ckpt, shards)
    state["modules"] = {"student": {"partial": False}}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    require_sharding(ckpt, 0)
    with pytest.raises(UserError, match="written whole"):
        require_sharding(ckpt, 2)
