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
        "--validation-steps", "0", "--benchmark-samples", "0", "--steps", "2", "--num-ddim-timesteps", "10",
        "--w-min", "1", "--w-max", "2", "--lr-warmup-steps", "0", "--learning-rate", "1e-4", "--log-every", "1"]


def _cmd(teacher, out, *extra):
    return [sys.executable, "-m", "diffdistill.cli", "distill", "--method", "lcm", "--teacher", teacher,
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


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tiny_sd, tmp_path):
    ema = ("--student-ema-decay", "0.9")  # the student EMA must resume exactly too
    ref = _run(_cmd(tiny_sd, tmp_path / "ref", *ema))
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny_sd, out, *ema), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    _wait_for(proc, lambda: any(p.name == "checkpoint-2" for p in list_checkpoints(out / "checkpoints")))
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (out / "pipeline").exists()
    done = [p for p in list_checkpoints(out / "checkpoints")]
    assert done and int(done[-1].name.split("-")[1]) < 8  # it really died mid-run

    resumed = _run(_cmd(tiny_sd, out, *ema, "--resume-from-checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = _weights(tmp_path / "ref" / "checkpoints" / "checkpoint-8"), _weights(out / "checkpoints" / "checkpoint-8")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ema_a = load_file(str(tmp_path / "ref/checkpoints/checkpoint-8/ema.safetensors"))
    ema_b = load_file(str(out / "checkpoints/checkpoint-8/ema.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    ref_opt = torch.load(tmp_path / "ref/checkpoints/checkpoint-8/optimizer_student.pt", weights_only=True)
    res_opt = torch.load(out / "checkpoints/checkpoint-8/optimizer_student.pt", weights_only=True)
    for i, st in ref_opt["state"].items():
        assert torch.equal(st["exp_avg"], res_opt["state"][i]["exp_avg"])


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
           "-m", "diffdistill.cli", "distill", "--method", "lcm", "--teacher", tiny_sd, "--output", str(out), *TINY,
           "--max-train-minutes", "60"]  # never reached: runs the ranks' shared stop decision (a broadcast) each step
    cmd[cmd.index("--max-train-steps") + 1] = "3"
    r = _run(cmd, timeout=600, ACCELERATE_USE_CPU="true")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    sums = summary["rank_weight_checksums"]
    assert summary["num_processes"] == 2 and len(sums) == 2 and sums[0] == sums[1]
    assert (summary["train_steps"], summary["stopped_by"]) == (3, "max_train_steps")
    w = load_file(str(out / "checkpoints" / "checkpoint-3" / "model_student.safetensors"))
    assert float(torch.stack([v.double().sum() for v in w.values()]).sum()) == pytest.approx(sums[0], rel=1e-12)


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
