"""Data sources: digits, imagefolder + metadata.jsonl/csv, prompt lists, config errors, --cache-latents (webdataset
 shards: test_streaming.py)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from diffdistill.config import DataConfig
from diffdistill.data import build_dataset, collate
from diffdistill.errors import UserError


def _png(color, size=(40, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_digits_dataset():
    ds = build_dataset(DataConfig(dataset="digits"), 32)
    assert len(ds) == 1797
    item = ds[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["prompt"] == "a handwritten digit 0"
    # scikit-learn's first digit (16 grey levels), each pixel a 4x4 block, grey in 3 channels, [0, 16] -> [-1, 1]
    from sklearn.datasets import load_digits

    grey = torch.from_numpy(load_digits().images[0]).float() / 8 - 1
    assert torch.equal(item["pixel_values"], grey.repeat_interleave(4, 0).repeat_interleave(4, 1).expand(3, 32, 32))
    big = build_dataset(DataConfig(dataset="digits", resolution=64), 32)[0]["pixel_values"]
    assert big.shape == (3, 64, 64)


def test_imagefolder_with_metadata(tmp_path):
    for i, c in enumerate([(255, 0, 0), (0, 255, 0)]):
        (tmp_path / f"{i}.png").write_bytes(_png(c))
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": f"img {i}"})
                                                       for i in range(2)))
    ds = build_dataset(DataConfig(dataset=str(tmp_path)), 16)
    batch = collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["prompt"] == ["img 0", "img 1"]
    assert torch.allclose(batch["pixel_values"][0, 0], torch.ones(16, 16))  # red: R = +1
    assert torch.allclose(batch["pixel_values"][0, 1], -torch.ones(16, 16))


def test_prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a cat\n\na dog\n")
    ds = build_dataset(DataConfig(dataset=str(f)), 32)
    assert [ds[i]["prompt"] for i in range(len(ds))] == ["a cat", "a dog"]
    assert "pixel_values" not in collate([ds[0]])


@pytest.mark.parametrize("make,msg", [
    (lambda p: str(p / "missing.txt"), r"prompt file not found: .*missing\.txt"),
    (lambda p: str(p / "nope") + "/", r"nope/': no such folder or file"),
    (lambda p: str(p / "x-{000..001}.tar"), r"webdataset shard not found: .*x-000\.tar, .*x-001\.tar"),
    (lambda p: (p / "x.tar").write_bytes(b"not a tar" * 100) and str(p / "x.tar"), r"x\.tar is not a readable tar shard"),
])
def test_bad_sources(tmp_path, make, msg):
    with pytest.raises(UserError, match=msg):
        build_dataset(DataConfig(dataset=make(tmp_path)), 32)


def test_imagefolder_without_metadata(tmp_path):
    with pytest.raises(UserError, match=r"has no metadata\.jsonl"):
        build_dataset(DataConfig(dataset=str(tmp_path)), 32)


def _broken_inside(png: bytes) -> bytes:
    """The PNG with its pixel data zeroed under a valid checksum: it opens and verifies, then fails to decode."""
    import struct
    import zlib

    i = png.index(b"IDAT")
    n = struct.unpack(">I", png[i - 4: i])[0]
    bad = b"\x00" * n
    return png[: i + 4] + bad + struct.pack(">I", zlib.crc32(b"IDAT" + bad)) + png[i + 8 + n:]


def _folder_with_bad_images(root):
    """4 good images, one that is not an image, one truncated, one that breaks only when decoded: 7 in all."""
    files = {f"{i}.png": _png((60 * i, 0, 0)) for i in range(4)}
    files |= {"garbage.png": b"\x89PNG not really", "truncated.png": _png((9, 9, 9))[:40],
              "inside.png": _broken_inside(_png((1, 2, 3)))}
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in files))


def test_unreadable_images_are_dropped_or_replaced_and_named(tmp_path, capsys):
    from diffdistill.data import bad_image_files

    _folder_with_bad_images(tmp_path)
    ds = build_dataset(DataConfig(dataset=str(tmp_path), max_bad_image_fraction=0.5), 8)
    err = capsys.readouterr().err
    assert "garbage.png" in err and "truncated.png" in err and "inside.png" not in err  # headers checked up front
    assert len(ds) == 5 and [b.split(" (")[0] for b in bad_image_files(ds)] == [str(tmp_path / "garbage.png"),
                                                                                   str(tmp_path / "truncated.png")]
    # the one that breaks on decode is the last: replaced by the next readable one, index 0, the same every time
    item = ds[4]
    assert item["prompt"] == "0.png" and str(tmp_path / "inside.png") in item["skipped"][0]
    assert torch.equal(item["pixel_values"], ds[0]["pixel_values"])
    batch = collate([ds[3], ds[4]])
    assert batch["prompt"] == ["3.png", "0.png"] and len(batch["skipped"]) == 1
    assert "skipped" not in collate([ds[0]])


def test_too_many_unreadable_images_is_one_line_naming_the_flag(tmp_path):
    _folder_with_bad_images(tmp_path)
    with pytest.raises(UserError, match=r"2 of 7 images of .* \(more than --max-bad-image-fraction 0\.1\); "
                                        r"e\.g\. .*garbage\.png"):
        build_dataset(DataConfig(dataset=str(tmp_path), max_bad_image_fraction=0.1), 8)
    with pytest.raises(UserError, match=r"--max-bad-image-fraction must be in \[0, 1\], got 2"):
        DataConfig(max_bad_image_fraction=2)


def test_hf_imagefolder_layouts_train_split_and_metadata_csv(tmp_path):
    train = tmp_path / "train"
    (train / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        (train / name).write_bytes(_png((255, 0, 0)))
    (train / "metadata.csv").write_text('file_name,caption\na.png,"a red, square thing"\nsub/b.png,b\n')
    ds = build_dataset(DataConfig(dataset=str(tmp_path), caption_column="caption"), 8)
    assert [ds[i]["prompt"] for i in range(len(ds))] == ["a red, square thing", "b"]
    (train / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "x"}) + "\n")
    with pytest.raises(UserError, match=r"has both metadata\.jsonl and metadata\.csv; keep one"):
        build_dataset(DataConfig(dataset=str(tmp_path), caption_column="caption"), 8)


@pytest.mark.parametrize("meta", ["metadata.csv", "metadata.jsonl"])
def test_a_missing_caption_column_names_the_columns_and_the_flag(tmp_path, meta):
    (tmp_path / "a.png").write_bytes(_png((255, 0, 0)))
    rows = [{"file_name": "a.png", "caption": "x", "id": 1}]
    (tmp_path / meta).write_text("file_name,caption,id\na.png,x,1\n" if meta.endswith("csv")
                                 else "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError) as e:
        build_dataset(DataConfig(dataset=str(tmp_path)), 8)
    assert str(e.value) == (f"{tmp_path / meta} has no caption column 'text'; its columns: file_name, caption, id; "
                            "choose one with --caption-column")


class _FakeHFDataset:
    """A stand-in for a ``datasets.Dataset`` whose row 1 holds an image that fails to decode when read."""

    column_names = ["image", "text"]

    def __len__(self):
        return 3

    def __getitem__(self, key):
        if key == "text":
            return ["zero", "one", "two"]
        if key == 1:
            raise OSError("image file is truncated")
        return {"image": Image.open(io.BytesIO(_png((key * 100, 0, 0)))), "text": ["zero", "one", "two"][key]}


def test_hf_dataset_rows_that_fail_to_decode_are_replaced_and_named(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: _FakeHFDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ds = build_dataset(DataConfig(dataset="someone/digits"), 8)
    item = ds[1]
    assert item["prompt"] == "two" and item["skipped"] == ["someone/digits[1] (image file is truncated)"]
    assert [ds[i]["prompt"] for i in (0, 2)] == ["zero", "two"]


def _losses(run) -> list[float]:
    import csv

    with (run / "logs.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_cache_latents_encodes_once_and_trains_the_same(tiny_sd, tmp_path, monkeypatch, one_thread):
    """--cache-latents: the VAE encoder runs once per image before training and never during it, and the losses
    match a run without the cache (the same RNG draws: mean + std * noise, as diffusers' posterior sample)."""
    from diffusers import AutoencoderKL
    from tolerance import assert_close_at_scale

    from diffdistill.cli import main

    encoded = []
    real_encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: encoded.append(x.shape[0])
                        or real_encode(self, x, *a, **k))
    argv = ["distill", "--method", "lcm", "--teacher", tiny_sd, "--max-samples", "10", "--batch-size", "4",
            "--max-train-steps", "3", "--log-every", "1", "--checkpointing-steps", "0", "--validation-steps", "0",
            "--benchmark-samples", "0", "--num-ddim-timesteps", "10", "--lr-warmup-steps", "0"]
    assert main([*argv, "--output", str(tmp_path / "plain")]) == 0
    assert encoded == [4, 4, 4]  # one encoder pass per training batch
    encoded.clear()
    assert main([*argv, "--output", str(tmp_path / "cached"), "--cache-latents"]) == 0
    assert encoded == [4, 4, 2]  # the 10 images, once, in batches of --batch-size; none while training
    plain, cached = torch.tensor(_losses(tmp_path / "plain")), torch.tensor(_losses(tmp_path / "cached"))
    assert len(plain) == 3 and plain.std() > 0
    assert_close_at_scale(cached, plain, rel=1e-4)
