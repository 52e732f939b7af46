"""The command line end to end on tiny models, and a table of bad invocations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffdistill.cli import main

TINY = ["--max-train-steps", "3", "--batch-size", "4", "--checkpointing-steps", "2", "--validation-steps", "2",
        "--benchmark-samples", "0", "--steps", "2", "--num-ddim-timesteps", "10", "--w-min", "1", "--w-max", "2",
        "--lr-warmup-steps", "0"]

# A process that never imports diffdistill loads the export with plain diffusers and samples it.
PLAIN_DIFFUSERS = r"""
import sys, json, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
calls = []
pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
img = pipe("a handwritten digit 7", num_inference_steps=int(sys.argv[2]), output_type="np").images
assert "diffdistill" not in sys.modules
print(json.dumps({"scheduler": type(pipe.scheduler).__name__, "calls": len(calls), "batch": max(calls),
                  "shape": list(img.shape),
                  "finite": bool(torch.isfinite(torch.from_numpy(img)).all())}))
"""


def _plain_load(folder, steps):
    r = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(folder), str(steps)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_distill_lcm_end_to_end_and_plain_diffusers_load(tiny_sd, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--method", "lcm", "--teacher", tiny_sd, "--output", str(out), *TINY]) == 0
    for f in ("config.yaml", "logs.csv", "summary.json", "samples/final.png", "samples/step_000002.png",
              "pipeline/model_index.json", "pipeline/README.md", "pipeline/diffdistill.json"):
        assert (out / f).exists(), f
    assert not list(out.glob(".*tmp*")) and not list((out / "checkpoints").glob(".tmp*"))
    info = _plain_load(out / "pipeline", 2)
    # 1 UNet pass per step of one image at the default guidance_scale (7.5): no unconditional half
    assert info["scheduler"] == "LCMScheduler" and info["calls"] == 2 and info["batch"] == 1 and info["finite"]
    assert info["shape"] == [1, 32, 32, 3]
    card = (out / "pipeline" / "README.md").read_text()
    assert "num_inference_steps=2" in card
    # A second run into the same folder is refused ...
    capsys.readouterr()
    assert main(["distill", "--method", "lcm", "--teacher", tiny_sd, "--output", str(out), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # ... unless --overwrite.
    assert main(["distill", "--method", "lcm", "--teacher", tiny_sd, "--output", str(out), "--overwrite", *TINY]) == 0
    # Re-export an intermediate checkpoint.
    assert main(["export", str(out), "--checkpoint", "checkpoint-2", "--output", str(tmp_path / "ck2")]) == 0
    assert _plain_load(tmp_path / "ck2", 2)["scheduler"] == "LCMScheduler"


def _same_tensors(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    assert sorted(x) == sorted(y) and all(x[k].dtype == y[k].dtype and x[k].equal(y[k]) for k in x), (a, b)


@pytest.mark.slow
def test_distill_lcm_lora_end_to_end(tiny_sd, tmp_path):
    out = tmp_path / "lora-run"
    # With a student EMA: the run's export and the checkpoint's export must both sample the EMA weights.
    assert main(["distill", "--method", "lcm", "--teacher", tiny_sd, "--output", str(out), "--lora-rank", "4",
                 "--ema-decay", "0", "--student-ema-decay", "0.5", *TINY]) == 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    info = _plain_load(out / "pipeline", 2)
    assert info["calls"] == 2 and info["batch"] == 1  # the fused LoRA student's guidance is baked: never re-guided
    ckpt = out / "checkpoints" / "checkpoint-3" / "model_student.safetensors"
    from safetensors.torch import load_file

    assert all("lora" in k for k in load_file(str(ckpt)))  # LoRA checkpoints hold only the adapter
    # `diffdistill export` of the final checkpoint goes the same way as the run's own export: the same UNet bit
    # for bit, the same LoRA and scheduler preset, the same model card (up to the folder it names).
    again = tmp_path / "again"
    assert main(["export", str(out), "--output", str(again)]) == 0
    _same_tensors(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors",
                  again / "unet" / "diffusion_pytorch_model.safetensors")
    _same_tensors(out / "lora" / "pytorch_lora_weights.safetensors", again / "lora" / "pytorch_lora_weights.safetensors")
    for f in ("lora/scheduler/scheduler_config.json", "scheduler/scheduler_config.json"):
        assert (again / f).read_text() == ((out / f) if f.startswith("lora") else (out / "pipeline" / f)).read_text(), f
    card = (out / "pipeline" / "README.md").read_text()
    assert (again / "README.md").read_text().replace(str(again), "PIPELINE") == card.replace(str(out / "pipeline"), "PIPELINE")
    run_info, export_info = (json.loads((d / "diffdistill.json").read_text()) for d in (out / "pipeline", again))
    assert export_info.pop("command") == "export" and export_info.pop("checkpoint").endswith("checkpoint-3")
    assert export_info == run_info


def test_help_on_every_command(capsys):
    for argv in (["--help"], ["distill", "--help"], ["bench", "--help"], ["export", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--lora-rank", "--ema-decay", "--num-ddim-timesteps", "--huber-c", "--resume-from-checkpoint",
                 "--mixed-precision", "--gradient-checkpointing", "--steps", "--guidance", "--num-samples",
                 "--regression-weight", "--gan-weight"):
        assert flag in text, flag
    # a flag several methods share names each of them in its help
    assert "--method add, dmd, sds" in " ".join(text.split())


def test_dry_run_prints_resolved_config(tiny_sd, tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("method: lcm\ntrain:\n  learning_rate: 3.0e-5\nmethod_args:\n  w_max: 9\n")
    out = tmp_path / "never"
    assert main(["distill", "--config", str(cfg), "--teacher", tiny_sd, "--output", str(out), "--w-max", "7",
                 "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)["config"]
    assert resolved["train"]["learning_rate"] == 3e-5 and resolved["method_args"]["w_max"] == 7.0
    assert not out.exists()


def _bad_cases(tiny_sd: str, tmp: Path):
    notpipe = tmp / "notpipe"
    notpipe.mkdir(exist_ok=True)
    afile = tmp / "afile.txt"
    afile.write_text("x")
    badyaml = tmp / "bad.yaml"
    badyaml.write_text("train: [unclosed\n")
    unknown = tmp / "unknown.yaml"
    unknown.write_text("train:\n  learnin_rate: 1\n")
    listed = tmp / "listed.yaml"
    listed.write_text("train:\n  - 1\n  - 2\n")
    folders = {}
    for name, rows in {"nulltext": [{"file_name": "0.png", "text": None}],
                       "dotdot": [{"file_name": "../afile.txt", "text": "a"}],
                       "absolute": [{"file_name": str(afile), "text": "a"}],
                       "corrupt": [{"file_name": "bad.png", "text": "a"}]}.items():
        folders[name] = tmp / name
        folders[name].mkdir(exist_ok=True)
        (folders[name] / "bad.png").write_bytes(b"\x89PNG not really")
        (folders[name] / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = ["distill", "--teacher", tiny_sd, "--max-train-steps", "1"]
    import torch

    cpu_only = [([*d, "--mixed-precision", "fp16"], "fp16 needs a GPU")] if not torch.cuda.is_available() else []
    return [*cpu_only,
        ([*d, "--adam-beta1", "2"], "--adam-beta1"),
        ([*d, "--adam-epsilon", "-1"], "--adam-epsilon"),
        ([*d, "--benchmark-samples", "10"], "--benchmark-samples must be 0"),
        ([*d, "--seed", "-1"], "--seed"),
        ([*d, "--seed", str(2**32)], "--seed"),
        ([*d, "--recommended-guidance-scale", "inf"], "--recommended-guidance-scale"),
        ([*d, "--learning-rate", "inf"], "--learning-rate"),
        ([*d, "--learning-rate", "1e300"], "--learning-rate"),
        ([*d, "--config", str(listed)], "'train:'"),
        ([*d, "--dataset", str(folders["nulltext"])], "must be a string"),
        ([*d, "--dataset", str(folders["dotdot"])], "outside"),
        ([*d, "--dataset", str(folders["absolute"])], "outside"),
        ([*d, "--dataset", str(folders["corrupt"])], "not a readable image"),
        (["sds", "--prompt", "a", "--seed", "-1"], "--seed"),
        (["distill", "--teacher", str(tmp / "missing")], "not found"),
        (["distill", "--teacher", str(afile)], "is a file"),
        (["distill", "--teacher", str(notpipe)], "model_index.json"),
        ([*d, "--steps", "0"], "--steps"),
        ([*d, "--steps", "four"], "--steps"),
        ([*d, "--batch-size", "1.5"], "--batch-size"),
        ([*d, "--method", "magic"], "unknown method"),
        ([*d, "--loss-type", "l3"], "--loss-type"),
        ([*d, "--w-min", "5", "--w-max", "2"], "--w-min"),
        ([*d, "--lora-rank", "0"], "--lora-rank"),
        ([*d, "--lora-rank", "4", "--ema-decay", "0.9"], "--ema-decay"),
        ([*d, "--learning-rate", "-1"], "--learning-rate"),
        ([*d, "--mixed-precision", "fp8"], "--mixed-precision"),
        ([*d, "--steps", "60"], "--num-ddim-timesteps"),
        ([*d, "--dataset", str(tmp / "nodata") + "/"], "--dataset"),
        ([*d, "--config", str(tmp / "missing.yaml")], "config file not found"),
        ([*d, "--config", str(badyaml)], "not valid YAML"),
        ([*d, "--config", str(unknown)], "learnin_rate"),
        ([*d, "--gradient-checkpointing", "maybe"], "--gradient-checkpointing"),
        ([*d, "--enable-xformers"], "xformers"),
        ([*d, "--method", "progressive", "--steps", "3"], "nearest valid values: 2, 4"),
        ([*d, "--method", "add", "--feature-network", "dinov2-giant"], "--feature-network"),
        ([*d, "--method", "dmd", "--steps", "4"], "--steps must be 1"),
        (["distill", "--teacher", tiny_sd, "--output", str(afile / "sub")], "--output"),
        (["bench", str(tmp / "missing"), "--steps", "1", "--output", "OUT"], "missing"),
        (["bench", str(notpipe), "--steps", "1", "--output", "OUT"], "notpipe"),
        (["bench", tiny_sd, "--steps", "0", "--output", "OUT"], "0"),
        (["bench", tiny_sd, "--steps", "a,b", "--output", "OUT"], "a,b"),
        (["export", str(notpipe), "--output", "OUT"], "config.yaml"),
    ]


def test_bad_invocations_fail_with_one_line_and_write_nothing(tiny_sd, tmp_path, capsys, monkeypatch):
    from accelerate.state import AcceleratorState

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cases = _bad_cases(tiny_sd, tmp_path)
    assert len(cases) >= 15
    for argv, needle in cases:
        if "--output" not in argv:
            argv = [*argv, "--output", str(work / "OUT")]
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors (also one line: OneLineParser)
            code = e.code
        AcceleratorState._reset_state(True)  # one process per invocation in real use (the fp16 case sets it)
        err = capsys.readouterr().err.strip()
        assert code != 0, argv
        assert "Traceback" not in err, argv
        assert len(err.splitlines()) == 1, (argv, err)
        assert needle in err, (argv, err)
        assert not (work / "OUT").exists(), argv
    assert list(work.iterdir()) == []

