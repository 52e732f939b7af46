"""Streamed webdataset shards (data.TarShards): disjoint shards per rank and worker, seeded shuffling, exact
resume, undecodable images replaced and counted, and a few distillation steps on shard data."""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffdistill import data
from diffdistill.config import DataConfig
from diffdistill.data import TarShards, build_dataset, collate, expand_braces


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (value % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(folder, shards: int, per_shard: int, bad: tuple[str, ...] = ()) -> str:
    """``shards`` tar files of ``per_shard`` samples ``s{shard}_{k}`` (caption = key; the keys in ``bad`` hold
    bytes that are no image); returns the brace pattern naming them."""
    for shard in range(shards):
        with tarfile.open(folder / f"data-{shard:03d}.tar", "w") as tar:
            for k in range(per_shard):
                key = f"s{shard}_{k}"
                for name, blob in ((f"{key}.png", b"not an image" if key in bad else _png(shard * 10 + k)),
                                   (f"{key}.txt", key.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return str(folder / f"data-{{000..{shards - 1:03d}}}.tar")


def _batches(ds: TarShards, n: int, workers: int = 0) -> list[dict]:
    loader = DataLoader(ds, batch_size=ds.batch_size, collate_fn=collate, num_workers=workers)
    return list(itertools.islice(loader, n))


def test_shards_index_headers_and_stream_in_order(tmp_path):
    pattern = _write_shards(tmp_path, 2, 3)
    assert len(expand_braces(pattern)) == 2
    ds = build_dataset(DataConfig(dataset=pattern, max_samples=5, shuffle_buffer=1), 8)
    assert isinstance(ds, TarShards) and len(ds) == 5 and ds.first_captions(10) == ["s0_0", "s0_1", "s0_2", "s1_0", "s1_1"]
    items = list(itertools.islice(iter(ds), 10))
    assert items[0]["pixel_values"].shape == (3, 8, 8)
    # epoch 0 then epoch 1, each the 5 samples, shards in the epoch's seeded order, samples in file order
    epochs = [[it["prompt"] for it in items[:5]], [it["prompt"] for it in items[5:]]]
    for e, prompts in enumerate(epochs):
        expected = [key for shard in ds.assignment(e, 0, 1, 0, 1) for key, _, _ in ds.samples(shard)]
        assert prompts == expected and sorted(prompts) == ["s0_0", "s0_1", "s0_2", "s1_0", "s1_1"]


def test_two_ranks_of_two_workers_read_disjoint_shards_that_cover_all(tmp_path):
    ds = build_dataset(DataConfig(dataset=_write_shards(tmp_path, 8, 3), shuffle_buffer=4), 8)
    seen = []
    for rank in range(2):
        # each worker holds 2 shards = 6 samples = 2 batches of 3 an epoch: 4 batches are this rank's epoch 0
        part = ds.split(rank, 2, seed=7, batch_size=3)
        batches = _batches(part, 4, workers=2)
        prompts = [p for b in batches for p in b["prompt"]]
        shards = {f"{tmp_path}/data-{int(p[1:p.index('_')]):03d}.tar" for p in prompts}
        assert shards == {s for w in range(2) for s in part.assignment(0, rank, 2, w, 2)} and len(shards) == 4
        # the DataLoader takes whole batches from worker 0, 1, 0, 1: batch k holds shards of worker k % 2 only
        for k, b in enumerate(batches):
            assert {f"{tmp_path}/data-{int(p[1:p.index('_')]):03d}.tar" for p in b["prompt"]} <= \
                set(part.assignment(0, rank, 2, k % 2, 2))
        seen.append(prompts)
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 24 == len(seen[0] + seen[1])
    assert ds.assignment(1, 0, 2, 0, 2) != ds.assignment(0, 0, 2, 0, 2) or ds.assignment(1, 0, 2, 1, 2) != \
        ds.assignment(0, 0, 2, 1, 2)  # a new shard order every epoch
    # the buffer shuffles within the stream, the same way for the same seed, another way for another seed
    again = [p for b in _batches(ds.split(1, 2, seed=7, batch_size=3), 4, workers=2) for p in b["prompt"]]
    other = [p for b in _batches(ds.split(1, 2, seed=8, batch_size=3), 4, workers=2) for p in b["prompt"]]
    assert again == seen[1] and other != seen[1]
    with pytest.raises(data.UserError, match=r"8 shard\(s\) with samples cannot feed 4 process\(es\) x 3 data-loader "
                                             r"worker\(s\).*give at least 12 shards"):
        ds.require_streams(4, 3)


def test_resume_skips_the_drawn_batches_exactly_without_reading_them(tmp_path, monkeypatch):
    """A stream split at batch n is the uninterrupted stream from batch n on (through epochs, a shuffle buffer,
    two workers and an undecodable image), and skipping reads no image."""
    ds = build_dataset(DataConfig(dataset=_write_shards(tmp_path, 4, 5, bad=("s2_3",)), shuffle_buffer=3), 8)
    full = _batches(ds.split(0, 1, seed=3, batch_size=2), 16, workers=2)  # 32 samples: more than one epoch (20)
    resumed = _batches(ds.split(0, 1, seed=3, batch_size=2, skip_batches=11), 5, workers=2)
    for a, b in zip(full[11:], resumed):
        assert a["prompt"] == b["prompt"] and torch.equal(a["pixel_values"], b["pixel_values"])
    reads = []
    real_read = data._read
    monkeypatch.setattr(data, "_read", lambda path, span: reads.append(span) or real_read(path, span))
    one = _batches(ds.split(0, 1, seed=3, batch_size=2, skip_batches=1000), 1)
    assert len(reads) <= 2 * 2 + 2 and len(one[0]["prompt"]) == 2  # 2 images and 2 captions (+ a replaced one)


def test_an_undecodable_image_in_a_shard_is_replaced_by_the_next_and_named(tmp_path):
    ds = build_dataset(DataConfig(dataset=_write_shards(tmp_path, 1, 3, bad=("s0_1",)), shuffle_buffer=1), 8)
    items = list(itertools.islice(iter(ds), 3))
    assert [it["prompt"] for it in items] == ["s0_0", "s0_2", "s0_2"]  # position 1 holds its replacement
    assert items[1]["skipped"] == [f"{tmp_path}/data-000.tar:s0_1 (cannot identify image file)"]
    assert "skipped" not in items[0] and "skipped" not in items[2]


@pytest.mark.slow
def test_distill_a_few_steps_on_shards_counts_an_undecodable_image(tiny_sd, tmp_path, capsys, one_thread):
    from diffdistill.cli import main

    pattern = _write_shards(tmp_path, 2, 4, bad=("s1_2",))
    argv = ["distill", "--method", "lcm", "--teacher", tiny_sd, "--dataset", pattern, "--batch-size", "2",
            "--max-train-steps", "4", "--checkpointing-steps", "2", "--validation-steps", "0", "--benchmark-samples",
            "0", "--num-ddim-timesteps", "10", "--lr-warmup-steps", "0", "--shuffle-buffer", "3"]
    out = tmp_path / "run"
    assert main([*argv, "--output", str(out), "--max-bad-image-fraction", "0.2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_steps"] == 4 and summary["skipped_images"]["count"] == 1
    assert summary["skipped_images"]["files"][0].startswith(f"{tmp_path}/data-001.tar:s1_2 (")
    assert f"warning: skipping undecodable image {tmp_path}/data-001.tar:s1_2" in capsys.readouterr().err
    # at the default fraction (0.01) one bad image of 8 ends the run with one line, exit status 3
    assert main([*argv, "--output", str(tmp_path / "strict")]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 of 8 images of" in err and "--max-bad-image-fraction 0.01" in err
    # more streams than shards: one line, exit status 2, nothing written
    assert main([*argv, "--output", str(tmp_path / "few"), "--dataloader-num-workers", "3"]) == 2
    assert "give at least 3 shards" in capsys.readouterr().err and not (tmp_path / "few").exists()
    assert main([*argv, "--output", str(tmp_path / "cached"), "--cache-latents"]) == 2
    assert "--cache-latents needs a dataset that fits in memory" in capsys.readouterr().err
    assert not (tmp_path / "cached").exists()


@pytest.mark.slow
def test_a_resumed_run_on_shards_trains_exactly_as_an_uninterrupted_one(tiny_sd, tmp_path, one_thread):
    """Through an epoch's end, two data-loader workers, a shuffle buffer and an undecodable image."""
    from test_integrity import _trainer

    kw = {"dataset": _write_shards(tmp_path, 3, 3, bad=("s1_0",)), "max_bad_image_fraction": 0.5,
          "checkpointing_steps": 3, "max_train_steps": 6, "dataloader_num_workers": 2, "shuffle_buffer": 2}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = _trainer(tiny_sd, tmp_path / "a", **kw)
    whole.fit()  # 12 samples: one epoch (9) and part of the next
    assert len(whole.skipped_images) == 1 and whole.skipped_images[0].startswith(f"{tmp_path}/data-001.tar:s1_0 (")
    part = _trainer(tiny_sd, tmp_path / "b", **{**kw, "max_train_steps": 3})
    part.fit()
    resumed = _trainer(tiny_sd, tmp_path / "b", run_id=part.run_id, **kw, resume_from_checkpoint="latest")
    resumed.fit()
    assert resumed.batches_seen == whole.batches_seen == 6
    for name, module in whole.method.state_modules().items():
        other = resumed.method.state_modules()[name]
        assert all(torch.equal(p, q) for p, q in zip(module.state_dict().values(), other.state_dict().values()))


@pytest.mark.slow
def test_two_processes_on_shards_agree_on_undecodable_images(tiny_sd, tmp_path):
    """accelerate launch, 2 CPU processes (gloo), an undecodable image only rank 1 meets: past
    --max-bad-image-fraction rank 0 stops too, at the same step, with one line and exit status 3, instead of
    training on while rank 1 stops (and then waiting for it in DDP)."""
    import os
    import subprocess
    import sys

    pattern = _write_shards(tmp_path, 4, 6)
    # 3 steps x batch 4 = 12 samples a rank = its 2 shards of epoch 0 (seed 0); the bad image goes into one of rank 1's
    bad_shard = TarShards(pattern, 8).assignment(0, 1, 2, 0, 1)[0]
    n = int(bad_shard[-7:-4])
    _write_shards(tmp_path, n + 1, 6, bad=(f"s{n}_4",))  # rewrites shards 0..n, the same but for that image
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29523", "-m",
           "diffdistill.cli", "distill", "--method", "lcm", "--num-ddim-timesteps", "10", "--teacher", tiny_sd,
           "--dataset", pattern, "--max-train-steps", "3", "--batch-size", "4", "--checkpointing-steps", "0",
           "--validation-steps", "0", "--benchmark-samples", "0", "--lr-warmup-steps", "0", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    r = subprocess.run([*cmd, "--output", str(tmp_path / "run")], capture_output=True, text=True, timeout=600, env=env)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    # rank 0 never met the image: it stops (exit 3) because the ranks gathered what each met (then torchrun ends
    # rank 1, if it has not stopped by itself yet)
    assert r.returncode != 0 and errors, r.stderr[-3000:]
    assert all(f"1 of 24 images of {pattern}" in e and f"{bad_shard}:s{n}_4 (" in e and "(by step " in e
               for e in errors), errors
    # rank 0 stopped by itself: it printed its own error line (each rank prints one), or exited with status 3 before
    # torchrun could end it (which of the two ranks exits first is a race)
    assert len(errors) == 2 or re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: 3 ", r.stderr), r.stderr[-3000:]
