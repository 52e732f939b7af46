"""Training data sources. Every source yields plain dicts ``{"pixel_values": (3, H, W) in [-1, 1], "prompt": str}``
(prompt-only sources leave out ``pixel_values``).

Sources, chosen from ``DataConfig.dataset``:
  * ``digits``: the built-in scikit-learn handwritten digits with captions ``a handwritten digit K``;
  * a folder with ``metadata.jsonl`` or ``metadata.csv`` (HF ``imagefolder`` layout: ``file_name`` + a caption
    column, ``text`` by default), in the folder or in its ``train/`` split folder;
  * webdataset shards: ``*.tar`` files (brace patterns like ``data-{000..009}.tar`` allowed) holding
    ``KEY.jpg|png|webp`` + ``KEY.txt`` pairs, streamed (``TarShards``, an IterableDataset, standard library only);
  * a ``.txt`` file: one prompt per line, no images;
  * anything else: a HF dataset name or path, through the optional ``datasets`` package.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import random
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset

from .config import DataConfig
from .errors import RunFailed, UserError, first_line, require

# Image files the data loaders and the bench reference folders read; a tar sample takes the first one present.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# PIL's ways of saying that an image's data is broken when it is decoded.
DECODE_ERRORS = (OSError, SyntaxError, ValueError)


def _to_tensor(image, resolution: int) -> torch.Tensor:
    """PIL image -> (3, R, R) in [-1, 1]: resize the short side, centre crop (the SD training recipe)."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    if resolution:
        w, h = image.size
        scale = resolution / min(w, h)
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


class DigitsDataset(Dataset):
    """The built-in digits: (3, 32, 32) images and their captions."""

    def __init__(self, resolution: int = 0):
        from .digits import digit_caption, load_digits_32

        images, labels = load_digits_32()
        self.images, self.captions = images, [digit_caption(int(k)) for k in labels]
        self.resolution = resolution if resolution and resolution != images.shape[-1] else 0

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        image = self.images[i]
        if self.resolution:  # upscaled per item: the whole set at 512 px would need gigabytes
            image = torch.nn.functional.interpolate(image[None], size=(self.resolution,) * 2, mode="nearest")[0]
        return {"pixel_values": image, "prompt": self.captions[i]}


class DecodedImages(Dataset):
    """Images decoded when read. One that fails to decode (truncated, corrupt past its header) is replaced by the
    next readable one of the dataset, index ``i + 1, i + 2, ...``: the replacement depends on the index alone, so
    batches stay the same on resume and on every rank count; the item names the skipped files under ``"skipped"``.
    Subclasses set ``names``, ``captions``, ``resolution``, ``bad_files`` and define ``_open(i)``."""

    names: list[str]
    captions: list[str]
    resolution: int
    bad_files: list[str]

    def _open(self, i: int):
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        skipped = []
        for k in range(len(self)):
            j = (i + k) % len(self)
            try:
                with self._open(j) as im:
                    item = {"pixel_values": _to_tensor(im, self.resolution), "prompt": self.captions[j]}
            except DECODE_ERRORS as e:
                skipped.append(f"{self.names[j]} ({first_line(e)})")
                continue
            return {**item, "skipped": skipped} if skipped else item
        raise RunFailed(f"none of the {len(self)} images can be decoded; first: {skipped[0]}")

    def _screen(self, entries: list, open_entry, max_fraction: float, where: str) -> list:
        """The entries whose image opens and passes PIL's ``verify`` (cheap: headers and chunk checksums, no full
        decode); the others are named on stderr and kept in ``bad_files``. UserError if more than
        ``max_fraction`` of them are bad."""
        kept, self.bad_files = [], []
        for name, entry in zip(self.names, entries):
            reason = unreadable_reason(lambda entry=entry: open_entry(entry))
            if reason is None:
                kept.append((name, entry))
            else:
                self.bad_files.append(f"{name} ({reason})")
        require_few_bad(len(self.bad_files), len(entries), max_fraction, where, self.bad_files[:1])
        for bad in self.bad_files:  # only once the run goes on: a failing one prints its one error line alone
            print(f"warning: skipping unreadable image {bad}", file=sys.stderr, flush=True)
        self.names = [name for name, _ in kept]
        return [entry for _, entry in kept]


def require_few_bad(bad: int, total: int, max_fraction: float, where: str, examples: list[str],
                    error: type[Exception] = UserError) -> None:
    """Raise ``error`` (one line) if more than ``max_fraction`` of ``total`` images are unreadable."""
    if bad and (bad > max_fraction * total or bad == total):
        raise error(f"{bad} of {total} images of {where} are not readable images (more than "
                    f"--max-bad-image-fraction {max_fraction:g}); e.g. {examples[0] if examples else '?'}")


METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def find_metadata(root: Path) -> Path:
    """The metadata file of an HF imagefolder: ``metadata.jsonl`` or ``metadata.csv`` in ``root``, or in its ``train/``
    split folder (the split diffdistill trains on)."""
    for folder in (root, root / "train"):
        found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
        require(len(found) < 2, f"image folder {folder} has both metadata.jsonl and metadata.csv; keep one")
        if found:
            return found[0]
    raise UserError(f"image folder {root} has no metadata.jsonl or metadata.csv (nor a train/ folder with one)")


def metadata_rows(meta: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a ``metadata.jsonl`` (one JSON object a line) or ``metadata.csv`` (a header line)."""
    if meta.suffix == ".csv":
        with meta.open(newline="") as f:
            reader = csv.DictReader(f)
            try:
                return [(reader.line_num, row) for row in reader]
            except csv.Error as e:
                raise UserError(f"{meta}:{reader.line_num} is not valid CSV ({e})") from None
    rows = []
    for n, line in enumerate(meta.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError:
                raise UserError(f"{meta}:{n} is not valid JSON") from None
    return rows


class ImageFolderDataset(DecodedImages):
    """An HF imagefolder: images with ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + a caption column),
    in the folder itself or in its ``train/`` split folder."""

    def __init__(self, root: Path, caption_column: str, resolution: int, max_bad_fraction: float = 0.01):
        meta = find_metadata(root)
        root = meta.parent  # file names are relative to the metadata file
        rows = metadata_rows(meta)
        if rows and isinstance(rows[0][1], dict) and caption_column not in rows[0][1]:
            raise UserError(f"{meta} has no caption column '{caption_column}'; its columns: "
                            f"{', '.join(map(str, rows[0][1]))}; choose one with --caption-column")
        items = []
        for n, row in rows:
            require(isinstance(row, dict) and "file_name" in row and caption_column in row,
                    f"{meta}:{n} needs 'file_name' and '{caption_column}' keys")
            name, caption = row["file_name"], row[caption_column]
            require(isinstance(caption, str), f"{meta}:{n}: '{caption_column}' must be a string, got {json.dumps(caption)}")
            require(isinstance(name, str) and bool(name), f"{meta}:{n}: 'file_name' must be a file name, got {json.dumps(name)}")
            # Only files inside the data folder: an absolute path or a '..' would read anything on the machine.
            require(not Path(name).is_absolute() and ".." not in Path(name).parts,
                    f"{meta}:{n}: file_name {name!r} points outside {root}")
            require((root / name).is_file(), f"{meta}:{n}: image {name} not found")
            items.append((root / name, caption))
        require(bool(items), f"{meta} lists no images")
        self.names = [str(path) for path, _ in items]
        items = self._screen(items, lambda item: _open_image(item[0]), max_bad_fraction, str(root))
        self.paths, self.captions = [path for path, _ in items], [caption for _, caption in items]
        self.resolution = resolution

    def _open(self, i: int):
        return _open_image(self.paths[i])


def _open_image(source):
    from PIL import Image

    return Image.open(source)


def unreadable_reason(open_image) -> str | None:
    """None if ``open_image()`` gives an image that passes PIL's ``verify``, else why not (one line)."""
    try:
        with open_image() as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error, ...
        return first_line(e)
    return None


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset brace ranges: ``a-{000..002}.tar`` -> [a-000.tar, a-001.tar, a-002.tar]."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    out = []
    for k in range(lo, hi + 1):
        out += expand_braces(pattern[: m.start()] + str(k).zfill(width) + pattern[m.end():])
    return out


def shard_samples(shard: str) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """``(key, (offset, size) of the image, (offset, size) of the caption)`` of each ``KEY.{png,jpg,...}`` +
    ``KEY.txt`` pair of a tar shard, in the shard's order, from its headers alone (tarfile seeks past the data)."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.rpartition(".")
                    groups.setdefault(key, {})["." + ext.lower()] = (member.offset_data, member.size)
    except tarfile.TarError as e:
        raise UserError(f"{shard} is not a readable tar shard: {e}") from None
    samples = []
    for key, parts in groups.items():
        image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
        if image is not None and ".txt" in parts:
            samples.append((key, image, parts[".txt"]))
    return samples


def _read(path: str, span: tuple[int, int]) -> bytes:
    """``size`` bytes of the file at ``offset`` (one member of a tar shard)."""
    with open(path, "rb") as f:
        f.seek(span[0])
        return f.read(span[1])


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """The items through a shuffle buffer of ``size`` (webdataset's shuffle: each new item takes the place of a
    random one of the buffer, which is yielded; the rest in random order at the end); ``size`` 1 keeps the order."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class TarShards(IterableDataset):
    """webdataset shards (``KEY.{jpg,png,...}`` + ``KEY.txt`` pairs in tar files), streamed.

    Only the tar headers are read up front (to count the samples); each stream reads a shard's headers again when
    it reaches the shard (sample names, offsets and sizes) and its images as the stream reaches them, in the
    data-loader workers. ``split`` gives one process its stream:

    * shards: in epoch ``e`` all ranks permute the shard list with the same seeded order; rank ``r`` of ``R`` takes
      every R-th shard from ``r``, and data-loader worker ``w`` of ``W`` every W-th of those (``assignment``): the
      R x W streams read disjoint shards that cover the list (so there must be at least R x W shards);
    * samples: each worker's samples of an epoch pass a shuffle buffer (``--shuffle-buffer``) seeded by (seed,
      epoch, rank, worker); each worker streams epoch after epoch without end, so ranks never wait on each other
      at an epoch's end, and the DataLoader takes batch ``k`` from worker ``k % W`` (whole batches per worker);
    * an image that cannot be decoded is replaced by the next decodable sample of the same stream (named under
      ``"skipped"``), so the number of samples, and so every later position, does not depend on the images;
    * resume is exact (with the same seed, batch size, number of processes and of data-loader workers, which
      shape the streams): the stream of a process that has drawn ``n`` batches is the uninterrupted one from batch
      ``n`` on. Each worker skips the samples of its batches before ``n`` on the shards' headers alone (the
      shuffle buffer is replayed on sample names; no image is read or decoded), so resuming costs no more than
      reading the tar headers of the skipped shards."""

    def __init__(self, pattern: str, resolution: int, shuffle_buffer: int = 1000, max_samples: int = 0):
        shards = expand_braces(pattern)
        missing = [s for s in shards if not Path(s).is_file()]
        require(not missing, f"webdataset shard not found: {', '.join(missing[:3])}")
        self.counts: dict[str, int] = {}  # samples used of each shard (--max-samples cuts the last ones)
        left = max_samples or float("inf")
        for shard in shards:
            n = int(min(len(shard_samples(shard)), left))
            left -= n
            if n:  # a shard without pairs (or past --max-samples) feeds no stream
                self.counts[shard] = n
        require(bool(self.counts), f"no image+.txt pairs found in {pattern}")
        self.shards = list(self.counts)
        self.pattern, self.resolution, self.shuffle_buffer = pattern, resolution, shuffle_buffer
        self.bad_files: list[str] = []  # nothing is screened up front: undecodable images are met in the stream
        self.rank, self.world, self.seed, self.batch_size, self.skip_batches = 0, 1, 0, 1, 0

    def __len__(self) -> int:
        return sum(self.counts.values())

    def split(self, rank: int, world: int, seed: int, batch_size: int, skip_batches: int = 0) -> TarShards:
        """This dataset as rank ``rank`` of ``world`` streams it, batched by ``batch_size``, from batch
        ``skip_batches`` of that rank on."""
        part = copy.copy(self)
        part.rank, part.world, part.seed, part.batch_size, part.skip_batches = rank, world, seed, batch_size, skip_batches
        return part

    def require_streams(self, world: int, workers: int) -> None:
        """One-line UserError unless every one of ``world`` x ``workers`` streams gets a shard."""
        streams = world * max(1, workers)
        require(len(self.shards) >= streams,
                f"{self.pattern}: {len(self.shards)} shard(s) with samples cannot feed {world} process(es) x "
                f"{max(1, workers)} data-loader worker(s): each reads whole shards of its own, so give at least "
                f"{streams} shards (or fewer --dataloader-num-workers)")

    def assignment(self, epoch: int, rank: int, world: int, worker: int, workers: int) -> list[str]:
        """The shards that ``worker`` of ``workers`` on rank ``rank`` of ``world`` reads in ``epoch``, in order."""
        order = list(self.shards)
        random.Random(f"{self.seed}/shards/{epoch}").shuffle(order)
        return order[rank::world][worker::workers]

    def samples(self, shard: str) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
        """The samples of ``shard`` this dataset uses (``shard_samples``, read again from the headers each time a
        stream opens the shard: memory holds one shard's index per worker, not the dataset's)."""
        return shard_samples(shard)[: self.counts[shard]]

    def first_captions(self, limit: int) -> list[str]:
        """The captions of the first ``limit`` samples in shard order (for validation prompts)."""
        refs = itertools.islice(((shard, caption) for shard in self.shards for _, _, caption in self.samples(shard)),
                                limit)
        return [_read(shard, caption).decode("utf-8").strip() for shard, caption in refs]

    def _samples(self, worker: int, workers: int) -> Iterator[tuple[str, str, tuple, tuple]]:
        """This worker's (shard, key, image span, caption span), epoch after epoch, shuffled, without end."""
        for epoch in itertools.count():
            rng = random.Random(f"{self.seed}/samples/{epoch}/{self.rank}/{worker}")
            refs = ((shard, *sample) for shard in self.assignment(epoch, self.rank, self.world, worker, workers)
                    for sample in self.samples(shard))
            yield from shuffled(refs, self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Batch k of this rank comes from stream k % W. A loader that starts at batch n asks its worker j for its
        # batch j, which is batch n + j: worker j plays stream (n + j) % W, which made ceil((n - w) / W) of the
        # first n batches.
        worker = (loader_worker + self.skip_batches) % workers
        done = max(0, -(-(self.skip_batches - worker) // workers))
        refs = itertools.islice(self._samples(worker, workers), done * self.batch_size, None)
        skipped: list[str] = []
        for shard, key, image, caption in refs:
            name = f"{shard}:{key}"
            try:
                with _open_image(io.BytesIO(_read(shard, image))) as im:
                    pixels = _to_tensor(im, self.resolution)
            except DECODE_ERRORS as e:
                # PIL names the in-memory file by its address: left out, so each meeting reads the same
                reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", first_line(e))
                skipped.append(f"{name} ({reason})")
                if len(skipped) > len(self):
                    raise RunFailed(f"none of the images that {self.pattern} gives this stream can be decoded; "
                                    f"first: {skipped[0]}") from None
                continue
            item = {"pixel_values": pixels, "prompt": _read(shard, caption).decode("utf-8").strip()}
            # The undecodable samples before this one each stand at their own position, replaced by this one.
            for k in range(len(skipped) + 1):
                yield {**item, "skipped": skipped} if skipped and k == 0 else item
            skipped = []


class PromptDataset(Dataset):
    """Prompts only, one per line of a text file (for methods that generate their own images)."""

    def __init__(self, path: Path):
        self.prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        require(bool(self.prompts), f"prompt file {path} is empty")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i]}


class HFDataset(DecodedImages):
    """A HF ``datasets`` dataset (by name or local path), train split; rows are named ``NAME[i]`` (images decode
    when read, so one that fails is replaced as in ``DecodedImages``; none is screened up front)."""

    def __init__(self, name: str, image_column: str, caption_column: str, resolution: int):
        try:
            import datasets
        except ImportError:
            raise UserError(f"--dataset {name!r} is not a local folder or file; reading HF datasets needs "
                            "`pip install datasets` (or diffdistill[data])") from None
        try:
            ds = datasets.load_dataset(name, split="train")
        except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
            raise UserError(f"cannot load dataset {name!r}: {str(e).splitlines()[0]}") from None
        for col in (image_column, caption_column):
            require(col in ds.column_names, f"dataset {name!r} has no column {col!r}; columns: {ds.column_names}")
        self.ds, self.image_column, self.resolution, self.bad_files = ds, image_column, resolution, []
        self.captions = [str(c) for c in ds[caption_column]]
        self.names = [f"{name}[{i}]" for i in range(len(ds))]

    def _open(self, i: int):
        return self.ds[i][self.image_column]


def build_dataset(cfg: DataConfig, resolution: int) -> Dataset:
    """The dataset named by ``cfg.dataset`` at ``resolution`` pixels (cfg.resolution overrides it)."""
    res = cfg.resolution or resolution
    src = cfg.dataset
    p = Path(src)
    if src == "digits":
        ds: Dataset = DigitsDataset(res)
    elif p.is_dir():
        ds = ImageFolderDataset(p, cfg.caption_column, res, cfg.max_bad_image_fraction)
    elif src.endswith(".tar") or re.search(r"\.tar$", src.replace("}", "")):
        return TarShards(src, res, cfg.shuffle_buffer, cfg.max_samples)
    elif src.endswith(".txt"):
        require(p.is_file(), f"prompt file not found: {src}")
        ds = PromptDataset(p)
    elif p.suffix or src.startswith((".", "/")):
        raise UserError(f"--dataset {src!r}: no such folder or file")
    else:
        ds = HFDataset(src, cfg.image_column, cfg.caption_column, res)
    if cfg.max_samples and cfg.max_samples < len(ds):
        ds = torch.utils.data.Subset(ds, range(cfg.max_samples))
    return ds


def validation_prompts(cfg: DataConfig, dataset: Dataset) -> list[str]:
    """Ten prompts for sample grids and export checks: the digit prompts, or the first distinct captions of the data."""
    if cfg.dataset == "digits":
        from .digits import DIGIT_PROMPTS

        return list(DIGIT_PROMPTS)
    captions = (dataset.first_captions(200) if isinstance(dataset, TarShards)
                else (dataset[i]["prompt"] for i in range(min(len(dataset), 200))))
    prompts: list[str] = []
    for caption in captions:
        if caption not in prompts:
            prompts.append(caption)
        if len(prompts) == 10:
            break
    return prompts


class LatentCache(Dataset):
    """An image dataset with each image replaced by its VAE posterior, computed once (``--cache-latents``): items
    ``{"latent_mean", "latent_std": (C, h, w) unscaled, "prompt"}`` (and ``"skipped"`` where the source replaced an
    undecodable image, noted when the item is drawn, as without the cache). ``encode`` maps a (B, 3, H, W) image
    batch in [-1, 1] to that batch's (mean, std); the tensors stay on the CPU, two latents per image."""

    def __init__(self, dataset: Dataset, encode, batch_size: int):
        means, stds, self.items = [], [], []
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            mean, std = encode(torch.stack([it["pixel_values"] for it in items]))
            means.append(mean.float().cpu())
            stds.append(std.float().cpu())
            self.items += [{k: v for k, v in it.items() if k != "pixel_values"} for it in items]
        self.mean, self.std = torch.cat(means), torch.cat(stds)  # (N, C, h, w) each
        self.bad_files = bad_image_files(dataset)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"latent_mean": self.mean[i], "latent_std": self.std[i], **self.items[i]}


# The keys of an item (and a batch) that carry its image: decoded pixels, or a cached VAE posterior.
IMAGE_KEYS = ("pixel_values", "latent_mean")


def has_images(batch: dict) -> bool:
    """Whether a batch carries images (pixels or cached latents) rather than prompts alone."""
    return any(key in batch for key in IMAGE_KEYS)


def require_images(has_images: bool, what: str) -> None:
    """UserError unless the data holds images (``what`` names the part of the run that learns from them)."""
    require(has_images, f"{what} needs images: --dataset must hold images, not only prompts")


def holds_images(dataset: Dataset) -> bool:
    """Whether the dataset's items carry ``pixel_values`` (every source but a prompts file)."""
    return not isinstance(getattr(dataset, "dataset", dataset), PromptDataset)


def bad_image_files(dataset: Dataset) -> list[str]:
    """The images a dataset dropped when it was built because they do not open (``name (reason)``)."""
    return list(getattr(getattr(dataset, "dataset", dataset), "bad_files", []))


def collate(items: list[dict]) -> dict:
    """Stack images (or cached latents), keep prompts as a list of strings (and the files skipped while decoding under ``skipped``)."""
    batch: dict = {"prompt": [it["prompt"] for it in items]}
    skipped = [name for it in items for name in it.get("skipped", ())]
    if skipped:
        batch["skipped"] = skipped
    for key in ("pixel_values", "latent_mean", "latent_std"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    return batch
