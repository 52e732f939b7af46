"""The command line end to end on tiny models, and a table of bad invocations."""

from __future__ import annotations

import dataclasses
import json
import os
import re
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
    # former names parse (to be refused with their replacement's name) but are not offered
    for gone in ("--guidance-scale", "--recommended-guidance-scale", "--uncond-prob"):
        assert not re.search(rf"(?<![\w-]){gone}(?![\w-])", text), gone


def _method_flags() -> dict[str, set[str]]:
    from diffdistill.methods import METHODS

    return {name: {"--" + f.name.replace("_", "-") for f in dataclasses.fields(spec.config_cls)}
            for name, spec in METHODS.items()}


@pytest.mark.parametrize("method", ["lcm", "progressive", "add", "dmd", "sds", "kd", "tiny-decoder"])
def test_help_of_one_method_lists_only_its_flags(method, capsys):
    with pytest.raises(SystemExit) as e:
        main(["distill", "--method", method, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = _method_flags()
    offered = set(re.findall(r"^  (--[\w-]+)", text, re.MULTILINE))  # the option lines (help may cite others)
    assert offered & set().union(*flags.values()) == flags[method]
    assert "--export-guidance-scale" in text and "--max-train-steps" in text  # the run's own flags stay


@pytest.mark.parametrize("argv,needle", [
    (["--method", "sds", "--fake-updates", "2"], "--fake-updates is an option of --method dmd, not of --method sds"),
    (["--method", "sds", "--gan-weight", "1"], "--gan-weight is an option of --method dmd"),
    (["--method", "dmd", "--weighting", "uniform"], "--weighting is an option of --method sds, not of --method dmd"),
    (["--method", "progressive", "--guidance-scale", "7.5"], "run option --export-guidance-scale"),
    (["--method", "sds", "--guidance-scale", "2"], "use --teacher-guidance-scale"),
    (["--recommended-guidance-scale", "2"], "use --export-guidance-scale"),
    (["--uncond-prob", "0.1"], "--uncond-prob"),
])
def test_wrong_method_and_former_flags_are_one_line_usage_errors(argv, needle, tmp_path, capsys):
    assert main(["distill", *argv, "--output", str(tmp_path / "run"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "run").exists()


def test_a_flag_two_methods_define_differently_is_refused_when_the_parser_is_built():
    from diffdistill.cli import build_parser, shared_flags
    from diffdistill.config import SECTIONS, RunConfig, opt

    def toy(**fields):  # a config dataclass with fields name=(default, help)
        return dataclasses.make_dataclass("Toy", [(n, type(d), opt(d, h)) for n, (d, h) in fields.items()])

    A = toy(scale=(2.0, "the teacher's guidance"), steps_a=(1, "a's own"))
    Same = toy(scale=(2.0, "the teacher's guidance"))
    DefaultDiffers = toy(scale=(0.0, "the teacher's guidance"))
    HelpDiffers = toy(scale=(2.0, "the export's guidance"))
    TakesARunFlag = toy(seed=(0, "a method's own seed"))
    assert shared_flags({"a": A, "same": Same}) == {"scale": ["a", "same"], "steps_a": ["a"]}
    for other in (DefaultDiffers, HelpDiffers):
        with pytest.raises(TypeError, match="--scale is declared by a .* and by b"):
            shared_flags({"a": A, "b": other})
    with pytest.raises(TypeError, match="--seed of m"):
        shared_flags({"m": TakesARunFlag}, (RunConfig, *SECTIONS.values()))
    build_parser()  # the real methods' configs pass


def test_export_guidance_scale_is_the_method_choice_unless_given():
    from diffdistill.config import RunConfig
    from diffdistill.methods import build_method_config, get_method

    def recommended(method, export=-1.0, **kw):
        run = RunConfig(method=method, steps=1 if method in ("dmd", "sds") else 4, export_guidance_scale=export)
        return get_method(method).method_cls(build_method_config(method, kw, "test"), run).recommended_guidance_scale

    assert recommended("lcm", w_min=1.0, w_max=3.0) == 2.0  # the middle of the trained range
    assert recommended("lcm", w_min=1.0, w_max=3.0, lora_rank=4, ema_decay=0.0) == 1.0  # baked into a LoRA
    assert recommended("progressive", w_min=2.0, w_max=14.0) == 8.0
    assert recommended("dmd", teacher_guidance_scale=1.75) == 1.0  # the teacher's scale is not the export's
    assert recommended("lcm", 7.5) == 7.5 and recommended("dmd", 1.5, teacher_guidance_scale=4.0) == 1.5


def test_dry_run_prints_resolved_config(tiny_sd, tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("method: lcm\ntrain:\n  learning_rate: 3.0e-5\nmethod_args:\n  w_max: 9\n")
    out = tmp_path / "never"
    assert main(["distill", "--config", str(cfg), "--teacher", tiny_sd, "--output", str(out), "--w-max", "7",
                 "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)["config"]
    assert resolved["train"]["learning_rate"] == 3e-5 and resolved["method_args"]["w_max"] == 7.0
    assert not out.exists()


def test_a_preset_states_only_what_it_changes_from_its_base(tiny_sd, tmp_path, capsys):
    """``base:`` (relative to the preset's folder): the base's values, overridden key by key within each section by
    the variant's, then by flags; a base can itself have a base."""
    (tmp_path / "presets").mkdir()
    (tmp_path / "root.yaml").write_text("method: lcm\nsteps: 4\ntrain:\n  learning_rate: 3.0e-5\n  batch_size: 8\n"
                                        "method_args:\n  w_min: 1.5\n  w_max: 3.0\n")
    (tmp_path / "presets" / "mid.yaml").write_text("base: ../root.yaml\ntrain:\n  batch_size: 4\n"
                                                   "method_args:\n  w_max: 2.0\n")
    (tmp_path / "presets" / "leaf.yaml").write_text("base: mid.yaml\nsteps: 2\ntrain:\n  max_train_steps: 7\n")
    out = tmp_path / "never"
    assert main(["distill", "--config", str(tmp_path / "presets" / "leaf.yaml"), "--teacher", tiny_sd,
                 "--output", str(out), "--batch-size", "2", "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)["config"]
    assert resolved["steps"] == 2 and resolved["method"] == "lcm"
    assert {k: resolved["train"][k] for k in ("learning_rate", "batch_size", "max_train_steps")} == {
        "learning_rate": 3e-5, "batch_size": 2, "max_train_steps": 7}
    assert (resolved["method_args"]["w_min"], resolved["method_args"]["w_max"]) == (1.5, 2.0)
    assert "base" not in resolved and not out.exists()


def _bad_cases(tiny_sd: str, tmp: Path):
    notpipe = tmp / "notpipe"
    notpipe.mkdir(exist_ok=True)
    afile = tmp / "afile.txt"
    afile.write_text("x")
    prompts = tmp / "prompts.txt"
    prompts.write_text("a cat\n")
    badyaml = tmp / "bad.yaml"
    badyaml.write_text("train: [unclosed\n")
    unknown = tmp / "unknown.yaml"
    unknown.write_text("train:\n  learnin_rate: 1\n")
    listed = tmp / "listed.yaml"
    listed.write_text("train:\n  - 1\n  - 2\n")
    cycle_a, cycle_b, orphan = tmp / "cycle_a.yaml", tmp / "cycle_b.yaml", tmp / "orphan.yaml"
    cycle_a.write_text("base: cycle_b.yaml\n")
    cycle_b.write_text("base: cycle_a.yaml\nsteps: 2\n")
    orphan.write_text("base: gone.yaml\n")
    former = tmp / "former.yaml"  # a preset written before --guidance-scale was split in two
    former.write_text("method: add\nmethod_args:\n  guidance_scale: 1.5\n")
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
        # needles: the phrase that names what is wrong, not just the flag (argparse's own "unrecognized
        # arguments: --flag" would match that too)
        ([*d, "--adam-beta1", "2"], "--adam-beta1 must be in [0, 1), got 2.0"),
        ([*d, "--adam-epsilon", "-1"], "--adam-epsilon must be >= 0, got -1.0"),
        ([*d, "--benchmark-samples", "10"], "--benchmark-samples must be 0"),
        ([*d, "--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        ([*d, "--seed", str(2**32)], "--seed must be in [0, 2**32), got 4294967296"),
        ([*d, "--export-guidance-scale", "inf"], "--export-guidance-scale expects a finite number, got 'inf'"),
        # former names: one line naming what replaced them, never silently ignored
        ([*d, "--recommended-guidance-scale", "2"], "use --export-guidance-scale"),
        ([*d, "--method", "lcm", "--guidance-scale", "2"], "run option --export-guidance-scale"),
        ([*d, "--method", "dmd", "--guidance-scale", "2"], "use --teacher-guidance-scale"),
        ([*d, "--uncond-prob", "0.1"], "--uncond-prob (uncond_prob in data settings) was removed"),
        ([*d, "--config", str(former)], "use --teacher-guidance-scale"),
        (["sds", "--prompt", "a", "--guidance-scale", "2"], "use --teacher-guidance-scale"),
        # an option of another method
        ([*d, "--method", "sds", "--fake-updates", "2"], "--fake-updates is an option of --method dmd, not of --method sds"),
        ([*d, "--method", "dmd", "--weighting", "uniform"], "--weighting is an option of --method sds"),
        ([*d, "--method", "add", "--w-min", "2"], "--w-min is an option of --method lcm, progressive"),
        ([*d, "--learning-rate", "inf"], "--learning-rate expects a finite number, got 'inf'"),
        ([*d, "--learning-rate", "1e300"], "--learning-rate 1e+300 is too large"),
        ([*d, "--config", str(listed)], "'train:'"),
        ([*d, "--dataset", str(folders["nulltext"])], "must be a string"),
        ([*d, "--dataset", str(folders["dotdot"])], "file_name '../afile.txt' points outside"),
        ([*d, "--dataset", str(folders["absolute"])], f"file_name '{afile}' points outside"),
        ([*d, "--dataset", str(folders["corrupt"])], "1 of 1 images of"),
        ([*d, "--dataset", str(tmp / "nodata"), "--max-bad-image-fraction", "2"], "--max-bad-image-fraction must be in"),
        # prompts only, for a method that learns from images: refused before the run folder is written
        ([*d, "--dataset", str(prompts)], "consistency distillation needs images: --dataset must hold images"),
        ([*d, "--method", "progressive", "--dataset", str(prompts)], "progressive distillation needs images"),
        ([*d, "--method", "dmd", "--steps", "1", "--gan-weight", "0.1", "--dataset", str(prompts)],
         "--method dmd with --gan-weight > 0 needs images"),
        (["sds", "--prompt", "a", "--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["distill", "--teacher", str(tmp / "missing")], f"teacher not found: {tmp / 'missing'}"),
        (["distill", "--teacher", str(afile)], "is a file but not a .safetensors single-file checkpoint"),
        (["distill", "--teacher", str(notpipe)], "is not a diffusers pipeline (no model_index.json)"),
        ([*d, "--steps", "0"], "--steps must be > 0, got 0"),
        ([*d, "--steps", "four"], "--steps expects an integer, got 'four'"),
        ([*d, "--batch-size", "1.5"], "--batch-size expects an integer, got '1.5'"),
        ([*d, "--method", "magic"], "unknown method 'magic'"),
        ([*d, "--loss-type", "l3"], "--loss-type must be one of l2, huber, got 'l3'"),
        ([*d, "--w-min", "5", "--w-max", "2"], "--w-min (5.0) must not exceed --w-max (2.0)"),
        ([*d, "--lora-rank", "0"], "--lora-rank must be > 0, got 0"),
        ([*d, "--lora-rank", "4", "--ema-decay", "0.9"], "--ema-decay must be 0 with --lora-rank"),
        ([*d, "--learning-rate", "-1"], "--learning-rate must be > 0, got -1.0"),
        ([*d, "--mixed-precision", "fp8"], "--mixed-precision must be one of no, fp16, bf16, got 'fp8'"),
        ([*d, "--steps", "60"], "--steps (60) must not exceed --num-ddim-timesteps (50)"),
        ([*d, "--dataset", str(tmp / "nodata") + "/"], "nodata/': no such folder or file"),
        ([*d, "--config", str(tmp / "missing.yaml")], "config file not found"),
        ([*d, "--config", str(badyaml)], "not valid YAML"),
        ([*d, "--config", str(unknown)], "unknown option(s) learnin_rate in train settings"),
        ([*d, "--config", str(cycle_a)], "'base: cycle_a.yaml' leads back to cycle_a.yaml (a cycle of bases)"),
        ([*d, "--config", str(orphan)], "its base gone.yaml"),
        ([*d, "--gradient-checkpointing", "maybe"], "--gradient-checkpointing expects true/false, got 'maybe'"),
        ([*d, "--enable-xformers"], "--enable-xformers needs xformers"),
        ([*d, "--method", "progressive", "--steps", "3"], "nearest valid values: 2, 4"),
        ([*d, "--method", "add", "--feature-network", "dinov2-giant"],
         "--feature-network 'dinov2-giant': not 'teacher' and not a local model folder"),
        ([*d, "--method", "sds", "--steps", "4"], "--steps must be 1"),
        (["distill", "--teacher", tiny_sd, "--output", str(afile / "sub")], f"{afile} exists and is not a folder"),
        (["bench", str(tmp / "missing"), "--steps", "1", "--output", "OUT"], f"pipeline folder not found: {tmp / 'missing'}"),
        (["bench", str(notpipe), "--steps", "1", "--output", "OUT"],
         f"pipeline folder {notpipe} is not a diffusers pipeline (no model_index.json)"),
        (["bench", tiny_sd, "--steps", "0", "--output", "OUT"], "--steps values must be > 0, got 0"),
        (["bench", tiny_sd, "--steps", "a,b", "--output", "OUT"], "--steps must be a comma list of positive integers, got 'a,b'"),
        (["export", str(notpipe), "--output", "OUT"], f"{notpipe} is not a distill run folder (no config.yaml)"),
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


def _can_write_in(folder: Path) -> bool:
    """Whether this process can create entries in ``folder`` (root can in a 0555 folder: no permission check)."""
    try:
        (folder / "probe").mkdir()
    except PermissionError:
        return False
    (folder / "probe").rmdir()
    return True


@pytest.mark.parametrize("where", ["under a file", "under /proc", "in a read-only folder"])
@pytest.mark.parametrize("command", ["distill", "bench", "export", "sds"])
def test_an_output_no_one_can_write_is_one_line_before_any_work(command, where, tiny_sd, tmp_path, capsys,
                                                                 monkeypatch):
    """Each command probes the folder it writes before it loads anything: a path under a regular file, on a
    virtual filesystem (refused even to root) or without permission is one line, exit 2, and nothing written."""
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "ro").mkdir(mode=0o555)
    if where == "in a read-only folder" and _can_write_in(tmp_path / "ro"):
        pytest.skip("permissions do not stop this process (root); the other two places are refused to root too")
    if where == "under /proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    out, refusal = {
        "under a file": (tmp_path / "file.txt" / "out", f"{tmp_path / 'file.txt'} exists and is not a folder"),
        "under /proc": (Path("/proc/diffdistill-test/out"), "cannot write in /proc"),
        "in a read-only folder": (tmp_path / "ro" / "out", f"cannot write in {tmp_path / 'ro'} (Permission denied)"),
    }[where]

    def work(*args, **kwargs):
        raise AssertionError("work started before --output was checked")

    for loader in ("diffdistill.distill.load_teacher", "diffdistill.export_run.load_teacher",
                   "diffdistill.teachers.load_teacher", "diffdistill.eval.bench.run_bench"):
        monkeypatch.setattr(loader, work)
    argv = {"distill": ["distill", "--teacher", tiny_sd], "bench": ["bench", tiny_sd, "--steps", "1"],
            "export": ["export", str(tmp_path / "no-such-run")],
            "sds": ["sds", "--teacher", tiny_sd, "--prompt", "a handwritten digit 1"]}[command]
    before = sorted(tmp_path.rglob("*"))
    assert main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: --output {out}: {refusal}"), err
    assert sorted(tmp_path.rglob("*")) == before and not out.exists()


def test_a_run_folder_in_a_read_only_folder_is_enough_for_distill_only(tmp_path):
    """distill writes inside its run folder; export, sds and bench build theirs beside it and rename it in."""
    from diffdistill.errors import UserError
    from diffdistill.outputs import check_output

    (tmp_path / "ro" / "out").mkdir(parents=True)
    (tmp_path / "ro").chmod(0o555)
    try:
        if _can_write_in(tmp_path / "ro"):
            pytest.skip("permissions do not stop this process (root)")
        assert check_output(tmp_path / "ro" / "out", "distill", overwrite=False) is False
        with pytest.raises(UserError, match=f"cannot write in {tmp_path / 'ro'} "):
            check_output(tmp_path / "ro" / "out", "export", overwrite=False)
    finally:
        (tmp_path / "ro").chmod(0o755)

