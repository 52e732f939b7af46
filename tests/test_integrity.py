"""Nothing lost, nothing executed: output ownership, run ids and verified checkpoints, the run-folder lock,
flushed checkpoint files, non-finite weights, input that fails late, exit statuses, logs after a resume,
signals during export."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffdistill.checkpoint import list_checkpoints, read_state, resolve_resume
from diffdistill.cli import main
from diffdistill.config import build_run_config
from diffdistill.errors import RunFailed, UserError
from diffdistill.outputs import LOCK_FILE, FolderLock

RUN = ["--method", "lcm", "--max-train-steps", "3", "--batch-size", "2", "--checkpointing-steps", "1",
       "--checkpoints-total-limit", "0", "--validation-steps", "0", "--benchmark-samples", "0", "--steps", "2",
       "--num-ddim-timesteps", "10", "--w-min", "1", "--w-max", "2", "--lr-warmup-steps", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def tiny_run(tiny_sd, tmp_path_factory):
    """A finished 3-step distill run (checkpoints 1, 2, 3), made once; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["distill", "--teacher", tiny_sd, "--output", str(out), *RUN]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _run_id(run: Path) -> str:
    return json.loads((run / "diffdistill.json").read_text())["run_id"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _trainer(tiny_sd, out, run_id=None, **kw):
    from diffdistill.data import build_dataset
    from diffdistill.methods import get_method
    from diffdistill.teachers import load_teacher
    from diffdistill.trainer import Trainer

    values = {"teacher": tiny_sd, "output": str(out), "max_train_steps": 4, "batch_size": 2, "validation_steps": 0,
              "lr_warmup_steps": 0, "num_ddim_timesteps": 10, "w_min": 1.0, "w_max": 2.0, "log_every": 1, **kw}
    run = build_run_config({}, values)
    spec = get_method("lcm")
    method = spec.method_cls(spec.config_cls(**run.method_args), run)
    return Trainer(run, method, load_teacher(tiny_sd), out, build_dataset(run.data, 32), run_id=run_id)


def _fake_checkpoint(folder: Path, step: int, run_id: str) -> Path:
    p = folder / f"checkpoint-{step}"
    p.mkdir(parents=True)
    state = {"step": step, "batches_seen": step, "method": "lcm", "modules": {}, "run_id": run_id, "files": {}}
    (p / "trainer_state.json").write_text(json.dumps(state))
    return p


# ---------------------------------------------------------------- data loss: --output
@pytest.mark.slow
def test_export_and_sds_replace_only_their_own_earlier_output(tiny_run, tmp_path, capsys):
    mine = tmp_path / "d"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    afile = tmp_path / "f.txt"
    afile.write_text("x")
    users = f"--output {mine} is not empty and was not written by diffdistill"
    refused = [(["export", str(tiny_run), "--output", str(mine)], f"{users} export"),
               (["export", str(tiny_run), "--output", str(mine), "--overwrite"], f"{users} export"),
               (["export", str(tiny_run), "--output", str(afile), "--overwrite"], f"{afile} exists and is not a folder"),
               (["export", str(tiny_run), "--output", str(tiny_run / "pipeline"), "--overwrite"],  # distill's, not export's
                "pipeline is not empty and was not written by diffdistill export"),
               (["sds", "--prompt", "a handwritten digit 1", "--output", str(mine), "--overwrite"], f"{users} sds"),
               (["sds", "--prompt", "a handwritten digit 1", "--output", str(afile), "--overwrite"],
                f"{afile} exists and is not a folder")]
    for argv, needle in refused:
        assert main(argv) == 2, argv
        assert needle in _one_line(capsys), argv
    assert [p.name for p in mine.iterdir()] == ["keep.txt"] and (mine / "keep.txt").read_text() == "x"
    assert afile.read_text() == "x"
    out = tmp_path / "exported"
    assert main(["export", str(tiny_run), "--output", str(out)]) == 0
    assert main(["export", str(tiny_run), "--output", str(out)]) == 2
    assert "--overwrite" in _one_line(capsys)
    assert main(["export", str(tiny_run), "--output", str(out), "--overwrite", "--checkpoint", "checkpoint-1"]) == 0
    assert json.loads((out / "diffdistill.json").read_text())["checkpoint"].endswith("checkpoint-1")


@pytest.mark.slow
def test_distill_refuses_a_users_folder_and_an_earlier_run_without_a_flag(tiny_run, tiny_sd, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "logs.csv").write_text("a,b\n1,2\n")
    (mine / "config.yaml").write_text("x: 1\n")
    before = _snapshot(mine)
    for extra in ([], ["--overwrite"], ["--resume-from-checkpoint", "latest"]):
        assert main(["distill", "--teacher", tiny_sd, "--output", str(mine), *RUN, *extra]) == 2
        assert "not written by diffdistill distill" in _one_line(capsys)
    assert _snapshot(mine) == before
    interrupted = _copy(tiny_run, tmp_path)
    shutil.rmtree(interrupted / "pipeline")
    before = _snapshot(interrupted)
    assert main(["distill", "--teacher", tiny_sd, "--output", str(interrupted), *RUN]) == 2
    assert "--resume-from-checkpoint latest" in _one_line(capsys)
    assert _snapshot(interrupted) == before


@pytest.mark.slow
def test_overwrite_starts_clean_with_a_new_run_id(tiny_run, tiny_sd, tmp_path):
    run = _copy(tiny_run, tmp_path)
    old_id, old = _run_id(run), load_file(str(run / "checkpoints/checkpoint-2/model_student.safetensors"))
    (run / "notes.txt").write_text("mine")
    # Two steps, no periodic checkpoint: the final checkpoint-2 must be this run's, not the earlier run's.
    assert main(["distill", "--teacher", tiny_sd, "--output", str(run), *RUN, "--overwrite", "--max-train-steps", "2",
                 "--checkpointing-steps", "0", "--seed", "1"]) == 0
    new_id = _run_id(run)
    assert new_id != old_id and (run / "notes.txt").read_text() == "mine"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["checkpoint-2"]
    assert read_state(run / "checkpoints/checkpoint-2")["run_id"] == new_id
    new = load_file(str(run / "checkpoints/checkpoint-2/model_student.safetensors"))
    assert any(not torch.equal(old[k], new[k]) for k in old)
    assert [r.split(",")[0] for r in (run / "logs.csv").read_text().splitlines()[1:]] == ["1", "2"]


# ---------------------------------------------------------------- run ids, verification
def test_pruning_final_save_and_latest_ignore_another_runs_checkpoints(tiny_sd, tmp_path):
    ck = tmp_path / "checkpoints"
    for step in (3, 9):
        _fake_checkpoint(ck, step, "another-run")
    tr = _trainer(tiny_sd, tmp_path, max_train_steps=3, checkpointing_steps=2, checkpoints_total_limit=2)
    tr.fit()
    assert [p.name for p in list_checkpoints(ck)] == ["checkpoint-2", "checkpoint-3", "checkpoint-9"]
    assert read_state(ck / "checkpoint-3")["run_id"] == tr.run_id  # the final save replaced the stranger
    assert read_state(ck / "checkpoint-9")["run_id"] == "another-run"  # never pruned as if it were ours
    warnings: list[str] = []
    assert resolve_resume("latest", ck, tr.run_id, warn=warnings.append).name == "checkpoint-3"
    assert len(warnings) == 1 and "checkpoint-9" in warnings[0] and "another run" in warnings[0]
    with pytest.raises(UserError, match="another run"):
        resolve_resume("checkpoint-9", ck, tr.run_id)


@pytest.mark.slow
def test_corrupt_checkpoints_are_skipped_with_a_warning_or_refused_naming_the_file(tiny_run, tiny_sd, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    ck, rid = run / "checkpoints", _run_id(run)
    weights = ck / "checkpoint-3" / "model_student.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert main(["export", str(run), "--output", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    assert "warning: skipping checkpoint-3" in err and "model_student.safetensors" in err
    assert json.loads((tmp_path / "e" / "diffdistill.json").read_text())["checkpoint"].endswith("checkpoint-2")
    assert main(["distill", "--teacher", tiny_sd, "--output", str(run), *RUN, "--resume-from-checkpoint", "latest"]) == 0
    out = capsys.readouterr()
    assert "resumed from" in out.out + out.err and "checkpoint-2 at step 2" in out.out + out.err
    assert read_state(ck / "checkpoint-3") and resolve_resume("latest", ck, rid).name == "checkpoint-3"  # rewritten
    (ck / "checkpoint-3" / "trainer_state.json").write_text("garbage{")
    (ck / "checkpoint-2" / "lr_scheduler_student.json").unlink()  # missing scheduler state
    warnings: list[str] = []
    assert resolve_resume("latest", ck, rid, warn=warnings.append).name == "checkpoint-1"
    assert "trainer_state.json" in warnings[0] and "lr_scheduler_student.json is missing" in warnings[1]
    with pytest.raises(UserError, match="lr_scheduler_student.json is missing"):
        resolve_resume("checkpoint-2", ck, rid)
    (ck / "checkpoint-1" / "optimizer_student.pt").write_bytes(b"")
    with pytest.raises(UserError, match="no usable checkpoint"):
        resolve_resume("latest", ck, rid)
    marker = json.loads((run / "diffdistill.json").read_text())
    (run / "diffdistill.json").write_text(json.dumps({**marker, "run_id": "someone-else"}))
    capsys.readouterr()
    assert main(["export", str(run), "--checkpoint", "checkpoint-1", "--output", str(tmp_path / "x")]) == 2
    assert "another run" in _one_line(capsys)


def test_checkpoint_files_are_flushed_before_the_rename(tmp_path, monkeypatch):
    import diffdistill.outputs as outputs

    events: list[tuple[str, str]] = []
    real_fsync, real_rename = outputs.fsync_path, Path.rename
    monkeypatch.setattr(outputs, "fsync_path", lambda p: events.append(("fsync", str(p))) or real_fsync(p))
    monkeypatch.setattr(Path, "rename", lambda self, t: events.append(("rename", str(self))) or real_rename(self, t))
    tmp = tmp_path / ".tmp-checkpoint-2"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"w" * 100)
    (tmp / "sub" / "rng").write_bytes(b"r")
    (tmp_path / "checkpoint-2").mkdir()  # an older copy, replaced
    outputs.replace_dir(tmp, tmp_path / "checkpoint-2")
    renamed = events.index(("rename", str(tmp)))
    flushed = {p for kind, p in events[:renamed] if kind == "fsync"}
    assert {str(tmp / "model.safetensors"), str(tmp / "sub" / "rng"), str(tmp / "sub"), str(tmp)} <= flushed
    assert ("fsync", str(tmp_path)) in events[renamed:]  # the rename itself is made durable
    assert (tmp_path / "checkpoint-2" / "model.safetensors").read_bytes() == b"w" * 100


# ---------------------------------------------------------------- the lock
@pytest.mark.slow
def test_a_second_run_into_a_locked_folder_names_the_first_ones_pid(tiny_sd, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    code = "import sys, time; from diffdistill.outputs import FolderLock; FolderLock(sys.argv[1]).acquire(); " \
           "print('locked', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["distill", "--teacher", tiny_sd, "--output", str(out), *RUN]) == 2
        assert f"PID {holder.pid}" in _one_line(capsys)
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    FolderLock(out).acquire().release()  # a dead holder's lock is gone with it


# ---------------------------------------------------------------- failures that hide
def test_non_finite_weights_are_never_saved_as_a_good_checkpoint(tiny_sd, tmp_path):
    from diffdistill.trainer import NonFiniteError

    tr = _trainer(tiny_sd, tmp_path, checkpointing_steps=1)
    after = tr.method.after_step

    def diverge(step):  # an update that overflowed: the loss of this step was still finite
        after(step)
        if step == 2:
            with torch.no_grad():
                next(tr.method.student.parameters()).view(-1)[0] = float("inf")

    tr.method.after_step = diverge
    with pytest.raises(NonFiniteError) as e:
        tr.fit()
    msg = str(e.value)
    assert "\n" not in msg and "non-finite weights in student after step 2" in msg and "checkpoint-1" in msg
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-1"]


@pytest.mark.slow
def test_divergence_exits_3_with_one_line_and_the_run_resumes(tiny_sd, tmp_path, capsys, monkeypatch):
    from diffdistill.methods.consistency import ConsistencyDistillation

    real = ConsistencyDistillation.loss

    def nan_at_step_2(self, phase, batch, step):
        loss, logs = real(self, phase, batch, step)
        return (loss * float("nan"), logs) if step == 1 else (loss, logs)

    out = tmp_path / "run"
    monkeypatch.setattr(ConsistencyDistillation, "loss", nan_at_step_2)
    assert main(["distill", "--teacher", tiny_sd, "--output", str(out), *RUN]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]  # after the progress bar, one line
    assert err.startswith("error: ")
    assert "non-finite loss at step 2" in err and "checkpoint-1" in err
    monkeypatch.setattr(ConsistencyDistillation, "loss", real)
    assert main(["distill", "--teacher", tiny_sd, "--output", str(out), *RUN, "--resume-from-checkpoint", "latest"]) == 0


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _broken_inside(png: bytes) -> bytes:
    """The PNG with its pixel data replaced by garbage under a valid checksum: it opens and verifies, then fails."""
    i = png.index(b"IDAT")
    n = struct.unpack(">I", png[i - 4: i])[0]
    bad = b"\x00" * n
    return png[: i + 4] + bad + struct.pack(">I", zlib.crc32(b"IDAT" + bad)) + png[i + 8 + n:]


def test_an_image_that_breaks_mid_run_fails_with_one_line_and_the_run_resumes(tiny_sd, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.png").write_bytes(_png((60 * i, 0, 0)))
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"img {i}"}) + "\n"
                                                 for i in range(4)))
    (data / "2.png").write_bytes(_broken_inside(_png((120, 0, 0))))
    out = tmp_path / "run"
    out.mkdir()
    tr = _trainer(tiny_sd, out, dataset=str(data), checkpointing_steps=1)  # 1 of 4 bad: more than 0.01
    with pytest.raises(RunFailed) as e:
        tr.fit()
    msg = str(e.value)
    assert "\n" not in msg and str(data / "2.png") in msg and "1 of 4 images" in msg
    assert "--max-bad-image-fraction 0.01" in msg
    assert "warning" not in capsys.readouterr().err  # the error line alone
    (data / "2.png").write_bytes(_png((120, 0, 0)))  # the user repairs the file ...
    again = _trainer(tiny_sd, out, run_id=tr.run_id, dataset=str(data), checkpointing_steps=1,
                     resume_from_checkpoint="latest")
    again.fit()  # ... and resumes
    assert again.step == 4


def test_a_few_undecodable_images_are_skipped_and_resume_stays_exact(tiny_sd, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.png").write_bytes(_png((60 * i, 0, 0)))
    (data / "2.png").write_bytes(_broken_inside(_png((120, 0, 0))))
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"img {i}"}) + "\n"
                                                 for i in range(4)))
    kw = {"dataset": str(data), "max_bad_image_fraction": 0.5, "checkpointing_steps": 2}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = _trainer(tiny_sd, tmp_path / "a", **kw)
    whole.fit()
    assert capsys.readouterr().err.count(f"warning: skipping undecodable image {data / '2.png'}") == 1
    assert whole.skipped_images and str(data / "2.png") in whole.skipped_images[0]
    part = _trainer(tiny_sd, tmp_path / "b", **{**kw, "max_train_steps": 2})
    part.fit()
    resumed = _trainer(tiny_sd, tmp_path / "b", run_id=part.run_id, **kw, resume_from_checkpoint="latest")
    resumed.fit()
    for name, module in whole.method.state_modules().items():
        other = resumed.method.state_modules()[name]
        assert all(torch.equal(p, q) for p, q in zip(module.state_dict().values(), other.state_dict().values()))


@pytest.mark.slow
def test_distill_names_skipped_images_in_the_summary_and_exits_3_past_the_fraction(tiny_sd, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    files = {**{f"{i}.png": _png((60 * i, 0, 0)) for i in range(4)}, "inside.png": _broken_inside(_png((1, 2, 3)))}
    for name, content in files.items():
        (data / name).write_bytes(content)
    (data / "garbage.png").write_bytes(b"not an image")
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n"
                                                 for n in [*files, "garbage.png"]))
    out = tmp_path / "run"
    argv = ["distill", "--teacher", tiny_sd, "--dataset", str(data), *RUN, "--max-train-steps", "4"]
    assert main([*argv, "--output", str(out), "--max-bad-image-fraction", "0.5"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping unreadable image {data / 'garbage.png'}" in err
    assert f"warning: skipping undecodable image {data / 'inside.png'}" in err
    skipped = json.loads((out / "summary.json").read_text())["skipped_images"]
    assert skipped["count"] == 2 and [f.split(" (")[0] for f in skipped["files"]] == [str(data / "garbage.png"),
                                                                                       str(data / "inside.png")]
    assert main([*argv, "--output", str(tmp_path / "before")]) == 2  # garbage.png: 1 of 6, found before the run
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 1 of 6 images") and "\n" not in err and not (tmp_path / "before").exists()
    (data / "garbage.png").write_bytes(_png((5, 5, 5)))
    assert main([*argv, "--output", str(tmp_path / "mid")]) == 3  # inside.png: 1 of 6, met mid-run
    err = capsys.readouterr().err
    assert "Traceback" not in err and "warning" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: 1 of 6 images of {data} are not readable images")


def test_logs_after_a_resume_hold_each_step_once(tiny_sd, tmp_path):
    first = _trainer(tiny_sd, tmp_path, checkpointing_steps=2)
    first.fit()
    rows = (tmp_path / "logs.csv").read_text().splitlines()
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-4")  # killed after logging step 4, before its checkpoint
    again = _trainer(tiny_sd, tmp_path, run_id=first.run_id, checkpointing_steps=2, resume_from_checkpoint="latest")
    again.fit()
    resumed = (tmp_path / "logs.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in resumed[1:]] == ["1", "2", "3", "4"]
    loss = resumed[0].split(",").index("loss")
    assert [r.split(",")[loss] for r in resumed] == [r.split(",")[loss] for r in rows]  # bit for bit


@pytest.mark.slow
def test_sigterm_during_export_leaves_nothing_and_says_so(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("diffdistill.export.verify_pipeline", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "exported"
    assert main(["export", str(tiny_run), "--output", str(out)]) == 128 + signal.SIGTERM
    assert f"signal {int(signal.SIGTERM)}" in _one_line(capsys)
    assert list(tmp_path.iterdir()) == []
