"""Evaluation: the digits classifier, the torch-fidelity feature extractor and metrics, and `diffdistill bench`.

Everything runs on a randomly initialised digits-SD-shaped pipeline built in-process (a few seconds), with
20 samples and 1-2 steps, so the whole file stays well under a minute on two busy CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from diffdistill.digits import DIGIT_PROMPTS, digits_uint8, load_digits_8x8, load_digits_32
from diffdistill.errors import UserError
from diffdistill.eval import bench, fidelity
from diffdistill.eval.digits_classifier import (
    DEFAULT_CLASSIFIER_DIR,
    DigitsClassifier,
    load_digits_classifier,
    save_digits_classifier,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny torch and BLAS ops on 2 cores shared with other jobs run far faster single-threaded (no spin-waits)."""
    from threadpoolctl import threadpool_limits  # ships with scikit-learn

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A digits-SD-shaped StableDiffusionPipeline with random weights, saved with save_pretrained."""
    from diffusers import StableDiffusionPipeline

    spec = importlib.util.spec_from_file_location("train_digits_sd", REPO / "train_scripts" / "train_digits_sd.py")
    tds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tds)
    root = tmp_path_factory.mktemp("tiny-sd")
    tokenizer = tds.build_tokenizer(root / "tok")
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=tds.build_vae(), text_encoder=tds.build_text_encoder(tokenizer, 0), tokenizer=tokenizer,
        unet=tds.build_unet(), scheduler=tds.build_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    out = root / "pipe"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def real_digits() -> torch.Tensor:
    """All 1,797 real digits as uint8 (N, 3, 32, 32)."""
    return digits_uint8(load_digits_32()[0])


# ---------------------------------------------------------------------------------------------- classifier

def test_classifier_reads_the_digits_set():
    clf = load_digits_classifier()
    images, labels = load_digits_8x8()
    acc_8 = (clf.predict(images) == labels).float().mean().item()
    up, _ = load_digits_32()
    acc_32 = (clf.predict((up + 1) / 2) == labels).float().mean().item()
    assert acc_8 >= 0.95
    # Nearest-upscaled 32x32 RGB digits pool back to the same 8x8 grid: identical accuracy.
    assert acc_32 == pytest.approx(acc_8)
    assert clf.features(images[:4]).shape == (4, 64)


def test_classifier_accepts_every_input_layout():
    torch.manual_seed(0)
    clf = DigitsClassifier().eval()
    x8 = torch.rand(3, 8, 8)
    x32 = torch.nn.functional.interpolate(x8[:, None], scale_factor=4, mode="nearest").repeat(1, 3, 1, 1)
    ref = clf(x8)
    assert ref.shape == (3, 10)
    torch.testing.assert_close(clf(x8[:, None]), ref)
    torch.testing.assert_close(clf(x32), ref)


def test_classifier_asset_is_safetensors_with_config():
    assert (DEFAULT_CLASSIFIER_DIR / "model.safetensors").is_file()
    config = json.loads((DEFAULT_CLASSIFIER_DIR / "config.json").read_text())
    assert config["architecture"] == "DigitsClassifier"
    assert config["training"]["val_accuracy"] >= 0.97
    assert not list(DEFAULT_CLASSIFIER_DIR.glob("*.pt*")) and not list(DEFAULT_CLASSIFIER_DIR.glob("*.bin"))


def test_classifier_missing_folder_is_user_error(tmp_path):
    with pytest.raises(UserError, match="digits classifier not found"):
        load_digits_classifier(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------- fidelity

def test_feature_extractor_registered_and_torch_fidelity_computes(real_digits):
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert FEATURE_EXTRACTORS_REGISTRY[fidelity.DIGITS_EXTRACTOR] is fidelity.DigitsClassifierFeatureExtractor
    fidelity.register_digits_feature_extractor()  # idempotent
    out = torch_fidelity.calculate_metrics(
        input1=fidelity.ImageTensorDataset(real_digits[:40]), input2=fidelity.ImageTensorDataset(real_digits[40:100]),
        feature_extractor=fidelity.DIGITS_EXTRACTOR, isc=True, fid=True, kid=True, kid_subset_size=20,
        cuda=False, cache=False, verbose=False, save_cpu_ram=True)
    for key in (torch_fidelity.KEY_METRIC_FID, torch_fidelity.KEY_METRIC_ISC_MEAN, torch_fidelity.KEY_METRIC_KID_MEAN):
        assert math.isfinite(out[key])


def test_fid_real_vs_real_much_smaller_than_vs_noise(real_digits):
    perm = torch.randperm(real_digits.shape[0], generator=torch.Generator().manual_seed(0))
    half_a, half_b = real_digits[perm[:900]], real_digits[perm[900:]]
    noise = torch.randint(0, 256, half_a.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    real = fidelity.compute_metrics(half_a, half_b, kid_subset_size=200)
    fake = fidelity.compute_metrics(noise, half_b, kid_subset_size=200)
    assert set(real) == {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std"}
    assert all(math.isfinite(v) for v in [*real.values(), *fake.values()])
    assert real["fid"] * 20 < fake["fid"]
    assert real["kid_mean"] * 20 < fake["kid_mean"]
    assert real["isc_mean"] > 5 > fake["isc_mean"]  # ten well-separated classes vs one blur


def test_compute_metrics_clamps_kid_subset_and_splits(real_digits):
    out = fidelity.compute_metrics(real_digits[:5], "digits", kid_subset_size=1000, isc_splits=10)
    assert all(math.isfinite(v) for v in out.values())


def test_feature_cache_key_includes_weights(real_digits, tmp_path):
    # torch-fidelity keys its cache by input and extractor name only; ours adds the weights hash.
    other = load_digits_classifier()
    with torch.no_grad():
        other.fc.weight.mul_(2.0)
    save_digits_classifier(other, tmp_path / "clf2")
    kw = dict(kid_subset_size=50, cache_dir=tmp_path / "cache")
    base = fidelity.compute_metrics(real_digits[:100], real_digits[100:300], **kw)
    changed = fidelity.compute_metrics(real_digits[:100], real_digits[100:300], classifier_path=tmp_path / "clf2", **kw)
    again = fidelity.compute_metrics(real_digits[:100], real_digits[100:300], **kw)
    assert changed["fid"] != pytest.approx(base["fid"])
    assert again["fid"] == pytest.approx(base["fid"])


def test_inception_without_local_weights_is_user_error(real_digits, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    with pytest.raises(UserError, match="inception-v3-compat needs local weights"):
        fidelity.compute_metrics(real_digits[:10], real_digits[10:20], feature_extractor="inception-v3-compat")
    with pytest.raises(UserError, match="not found"):
        fidelity.compute_metrics(real_digits[:10], real_digits[10:20], feature_extractor="inception-v3-compat",
                                 inception_weights=tmp_path / "missing.pth")


def test_bad_images_are_user_errors(real_digits):
    with pytest.raises(UserError, match="uint8"):
        fidelity.compute_metrics(real_digits[:10].float(), "digits")
    with pytest.raises(UserError, match="at least 2"):
        fidelity.compute_metrics(real_digits[:1], "digits")


# ---------------------------------------------------------------------------------------------- bench

def make_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="diffdistill")
    bench.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_bench_cli_writes_report(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "report"
    args = make_cli(["bench", str(tiny_pipeline), "--steps", "2,1", "--num-samples", "20", "--batch-size", "10",
                     "--scheduler", "default,euler", "--guidance", "1.5", "--label", "tiny", "--output", str(out),
                     "--no-progress"])
    assert args.func(args) == 0
    assert "| tiny | euler | 1.5 | 2 |" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file() and (out / "fid_vs_steps.png").stat().st_size > 0
    assert [line["name"] for line in report["lines"]] == ["tiny [default]", "tiny [euler]"]
    assert report["lines"][1]["scheduler_class"] == "EulerDiscreteScheduler"
    for line in report["lines"]:
        assert [r["steps"] for r in line["results"]] == [1, 2]
        for r in line["results"]:
            assert all(math.isfinite(r[k]) for k in ("fid", "isc_mean", "kid_mean", "seconds_per_image"))
            assert 0.0 <= r["prompt_accuracy"] <= 1.0 and r["peak_memory_mb"] > 0 and r["nfe"] == r["steps"]
            assert (out / r["grid"]).is_file()
    assert len(list((out / "grids").glob("*.png"))) == 4
    md = (out / "report.md").read_text()
    assert bench.report_markdown_table(report) in md
    # A second run into the same folder needs --overwrite, and then replaces the whole report.
    with pytest.raises(UserError, match="--overwrite"):
        bench.BenchConfig(pipelines=[str(tiny_pipeline)], output=str(out))
    again = bench.run_bench(bench.BenchConfig(pipelines=[str(tiny_pipeline)], output=str(out), steps="1",
                                              num_samples=4, guidance=1.0, overwrite=True, progress=False))
    assert [line["name"] for line in again["lines"]] == ["pipe"]
    assert len(list((out / "grids").glob("*.png"))) == 1


def test_same_seeds_at_any_batch_size(tiny_pipeline):
    pipe = bench.load_pipeline(str(tiny_pipeline), torch.device("cpu"), torch.float32)
    prompts = DIGIT_PROMPTS[:6]
    a, _, nfe = bench.sample_cell(pipe, prompts, 1, 1.5, seed=3, batch_size=6, device=torch.device("cpu"))
    b, _, _ = bench.sample_cell(pipe, prompts, 1, 1.5, seed=3, batch_size=4, device=torch.device("cpu"))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.uint8 and nfe == 1
    assert (a.int() - b.int()).abs().max() <= 1  # image i depends on seed + i only, not on batching


@pytest.mark.parametrize("steps", ["0", "a,b", "1,-2", "", "1.5"])
def test_bad_steps_are_user_errors(tiny_pipeline, tmp_path, steps):
    with pytest.raises(UserError, match="steps"):
        bench.BenchConfig(pipelines=[str(tiny_pipeline)], output=str(tmp_path / "r"), steps=steps)
    assert not (tmp_path / "r").exists()


def test_bad_pipeline_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="pipeline folder not found"):
        bench.BenchConfig(pipelines=[str(tmp_path / "missing")], output=str(tmp_path / "r"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model_index.json"):
        bench.BenchConfig(pipelines=[str(tmp_path / "empty")], output=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_other_bad_inputs_are_user_errors(tiny_pipeline, tmp_path, monkeypatch):
    p, out = str(tiny_pipeline), str(tmp_path / "r")
    cases = [
        (dict(schedulers="ddim,warp"), "unknown scheduler"),
        (dict(labels=["a", "b"]), "one --label per pipeline"),
        (dict(prompts=str(tmp_path / "none.txt")), "prompts file not found"),
        (dict(guidance="x"), "--guidance"),
        (dict(num_samples=1), "--num-samples"),
        (dict(reference=str(tmp_path / "no-such-folder")), "--reference"),
    ]
    if not torch.cuda.is_available():
        cases.append((dict(device="cuda"), "CUDA is not available"))
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            bench.BenchConfig(pipelines=[p], output=out, **kwargs)
    # --overwrite never deletes a folder that is not a bench report.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("...")
    with pytest.raises(UserError, match="no bench report.json"):
        bench.BenchConfig(pipelines=[p], output=str(tmp_path / "precious"), overwrite=True)
    # A non-digits reference defaults to Inception, which needs a local weights file.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    ref = tmp_path / "ref"
    ref.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (32, 32), (i * 100, 0, 0)).save(ref / f"{i}.png")
    with pytest.raises(UserError, match="inception-v3-compat needs local weights"):
        bench.BenchConfig(pipelines=[p], output=out, reference=str(ref))
    assert not (tmp_path / "r").exists()


def test_scheduler_overrides(tiny_pipeline, tmp_path):
    from diffusers import DDIMScheduler

    base = DDIMScheduler.from_pretrained(tiny_pipeline / "scheduler")
    sched = bench.make_scheduler("ddim:timestep_spacing=trailing", base)
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [999]  # "leading" (the folder's setting) would give [1]
    assert bench.make_scheduler("pndm", base).config.skip_prk_steps is True
    assert bench.make_scheduler("default:clip_sample=true", base).config.clip_sample is True
    out = str(tmp_path / "r")
    bench.BenchConfig(pipelines=[str(tiny_pipeline)], output=out, schedulers="default:timestep_spacing=trailing")
    with pytest.raises(UserError, match="no config field"):
        bench.BenchConfig(pipelines=[str(tiny_pipeline)], output=out, schedulers="euler:bogus=1")
    with pytest.raises(UserError, match="key=value"):
        bench.BenchConfig(pipelines=[str(tiny_pipeline)], output=out, schedulers="ddim:trailing")


def test_guidance_default_comes_from_diffdistill_json(tmp_path):
    assert bench.read_recommended_guidance(tmp_path) is None
    (tmp_path / "diffdistill.json").write_text(json.dumps({"recommended_guidance_scale": 1.5}))
    assert bench.read_recommended_guidance(tmp_path) == 1.5


def test_parse_helpers():
    assert bench.parse_steps("8, 1,2,2") == [1, 2, 8]
    assert bench.parse_guidance("1,1.5") == [1.0, 1.5]
    assert bench.parse_guidance(None) is None
    assert bench.unique_labels(["a/x", "b/x"]) == ["x", "x-2"]


def test_markdown_table_shows_failed_cells():
    report = {"lines": [{"name": "m", "label": "m", "scheduler": "pndm", "guidance_scale": 7.5, "results": [
        {"steps": 1, "error": "ValueError: too few steps"},
        {"steps": 4, "nfe": 4.0, "fid": 1.0, "isc_mean": 2.0, "isc_std": 0.1, "kid_mean": 0.01, "kid_std": 0.001,
         "prompt_accuracy": None, "seconds_per_image": 0.5, "peak_memory_mb": 100.0}]}]}
    table = bench.report_markdown_table(report)
    assert "failed: ValueError: too few steps" in table
    assert "| m | pndm | 7.5 | 4 | 4 | 1.000 |" in table
    assert len(table.strip().splitlines()) == 4


def test_help_has_text_for_every_flag():
    parser = argparse.ArgumentParser(prog="diffdistill")
    sub = parser.add_subparsers()
    p = bench.add_parser(sub)
    for action in p._actions:
        assert action.help, action.dest
        if action.option_strings and action.dest not in ("help", "output"):
            assert "default" in action.help, action.dest


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
