"""Loading teachers and benchmarked pipelines: weight variants, hub flags, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from diffdistill.cli import main
from diffdistill.digits import DIGITS_MARKER
from diffdistill.errors import UserError
from diffdistill.eval import config, sampling
from diffdistill.teachers import load_teacher


@pytest.fixture(scope="module")
def fp16_only(tmp_path_factory):
    """The tiny digits-SD pipeline saved with only ``*.fp16.safetensors`` weights (a variant-only folder)."""
    from diffdistill.tiny_pipelines import build_pipeline

    folder = tmp_path_factory.mktemp("fp16-only") / "pipe"
    build_pipeline().save_pretrained(str(folder), safe_serialization=True, variant="fp16")
    (folder / "diffdistill.json").write_text(json.dumps(DIGITS_MARKER))
    assert not list(folder.glob("unet/*model.safetensors")) and list(folder.glob("unet/*.fp16.safetensors"))
    return str(folder)


def _one_line_error(argv, capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (argv, err)
    return err


def test_a_variant_only_teacher_names_the_variant_flag(fp16_only, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    err = _one_line_error(["distill", "--teacher", fp16_only, "--output", str(out), "--max-train-steps", "1"], capsys)
    assert "pass --variant fp16" in err and not out.exists()
    err = _one_line_error(["distill", "--teacher", fp16_only, "--variant", "bf16", "--output", str(out)], capsys)
    assert "no bf16 ones" in err and not out.exists()
    teacher = load_teacher(fp16_only, variant="fp16")
    assert teacher.unet.dtype == torch.float32


def test_bench_takes_the_loading_flags_of_distill(fp16_only, tiny_sd, tmp_path, capsys, one_thread):
    out = tmp_path / "report"
    err = _one_line_error(["bench", fp16_only, "--output", str(out), "--no-cache"], capsys)
    assert "pass --variant fp16" in err and not out.exists()
    err = _one_line_error(["bench", "nobody-here/no-such-pipeline", "--local-files-only", "--output", str(out)], capsys)
    assert "cannot fetch pipeline folder 'nobody-here/no-such-pipeline'" in err and not out.exists()
    cfg = config.BenchConfig(pipelines=[fp16_only], variant="fp16", output=str(out), num_samples=100)
    assert cfg.labels == ["pipe"] and not out.exists()
    pipe = sampling.load_pipeline(fp16_only, torch.device("cpu"), torch.float32, cfg.variant)
    assert pipe.unet.dtype == torch.float32
    with pytest.raises(UserError, match="drop --variant"):
        config.BenchConfig(pipelines=[tiny_sd], variant="fp16", output=str(out), num_samples=100)


class _OpensAFile:
    """Unpickling this creates a file: what a malicious weights file would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    """The tiny pipeline with pickled ``.bin`` UNet and VAE weights: (plain folder, folder whose UNet pickle
    carries code, the file that code would create)."""
    import shutil

    from diffdistill.tiny_pipelines import build_pipeline

    root = tmp_path_factory.mktemp("pickled")
    plain, evil, victim = root / "plain", root / "evil", root / "PWNED"
    build_pipeline().save_pretrained(str(plain), safe_serialization=False)
    assert (plain / "unet" / "diffusion_pytorch_model.bin").is_file()
    shutil.copytree(plain, evil)
    unet_bin = evil / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(unet_bin, weights_only=True)
    torch.save({**state, "payload": _OpensAFile(str(victim))}, unet_bin)
    return str(plain), str(evil), victim


def test_pickled_weights_load_safely_and_a_code_carrying_pickle_is_refused(pickled, tmp_path, capsys, one_thread):
    plain, evil, victim = pickled
    assert load_teacher(plain).unet is not None  # plain tensors in a pickle: weights_only=True loads them
    out = tmp_path / "run"
    err = _one_line_error(["distill", "--teacher", evil, "--output", str(out), "--max-train-steps", "1"], capsys)
    assert "refused the pickled weights file" in err and "diffusion_pytorch_model.bin" in err and "open" in err
    assert "weights_only=True" in err and not out.exists() and not victim.exists()
    # In a process of its own (diffusers' loggers write to the real stderr, which capsys does not see): one line.
    r = subprocess.run([sys.executable, "-m", "diffdistill.cli", "distill", "--teacher", evil, "--output", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.strip() == err and not out.exists() and not victim.exists(), r.stderr
    with pytest.raises(UserError, match="refused the pickled weights file") as e:
        sampling.load_pipeline(evil, torch.device("cpu"), torch.float32)
    assert len(str(e.value).splitlines()) == 1 and not victim.exists()


def test_bench_needs_reference_and_prompts_for_a_pipeline_that_is_not_digits(tiny_sd, tmp_path, capsys, one_thread):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_sd, other)
    (other / "diffdistill.json").unlink()  # a plain diffusers folder: nothing says it draws digits
    out, cache_dir = tmp_path / "report", str(tmp_path / "cache")
    for extra, missing in (([], "--reference and --prompts"), (["--reference", "digits"], "give --prompts,")):
        err = _one_line_error(["bench", tiny_sd, str(other), *extra, "--output", str(out), "--cache-dir", cache_dir],
                              capsys)
        assert "other is not a digits pipeline" in err and missing in err, err
    assert not out.exists() and not (tmp_path / "cache").exists()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    cfg = config.BenchConfig(pipelines=[str(other)], reference="digits", prompts=str(prompts), output=str(out),
                             num_samples=100)
    assert cfg.reference == "digits" and not out.exists()
    # digits-SD and its students (the tiny one here) keep the digits defaults.
    assert config.BenchConfig(pipelines=[tiny_sd], output=str(out), num_samples=100).reference == "digits"
