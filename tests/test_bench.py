"""``diffdistill bench``: intervals, the real-data floor, paired comparisons, caching, CLIP score, bad input.

The report tests sample a random-weight digits-SD pipeline (conftest ``tiny_sd``) at the smallest N the
64-d digits features allow (65); the verdict test samples the shipped teacher, whose 1- and 50-step
samples really differ. Metric tests run on real digits' features without sampling.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerance import assert_close_at_scale

from diffdistill.cli import main
from diffdistill.digits import DIGIT_PROMPTS, digits_uint8, load_digits_32
from diffdistill.errors import UserError
from diffdistill.eval import bench, cache, config, fidelity, metrics, report, sampling
from diffdistill.eval.cli import add_parser

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "assets" / "digits-sd"
N = 65  # the smallest sample count 64-d features allow


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: single-threaded torch and BLAS


@pytest.fixture(scope="module")
def real_set() -> metrics.SampleSet:
    """Features of all 1,797 real digits with the shipped classifier."""
    images = digits_uint8(load_digits_32()[0])
    feats = fidelity.extract_features(images, fidelity.DIGITS_EXTRACTOR, fidelity.extractor_weights(
        fidelity.DIGITS_EXTRACTOR, None, None))
    return metrics.SampleSet(feats["features"], feats["logits"])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIP with tiny dims, saved with the digits-SD tokenizer and an image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    tok = CLIPTokenizer.from_pretrained(str(TEACHER / "tokenizer"))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=tok.model_max_length),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def _is_wilson(stats: dict, key: str, count: int) -> bool:
    """``stats[key + '_ci']`` is the Wilson interval of the proportion ``stats[key]`` over ``count`` trials."""
    successes = round(stats[key] * count)
    return stats[f"{key}_ci"] == pytest.approx(metrics.wilson_interval(successes, count, 0.95), abs=1e-9)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="diffdistill")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------------------------------------- intervals

def test_wilson_interval_known_values():
    lo, hi = metrics.wilson_interval(0, 10, 0.95)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-3)  # the textbook 0-of-10 upper bound
    lo, hi = metrics.wilson_interval(50, 100, 0.95)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-3)


def test_basic_bootstrap_covers_population_fid_where_percentile_does_not():
    # Two Gaussians with the same covariance and means 0.5 apart: population FID 0.25. At N = 200 the point
    # estimate is biased upward and the bootstrap replicates more so: the percentile interval misses the truth.
    rng = np.random.default_rng(0)
    basic_hits = percentile_hits = 0
    for trial in range(8):
        gen = torch.tensor(rng.normal(size=(200, 8)), dtype=torch.float32)
        gen[:, 0] += 0.5
        ref = torch.tensor(rng.normal(size=(400, 8)), dtype=torch.float32)
        rs = metrics.Resampler(200, 400, 200, trial)
        refstats = metrics.ReferenceStats(ref, rs.ref)
        fid = metrics.fid_from_statistics(metrics.fid_statistics(gen), refstats.full)
        reps = metrics.fid_replicates(gen, rs.gen, refstats)
        lo, hi = metrics.basic_interval(fid, reps, 0.95)
        basic_hits += lo <= 0.25 <= hi
        plo, phi = np.quantile(reps, [0.025, 0.975])
        percentile_hits += plo <= 0.25 <= phi
    assert basic_hits >= 7 and percentile_hits <= 2


def test_prc_indicators_match_torch_fidelity(real_set):
    from torch_fidelity.metric_prc import prc_features_to_metric

    gen, ref = real_set.features[:300] * 1.1, real_set.features[300:900]
    prec, rec = metrics.prc_indicators(gen, ref, 3)
    tf = prc_features_to_metric(gen, ref, prc_neighborhood=3, save_cpu_ram=True, verbose=False)
    # Both sides threshold float32 distances; torch-fidelity computes the recall distances as cdist(ref, gen), we
    # as cdist(gen, ref).T: another GEMM, summed in another order, may move a sample that sits on a ball's edge
    # (within ~1e-6) across it. One such flip is allowed; a wrong k or a swapped role changes dozens.
    assert float(prec.mean()) == pytest.approx(tf["precision"], abs=1.5 / len(gen))
    assert float(rec.mean()) == pytest.approx(tf["recall"], abs=1.5 / len(ref))


def test_floor_intervals_in_range_and_shrink_with_n(real_set):
    widths = {}
    for n in (100, 800):
        rs = metrics.Resampler(n, len(real_set), 200, 0)
        refstats = metrics.ReferenceStats(real_set.features, rs.ref)
        stats, info = metrics.real_floor(real_set, refstats, rs, 0.95, 1000, 3, 0)
        s = stats.summary
        assert info == {"mode": "disjoint", "num_real": n, "num_reference": len(real_set) - n}
        assert s["fid"] > 0 and s["fid_ci"][0] < s["fid_ci"][1]  # two different real sets: FID > 0, a real interval
        # Wilson's interval of each proportion over its own count (the held-out reals stand in for samples)
        assert _is_wilson(s, "precision", n) and _is_wilson(s, "recall", len(real_set) - n)
        assert s["isc_mean"] > 3 and math.isfinite(s["kid_mean"])
        widths[n] = (s["fid_ci"][1] - s["fid_ci"][0], s["precision_ci"][1] - s["precision_ci"][0])
    assert widths[800][0] < widths[100][0] / 2 and widths[800][1] < widths[100][1] / 2
    mode, real_idx, ref_idx = metrics.floor_split(len(real_set), 1000, 0)  # the digits reference at N = 1000
    assert mode == "resampled" and len(real_idx) == 1000 and len(ref_idx) == len(real_set)


def test_compare_same_pipeline_other_seeds_is_not_resolved(real_set):
    pipe = sampling.load_pipeline(str(TEACHER), torch.device("cpu"), torch.float32)
    prompts = [DIGIT_PROMPTS[i % 10] for i in range(N)]
    inst = bench.Instruments(config.BenchConfig(pipelines=[str(TEACHER)], output="unused", num_samples=N),
                             torch.device("cpu"), fidelity.extractor_weights(fidelity.DIGITS_EXTRACTOR, None, None),
                             False)
    rs = metrics.Resampler(N, len(real_set), 200, 0)
    refstats = metrics.ReferenceStats(real_set.features, rs.ref)
    cells = []
    for seed in (0, 10_000):
        images, _, _ = sampling.sample_cell(pipe, prompts, 2, 1.0, seed, N, torch.device("cpu"))
        cells.append(metrics.cell_stats(inst.measure(images, None, None), real_set, refstats, rs.gen, 0.95, 1000, 3))
    diff = metrics.compare(cells[0], cells[1], 0.95)
    assert not diff["fid"]["resolved"] and diff["fid"]["ci"][0] < 0 < diff["fid"]["ci"][1]
    assert "not resolved at 95%" in metrics.verdict("fid", diff["fid"], "a", "b", 0.95)


# ---------------------------------------------------------------------------------------------- the bench

def test_teacher_one_step_vs_fifty_is_resolved(tmp_path, capsys):
    out = tmp_path / "report"
    code = run_cli(["bench", str(TEACHER), "--steps", "1,50", "--guidance", "1", "--num-samples", str(N),
                    "--batch-size", str(N), "--bootstrap", "200", "--compare", "1:50", "--output", str(out), "--no-cache",
                    "--no-warmup", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    (comp,) = rep["comparisons"]
    assert comp["a"] == "digits-sd, 1 step" and comp["b"] == "digits-sd, 50 steps"
    fid = comp["metrics"]["fid"]
    assert fid["resolved"] and fid["ci"][0] > 0  # one DDIM step is resolved as worse
    assert "digits-sd, 50 steps is better than digits-sd, 1 step, resolved at 95%" in printed
    assert rep["real_floor"]["mode"] == "disjoint"  # 65 real digits held out, 1,732 left as its reference


def test_bench_report_with_intervals_floor_clip_and_cache(tiny_sd, tiny_clip, tmp_path, capsys):
    out, cache_dir = tmp_path / "report", tmp_path / "cache"
    argv = ["bench", tiny_sd, "--steps", "2,1", "--num-samples", str(N), "--batch-size", "33", "--schedulers",
            "default,euler", "--guidance", "1.5", "--labels", "tiny", "--bootstrap", "200", "--clip-model",
            str(tiny_clip), "--compare", "1:2", "--cache-dir", str(cache_dir), "--output", str(out), "--no-progress"]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "| tiny | euler | 1.5 | 2 |" in printed and "| real data (65, disjoint) |" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["version"] == bench.REPORT_VERSION == 2
    assert rep["intervals"]["confidence"] == 0.95 and rep["intervals"]["bootstrap"] == 200
    assert (out / "report.md").is_file() and (out / "fid_vs_steps.png").stat().st_size > 0
    assert [line["name"] for line in rep["lines"]] == ["tiny [default]", "tiny [euler]"]
    assert rep["lines"][1]["scheduler_class"] == "EulerDiscreteScheduler"
    for line in rep["lines"]:
        assert [r["steps"] for r in line["results"]] == [1, 2]
        for r in line["results"]:
            assert not r["cached"] and r["nfe"] == r["steps"] and (out / r["grid"]).is_file()
            assert r["fid"] > 0 and r["fid_ci"][0] < r["fid_ci"][1]
            # Wilson's interval of each proportion over its own count: N samples, or the whole digits reference
            assert all(_is_wilson(r, key, count) for key, count in
                       (("precision", N), ("recall", fidelity.reference_size("digits")), ("prompt_accuracy", N)))
            assert r["clip_score_ci"][0] <= r["clip_score"] <= r["clip_score_ci"][1]
            assert r["vs_real"]["resolved"] and r["vs_real"]["difference"] > 0  # random weights: worse than real
    assert len(rep["comparisons"]) == 2  # 1 vs 2 steps on each line
    assert {"fid", "precision", "recall", "prompt_accuracy", "clip_score"} == set(rep["comparisons"][0]["metrics"])
    md = (out / "report.md").read_text()
    assert report.report_markdown_table(rep) in md and "basic (reverse-percentile) bootstrap" in md
    assert "## Comparisons (paired bootstrap)" in md and "CLIP ↑" in md
    # The cache holds safetensors only (no pickles), keyed by content: a second run samples nothing.
    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert files and all(p.suffix == ".safetensors" for p in files)
    assert len(list((cache_dir / "cells").iterdir())) == 4 and len(list((cache_dir / "reference").iterdir())) == 1
    again = bench.run_bench(_config(argv, overwrite=True))
    for old, new in zip(rep["lines"], again["lines"]):
        for a, b in zip(old["results"], new["results"]):
            assert b["cached"] and b["fid"] == a["fid"] and b["fid_ci"] == a["fid_ci"]
            assert b["seconds_per_image"] == a["seconds_per_image"]
    assert len(list((out / "grids").glob("*.png"))) == 4
    # Changing the weights' content (not the name) misses the cache.
    renamed = tmp_path / "renamed"
    import shutil

    shutil.copytree(tiny_sd, renamed)
    assert cache.folder_fingerprint(renamed) == cache.folder_fingerprint(tiny_sd)
    (renamed / "scheduler" / "scheduler_config.json").write_text(
        (renamed / "scheduler" / "scheduler_config.json").read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert cache.folder_fingerprint(renamed) != cache.folder_fingerprint(tiny_sd)


def _config(argv: list[str], **overrides) -> config.BenchConfig:
    """The BenchConfig a command line builds (as cmd_bench does), with ``overrides``."""
    from diffdistill.config import build_dataclass

    parser = argparse.ArgumentParser(prog="diffdistill")
    add_parser(parser.add_subparsers(dest="command"))
    values = {k: v for k, v in vars(parser.parse_args(argv)).items() if k not in ("func", "command")}
    return build_dataclass(config.BenchConfig, {**values, **overrides}, "bench options")


def _bad_cases(tiny_sd: str, tmp: Path) -> list[tuple[list[str], str]]:
    base = ["bench", tiny_sd, "--steps", "1,4", "--num-samples", str(N)]
    return [
        (["bench", tiny_sd, "--num-samples", "64"], "--num-samples 64 is too small"),
        ([*base, "--compare", "pipelines"], "--compare pipelines needs exactly two pipeline folders"),
        ([*base, "--compare", "1:8"], "8 steps is not among --steps"),
        ([*base, "--compare", "1"], "must look like A:B"),
        ([*base, "--compare", "pipe@1:4"], "on both sides or on neither"),
        ([*base, "--clip-model", str(tmp / "no-clip")], f"--clip-model {tmp / 'no-clip'}: folder not found"),
        ([*base, "--bootstrap", "50"], "--bootstrap 50 is too few"),
        ([*base, "--confidence", "1.5"], "--confidence must be in [0.5, 1), got 1.5"),
        ([*base, "--schedulers", "ddim,warp"], "unknown scheduler 'warp'"),
        ([*base, "--labels", "a,b"], "one label per pipeline"),
        ([*base, "--guidance", "x"], "--guidance must be a comma list of numbers, got 'x'"),
        ([*base, "--steps", "0"], "--steps values must be > 0, got 0"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_sd, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    for argv, needle in _bad_cases(tiny_sd, tmp_path):
        argv = [*argv, "--output", str(work / "OUT"), "--cache-dir", str(work / "cache")]
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2, argv
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)
    assert list(work.iterdir()) == []
    # --overwrite never deletes a folder that is not a bench report.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("...")
    with pytest.raises(UserError, match="no bench report.json"):
        config.BenchConfig(pipelines=[tiny_sd], output=str(tmp_path / "precious"), num_samples=N, overwrite=True)


class _WritesAFile:
    """Unpickling this creates a file: what a malicious weights file would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_inception_weights_pickle_is_never_executed(tiny_sd, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _WritesAFile(str(marker))}, evil)
    code = main(["bench", tiny_sd, "--steps", "1", "--num-samples", "3000", "--feature-extractor",
                 "inception-v3-compat", "--inception-weights", str(evil), "--output", str(tmp_path / "OUT")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "refusing to unpickle" in err, err
    with pytest.raises(UserError, match="refusing to unpickle"):  # the torch-fidelity path refuses it too
        fidelity.compute_metrics(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
                                 feature_extractor="inception-v3-compat", inception_weights=evil)
    assert not marker.exists() and not (tmp_path / "OUT").exists()


def test_inception_weights_from_safetensors_reach_torch_fidelity(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    from safetensors.torch import save_file

    with monkeypatch.context() as m:  # random Inception weights, built without a download
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        state = tfi.FeatureExtractorInceptionV3("x", ["2048"]).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "inception.safetensors"))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = fidelity.extract_features(images, fidelity.INCEPTION_EXTRACTOR, tmp_path / "inception.safetensors")
    assert feats["features"].shape == (2, 2048) and torch.isfinite(feats["features"]).all()


def test_sigterm_leaves_no_temporary_folder(tiny_sd, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffdistill.cli", "bench", tiny_sd, "--steps", "1,2,3,4,5,6",
                             "--num-samples", "2000", "--bootstrap", "200", "--output", str(tmp_path / "OUT"), "--no-cache",
                             "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp.glob(f"{bench.STAGING_PREFIX}*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert list(tmp.glob(f"{bench.STAGING_PREFIX}*")), "the run never created its temporary folder"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert len(err.strip().splitlines()) == 1 and "signal 15" in err
    assert not list(tmp.glob(f"{bench.STAGING_PREFIX}*")) and not (tmp_path / "OUT").exists()


# ---------------------------------------------------------------------------------------------- pieces

def test_clip_score_of_tiny_clip(tiny_clip):
    from diffdistill.eval.clip_score import clip_scores

    images = digits_uint8(load_digits_32()[0][:6])
    scores = clip_scores(images, DIGIT_PROMPTS[:6], tiny_clip, torch.device("cpu"), batch_size=4)
    # max(100 cos, 0) (Hessel et al.), written out through CLIPModel's own forward (logits = e^logit_scale cos) on
    # all six at once: batches of 4 + 2 against one of 6 sum in another order (tests/tolerance.py), at |cos| <= 1.
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    with torch.no_grad():
        out = model(**CLIPProcessor.from_pretrained(str(tiny_clip))(
            text=DIGIT_PROMPTS[:6], images=list(images), return_tensors="pt", padding=True))
        cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert_close_at_scale(scores, (100 * cos).clamp(min=0), scale=100)
    assert (cos > 0.001).any() and (cos < -0.001).any()  # both sides of the clamp are in play
    with pytest.raises(UserError, match="no preprocessor_config.json"):
        from diffdistill.eval.clip_score import check_clip_folder

        check_clip_folder(TEACHER / "text_encoder")


def test_same_seeds_at_any_batch_size(tiny_sd):
    pipe = sampling.load_pipeline(tiny_sd, torch.device("cpu"), torch.float32)
    prompts = DIGIT_PROMPTS[:6]
    a, _, nfe = sampling.sample_cell(pipe, prompts, 1, 1.5, seed=3, batch_size=6, device=torch.device("cpu"))
    b, _, _ = sampling.sample_cell(pipe, prompts, 1, 1.5, seed=3, batch_size=4, device=torch.device("cpu"))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.uint8 and nfe == 1
    assert (a.int() - b.int()).abs().max() <= 1  # image i depends on seed + i only, not on batching


def test_scheduler_overrides(tiny_sd, tmp_path):
    base = sampling.load_scheduler(tiny_sd)
    sched = sampling.make_scheduler("ddim:timestep_spacing=trailing", base)
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [999]  # "leading" (the folder's setting) would give [1]
    assert sampling.make_scheduler("pndm", base).config.skip_prk_steps is True
    assert sampling.make_scheduler("default:clip_sample=true", base).config.clip_sample is True
    kw = dict(pipelines=[tiny_sd], output=str(tmp_path / "r"), num_samples=N)
    config.BenchConfig(**kw, schedulers="default:timestep_spacing=trailing")
    with pytest.raises(UserError, match="no config field"):
        config.BenchConfig(**kw, schedulers="euler:bogus=1")


def test_parse_helpers(tmp_path):
    assert config.parse_steps("8, 1,2,2") == [1, 2, 8]
    assert config.parse_guidance("1,1.5") == [1.0, 1.5] and config.parse_guidance(None) is None
    assert config.unique_labels(["a/x", "b/x"]) == ["x", "x-2"]
    pairs = config.parse_compare("4:50,s@1:t@8,s:t", ["s", "t"], [1, 4, 8, 50])
    assert [(str(a), str(b)) for a, b in pairs] == [("4", "50"), ("s@1", "t@8"), ("s", "t")]
    assert [(str(a), str(b)) for a, b in config.parse_compare("pipelines", ["s", "t"], [1])] == [("s", "t")]
    assert config.read_recommended_guidance(tmp_path) is None
    (tmp_path / "diffdistill.json").write_text(json.dumps({"recommended_guidance_scale": 1.5}))
    assert config.read_recommended_guidance(tmp_path) == 1.5


def test_markdown_table_reads_v1_reports_and_failed_cells():
    rep = {"lines": [{"name": "m", "label": "m", "scheduler": "pndm", "guidance_scale": 7.5, "results": [
        {"steps": 1, "error": "ValueError: too few steps"},
        {"steps": 4, "nfe": 4.0, "fid": 1.0, "isc_mean": 2.0, "isc_std": 0.1, "kid_mean": 0.01, "kid_std": 0.001,
         "prompt_accuracy": None, "seconds_per_image": 0.5, "peak_memory_mb": 100.0}]}]}
    table = report.report_markdown_table(rep)
    assert "failed: ValueError: too few steps" in table
    assert "| m | pndm | 7.5 | 4 | 4 | 1.000 | — |" in table
    widths = {line.count("|") for line in table.strip().splitlines()}
    assert len(table.strip().splitlines()) == 4 and len(widths) == 1


def test_help_is_generated_from_the_config_fields():
    parser = argparse.ArgumentParser(prog="diffdistill")
    p = add_parser(parser.add_subparsers())
    dests = {a.dest for a in p._actions}
    assert {f for f in config.BenchConfig.__dataclass_fields__} <= dests
    for action in p._actions:
        assert action.help, action.dest
        if action.option_strings and action.dest != "help":
            assert "(default:" in action.help, action.dest
    assert "basic (reverse-percentile) bootstrap" in p.format_help()
