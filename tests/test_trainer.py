"""The shared trainer: exact resume after SIGKILL, atomic checkpoints, SIGINT, non-finite loss, 2-process DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffdistill.config import build_run_config
from diffdistill.trainer import list_checkpoints, resolve_resume

TINY = ["--max-train-steps", "8", "--batch-size", "4", "--checkpointing-steps", "2", "--checkpoints-total-limit", "0",
        "--validation-steps", "0", "--benchmark-samples", "0", "--steps", "2", "--lr-warmup-steps", "0",
        "--learning-rate", "1e-4", "--log-every", "1"]
LCM = ("--method", "lcm", "--num-ddim-timesteps", "10", "--w-min", "1", "--w-max", "2")


def _cmd(teacher, out, *extra):
    method = () if "--method" in extra else LCM
    return [sys.executable, "-m", "diffdistill.cli", "distill", *method, "--teacher", teacher,
            "--output", str(out), *TINY, *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd, timeout=300, **env):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**_env(), **env})


def _weights(ckpt: Path) -> dict:
    return {k: v for f in sorted(ckpt.glob("model_*.safetensors")) for k, v in load_file(str(f)).items()}


def _wait_for(proc, predicate, timeout=240):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the condition held: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


# Every method with every part of its state in play: both EMAs (student EMA, LCM's target network), LoRA,
# several optimisers and LR schedules, a repeated phase (DMD's extra fake-score update), the GAN head, R1,
# the regression pool of teacher ODE pairs (filled across the kill: 3 pairs per step, up to 30), and
# progressive distillation's stage change (4 iterations per stage: the kill lands inside the second stage).
REG = ("--regression-weight", "0.5", "--regression-steps", "2", "--regression-pairs", "30",
       "--regression-batch-size", "3")
RESUME_CASES = {
    "lcm": (*LCM, "--student-ema-decay", "0.9"),
    "lcm_lora": (*LCM, "--lora-rank", "4", "--ema-decay", "0"),
    "add": ("--method", "add", "--r1-weight", "0.01", *REG),
    "dmd": ("--method", "dmd", "--steps", "1", "--fake-updates", "2", "--gan-weight", "0.1", *REG,
            "--student-ema-decay", "0.9"),
    "dmd2_4step": ("--method", "dmd", "--steps", "4", "--fake-updates", "2", "--gan-weight", "0.1"),  # simulation
    "sds": ("--method", "sds", "--steps", "1"),
    "progressive": ("--method", "progressive", "--start-steps", "8", "--guidance-iters", "2", "--iters-per-stage",
                    "3"),
    # a thin student (its feature-KD projections are a second trained module) with a student EMA; tiny-decoder
    # shares kd's modules-and-projections state (FeatureKDMethod), so this case stands for both
    "kd": ("--method", "kd", "--student-arch", "tiny", "--student-width", "0.5", "--student-ema-decay", "0.9"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_sigkill_then_resume_is_bit_exact(case, tiny_sd, tmp_path):
    """SIGKILL after a checkpoint, resume with ``latest``: every weight, optimiser moment and EMA of the final
    checkpoint equals an uninterrupted run's, bit for bit."""
    extra = RESUME_CASES[case]
    ref = _run(_cmd(tiny_sd, tmp_path / "ref", *extra))
    assert ref.returncode == 0, ref.stderr[-3000:]
    final = list_checkpoints(tmp_path / "ref" / "checkpoints")[-1].name
    assert int(final.split("-")[1]) >= 8

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny_sd, out, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    _wait_for(proc, lambda: any(p.name == "checkpoint-4" for p in list_checkpoints(out / "checkpoints")))
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (out / "pipeline").exists()
    done = [p for p in list_checkpoints(out / "checkpoints")]
    assert done and int(done[-1].name.split("-")[1]) < 8  # it really died mid-run
    if "--regression-weight" in extra:  # the pool is mid-fill at the kill and travels in the checkpoint
        pool = load_file(str(done[-1] / "method_state_0.safetensors"))
        assert 0 < pool["regression_pool.noise"].shape[0] < 30

    resumed = _run(_cmd(tiny_sd, out, *extra, "--resume-from-checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    ref_ckpt, res_ckpt = tmp_path / "ref" / "checkpoints" / final, out / "checkpoints" / final
    files = sorted(p.name for p in ref_ckpt.iterdir() if p.suffix == ".safetensors" and not p.name.startswith("rng"))
    assert files == sorted(p.name for p in res_ckpt.iterdir() if p.suffix == ".safetensors"
                           and not p.name.startswith("rng"))
    for name in files:  # modules, student EMA, regression pool
        a, b = load_file(str(ref_ckpt / name)), load_file(str(res_ckpt / name))
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    for opt_file in sorted(ref_ckpt.glob("optimizer_*.pt")):
        ref_opt = torch.load(opt_file, weights_only=True)
        res_opt = torch.load(res_ckpt / opt_file.name, weights_only=True)
        assert ref_opt["state"].keys() == res_opt["state"].keys()
        for i, st in ref_opt["state"].items():
            assert torch.equal(st["exp_avg"], res_opt["state"][i]["exp_avg"]), (opt_file.name, i)
            assert torch.equal(st["exp_avg_sq"], res_opt["state"][i]["exp_avg_sq"]), (opt_file.name, i)
        lr = json.loads((ref_ckpt / opt_file.name.replace("optimizer_", "lr_scheduler_").replace(".pt", ".json"))
                        .read_text())
        assert lr == json.loads((res_ckpt / opt_file.name.replace("optimizer_", "lr_scheduler_")
                                 .replace(".pt", ".json")).read_text())


def test_half_written_checkpoint_is_never_resumed(tmp_path):
    ck = tmp_path / "checkpoints"
    (ck / "checkpoint-2").mkdir(parents=True)
    state = {"step": 2, "batches_seen": 2, "method": "lcm", "modules": {}, "run_id": "r", "files": {}}
    (ck / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
    (ck / ".tmp-checkpoint-4").mkdir()  # a crash while writing step 4
    (ck / "checkpoint-6").mkdir()  # no trainer_state.json: incomplete
    assert [p.name for p in list_checkpoints(ck)] == ["checkpoint-2"]
    assert resolve_resume("latest", ck, "r").name == "checkpoint-2"
    assert resolve_resume("", ck, "r") is None


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_exits_cleanly(tiny_sd, tmp_path):
    out = tmp_path / "run"
    cmd = _cmd(tiny_sd, out)
    cmd[cmd.index("--max-train-steps") + 1] = "400"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for(proc, lambda: (out / "logs.csv").exists() and len((out / "logs.csv").read_text().splitlines()) > 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "checkpoint saved" in err
    last = list_checkpoints(out / "checkpoints")[-1]
    step = json.loads((last / "trainer_state.json").read_text())["step"]
    assert step >= 3 and str(last) in err  # the checkpoint of the step it stopped at
    assert not (out / "pipeline").exists()


def test_non_finite_loss_stops_with_one_line_and_keeps_last_checkpoint(tiny_sd, tmp_path):
    from diffdistill.data import build_dataset
    from diffdistill.methods import get_method
    from diffdistill.teachers import load_teacher
    from diffdistill.trainer import NonFiniteLossError, Trainer

    run = build_run_config({}, {"teacher": tiny_sd, "output": str(tmp_path), "max_train_steps": 6, "batch_size": 2,
                                "checkpointing_steps": 2, "validation_steps": 0, "lr_warmup_steps": 0,
                                "num_ddim_timesteps": 10, "w_min": 1.0, "w_max": 2.0})
    spec = get_method("lcm")
    method = spec.method_cls(spec.config_cls(**run.method_args), run)
    teacher = load_teacher(tiny_sd)
    trainer = Trainer(run, method, teacher, tmp_path, build_dataset(run.data, 32))
    real_loss = method.loss

    def exploding(phase, batch, step):
        loss, logs = real_loss(phase, batch, step)
        if step == 2:  # the third optimiser step
            return loss * float("nan"), {**logs, "loss": float("nan")}
        return loss, logs

    method.loss = exploding
    with pytest.raises(NonFiniteLossError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "\n" not in msg and "step 3" in msg and "term loss" in msg and "checkpoint-2" in msg
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-2"]


@pytest.mark.slow
def test_two_process_ddp_ranks_stay_identical(tiny_sd, tmp_path):
    """accelerate launch, 2 CPU processes (gloo): both ranks end with the same weights, equal to the checkpoint."""
    out = tmp_path / "ddp"
    # On a CPU-only machine accelerate's multi-process launcher (torchrun underneath) gives gloo DDP
    # when ACCELERATE_USE_CPU is set; `accelerate launch --cpu` alone starts a single process.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "diffdistill.cli", "distill", *LCM, "--teacher", tiny_sd, "--output", str(out), *TINY,
           "--max-train-minutes", "60"]  # never reached: runs the ranks' shared stop decision (a broadcast) each step
    cmd[cmd.index("--max-train-steps") + 1] = "3"
    r = _run(cmd, timeout=600, ACCELERATE_USE_CPU="true")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    digests = summary["rank_weight_sha256"]
    assert summary["num_processes"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert (summary["train_steps"], summary["stopped_by"]) == (3, "max_train_steps")
    w = load_file(str(out / "checkpoints" / "checkpoint-3" / "model_student.safetensors"))
    import hashlib

    # the ranks' digest, written out from the checkpoint: every tensor's name and raw bytes, in key order
    digest = hashlib.sha256()
    for k in sorted(w):
        digest.update(k.encode() + b"\0" + w[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert digests[0] == digest.hexdigest()


def test_rank_checksum_sees_every_bit(tiny_sd, tmp_path):
    """The ranks' weight digest changes with one weight moved by one float32 ulp, and with two weights swapped
    (which leaves any sum of the weights as it was)."""
    tr = _trainer(tiny_sd, tmp_path)
    tr._setup()
    before = tr.rank_checksums()
    assert len(before) == 1 and len(before[0]) == 64  # one rank, one hex SHA-256
    flat = next(v for v in (p.view(-1) for p in tr.method.student.parameters()) if v.numel() > 1 and v[0] != v[1])
    with torch.no_grad():
        flat[:2] = flat[:2].flip(0).clone()
        swapped = tr.rank_checksums()
        flat[:2] = flat[:2].flip(0).clone()
        assert tr.rank_checksums() == before
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    assert len({before[0], swapped[0], tr.rank_checksums()[0]}) == 3


def _trainer(tiny_sd, out, **kw):
    from diffdistill.data import build_dataset
    from diffdistill.methods import get_method
    from diffdistill.teachers import load_teacher
    from diffdistill.trainer import Trainer

    values = {"teacher": tiny_sd, "output": str(out), "max_train_steps": 4, "batch_size": 2, "validation_steps": 0,
              "lr_warmup_steps": 0, "num_ddim_timesteps": 10, "w_min": 1.0, "w_max": 2.0, **kw}
    run = build_run_config({}, values)
    spec = get_method("lcm")
    method = spec.method_cls(spec.config_cls(**run.method_args), run)
    teacher = load_teacher(tiny_sd, dtype=torch.bfloat16 if run.train.mixed_precision == "bf16" else torch.float32)
    return Trainer(run, method, teacher, out, build_dataset(run.data, 32))


def test_checkpoints_total_limit_prunes_old_checkpoints(tiny_sd, tmp_path):
    _trainer(tiny_sd, tmp_path, max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2).fit()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-4", "checkpoint-5"]
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


def test_bf16_mixed_precision_on_cpu(tiny_sd, tmp_path):
    tr = _trainer(tiny_sd, tmp_path, mixed_precision="bf16", max_train_steps=2, checkpointing_steps=0)
    assert tr.teacher.unet.dtype == torch.bfloat16 and tr.teacher.vae.dtype == torch.float32  # VAE stays fp32
    result = tr.fit()
    assert torch.isfinite(torch.tensor(result.last_logs["loss"]))
    student = tr.method.student
    assert next(student.parameters()).dtype == torch.float32  # master weights stay fp32


def test_gradient_accumulation_and_checkpointing_flags(tiny_sd, tmp_path):
    tr = _trainer(tiny_sd, tmp_path, gradient_accumulation_steps=2, gradient_checkpointing=True, max_train_steps=2,
                  checkpointing_steps=0)
    result = tr.fit()
    assert result.steps == 2 and tr.batches_seen == 4  # two micro-batches per optimiser step
    assert tr.method.student.is_gradient_checkpointing


def test_max_train_minutes_ends_the_run_early_with_a_final_checkpoint(tiny_sd, tmp_path):
    # A budget of ~0 s: the run stops after its first step and finishes as a completed run would.
    tr = _trainer(tiny_sd, tmp_path, max_train_steps=50, max_train_minutes=1e-9, checkpointing_steps=0)
    result = tr.fit()
    assert (result.steps, result.stopped_by) == (1, "max_train_minutes")
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-1"]
    (tmp_path / "full").mkdir()
    full = _trainer(tiny_sd, tmp_path / "full", max_train_steps=2, checkpointing_steps=0).fit()
    assert (full.steps, full.stopped_by) == (2, "max_train_steps")


def test_frozen_carries_gradients_through_a_module_but_not_into_it():
    """A loss built inside ``frozen(m)`` back-propagates to m's input only; m's flags come back as they were."""
    from diffdistill.features import frozen

    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    m[1].bias.requires_grad_(False)  # a flag that was off stays off
    x = torch.randn(2, 3, requires_grad=True)
    with frozen(m):
        loss = m(x).sum()
        assert not any(p.requires_grad for p in m.parameters())
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())
    assert [p.requires_grad for p in m.parameters()] == [True, True, True, False]


def test_deepspeed_is_refused_with_one_line_before_anything_is_written(tiny_sd, tmp_path):
    """DeepSpeed is not supported (FSDP is: tests/test_fsdp.py): an accelerate launch that selects it (its
    ACCELERATE_USE_DEEPSPEED) ends with exit 2 and one line, before accelerate looks for the deepspeed package,
    and writes nothing."""
    out = tmp_path / "deepspeed"
    r = _run(_cmd(tiny_sd, out), timeout=120, ACCELERATE_USE_DEEPSPEED="true")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: accelerate is configured for DEEPSPEED")
    assert "Traceback" not in r.stderr and not out.exists()
