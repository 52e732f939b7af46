"""Single-file checkpoints (one .safetensors in the original SD layout) as teachers and benchmarked pipelines."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from sd_single_file import save_single_file

from diffdistill.cli import main
from diffdistill.teachers import load_teacher


def _same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        x, y = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.fixture(scope="module")
def single_file(tiny_sd, tmp_path_factory):
    """The tiny random digits-SD pipeline written as one original-layout .safetensors file."""
    from diffusers import StableDiffusionPipeline

    path = tmp_path_factory.mktemp("single") / "tiny-sd.safetensors"
    return save_single_file(StableDiffusionPipeline.from_pretrained(tiny_sd), path)


@pytest.mark.slow
def test_a_single_file_saved_from_digits_sd_round_trips_with_the_default_config(tmp_path, one_thread):
    """The shipped digits-SD as a single file loads with the default --single-file-config (assets/digits-sd):
    every weight, the scheduler and the VAE scaling factor as in the folder."""
    shipped = load_teacher("assets/digits-sd")
    path = save_single_file(shipped.pipe, tmp_path / "digits-sd.safetensors")
    again = load_teacher(path)
    _same_weights(shipped.pipe, again.pipe)
    assert again.scheduler.config == shipped.scheduler.config
    assert again.vae.config.scaling_factor == shipped.vae.config.scaling_factor
    assert torch.equal(again.schedule.alphas_cumprod, shipped.schedule.alphas_cumprod)


@pytest.mark.slow
def test_distill_and_bench_a_single_file_teacher(single_file, tiny_sd, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert main(["distill", "--method", "lcm", "--teacher", single_file, "--single-file-config", tiny_sd,
                 "--output", str(out), "--max-train-steps", "2", "--batch-size", "2", "--checkpointing-steps", "0",
                 "--validation-steps", "0", "--benchmark-samples", "0", "--num-ddim-timesteps", "10",
                 "--lr-warmup-steps", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_steps"] == 2 and summary["teacher"] == single_file
    from diffusers import StableDiffusionPipeline

    exported, teacher = StableDiffusionPipeline.from_pretrained(str(out / "pipeline")), load_teacher(tiny_sd)
    # the export carries the single file's VAE and text encoder, bit for bit
    for name in ("vae", "text_encoder"):
        x, y = getattr(exported, name).state_dict(), getattr(teacher.pipe, name).state_dict()
        assert all(torch.equal(x[k], y[k]) for k in x), name
    report = tmp_path / "report"
    assert main(["bench", single_file, "--single-file-config", tiny_sd, "--steps", "1", "--num-samples", "65",
                 "--batch-size", "65", "--bootstrap", "200", "--output", str(report), "--no-cache",
                 "--no-progress"]) == 0
    lines = json.loads((report / "report.json").read_text())["lines"]
    assert [line["label"] for line in lines] == ["tiny-sd"] and lines[0]["results"][0]["steps"] == 1


def test_a_config_of_another_size_or_a_pickle_is_one_line_and_writes_nothing(single_file, tiny_sd, tmp_path, capsys):
    wrong = tmp_path / "wider"
    shutil.copytree(tiny_sd, wrong)
    cfg = json.loads((wrong / "unet" / "config.json").read_text())
    (wrong / "unet" / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 64}))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"a pickle")
    out = tmp_path / "out"
    cases = [
        (["distill", "--teacher", single_file, "--single-file-config", str(wrong), "--output", str(out)],
         f"cannot load teacher {single_file} with the configs of {wrong}: "),
        (["distill", "--teacher", single_file, "--single-file-config", str(wrong), "--output", str(out)],
         "the config's down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight expected shape "
         "torch.Size([64, 64]), but got torch.Size([64, 32]); --single-file-config must name a "
         "diffusers folder of the same family and size as"),
        (["bench", single_file, "--single-file-config", str(wrong), "--output", str(out), "--steps", "1"],
         f"cannot load pipeline folder {single_file} with the configs of {wrong}: "),
        (["distill", "--teacher", single_file, "--single-file-config", str(tmp_path / "nope"), "--output", str(out)],
         f"--single-file-config folder not found: {tmp_path / 'nope'}"),
        (["distill", "--teacher", str(ckpt), "--output", str(out)], "a .ckpt or .pt file is a pickle"),
    ]
    for argv, needle in cases:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, (argv, err)
        assert not out.exists()
