"""FID / IS / KID through torch-fidelity, with the digits classifier registered as a feature extractor.

Importing this module registers ``digits-classifier`` with torch-fidelity (64-d penultimate features for
FID and KID, unbiased logits for IS), so ``torch_fidelity.calculate_metrics(feature_extractor=
"digits-classifier", ...)`` works anywhere. :func:`compute_metrics` is the one entry point the rest of
diffdistill uses; it never computes a metric itself, it prepares inputs and calls torch-fidelity while
steering around its known traps:

- ``cuda`` defaults to True in torch-fidelity, so it is always passed explicitly;
- KID fails when ``kid_subset_size`` exceeds the number of samples, so the size is clamped;
- the feature cache is keyed by input name and extractor *name* only (not weights), so it is off unless a
  ``cache_dir`` is given, and then the key carries hashes of the reference images and the weights file;
- generated images go in as in-memory ``Dataset`` objects, never as generator models (that path crashes
  for class-conditional models under numpy 2) and without DataLoader worker processes;
- ``inception-v3-compat`` would silently try to download its weights; here it needs a local file, and
  since torch-fidelity reads that file with ``torch.load(weights_only=False)`` (which runs any pickle),
  the file is read here with ``weights_only=True`` (or as safetensors) and torch-fidelity gets tensors only
  (:class:`SafeInceptionV3`, registered as ``inception-v3-compat-local``).

:func:`extract_features` runs an extractor once over a set of images; the bench computes every metric and
every interval from those features (:mod:`diffdistill.eval.metrics`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from diffdistill.data import IMAGE_SUFFIXES
from diffdistill.digits import digits_uint8, load_digits_8x8, load_digits_32
from diffdistill.errors import UserError, first_line, require
from diffdistill.eval.digits_classifier import load_digits_classifier, resolve_classifier_files

DIGITS_EXTRACTOR = "digits-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
FEATURE_EXTRACTORS = (DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR)
# What torch-fidelity is asked for: inception-v3-compat goes through the pickle-free subclass below.
SAFE_INCEPTION_EXTRACTOR = "inception-v3-compat-local"
# torch-fidelity's Inception weights file name (what torch.hub would have downloaded into its cache).
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
DIGITS_REFERENCE = "digits"


class DigitsClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor over :class:`DigitsClassifier`: uint8 (N, 3, H, W) -> features.

    Provides ``features`` (64-d penultimate activations, default for FID/KID/PRC), ``logits_unbiased``
    (head without bias, default for IS, as torch-fidelity does for Inception) and ``logits``.
    ``feature_extractor_weights_path`` may name another classifier folder or ``model.safetensors``.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        self.classifier = load_digits_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        """Feature names this extractor can return."""
        return ("features", "logits_unbiased", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        """``logits_unbiased`` for IS, ``features`` for FID, KID and PRC."""
        return "logits_unbiased" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled() -> bool:
        """Not worth compiling: the network is tiny."""
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        """A uint8 (1, 3, 32, 32) black image."""
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 (N, 3, H, W) -> the requested features, in ``features_list`` order (a tuple, as torch-fidelity wants)."""
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        feats = self.classifier.features(x.float() / 255.0)  # (N, 64)
        out = {
            "features": feats,
            "logits_unbiased": self.classifier.logits_from_features(feats, bias=False),  # (N, 10)
            "logits": self.classifier.logits_from_features(feats, bias=True),  # (N, 10)
        }
        return tuple(out[name] for name in self.features_list)


def load_inception_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Inception weights as a plain tensor dict: safetensors, or ``torch.load(weights_only=True)`` (no code runs).

    A pickle that needs anything but tensors and containers (e.g. one crafted to run code) is a one-line
    UserError: it is never unpickled with arbitrary globals.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"--inception-weights {path}: not a readable safetensors file ({first_line(e)})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as e:
        raise UserError(f"--inception-weights {path}: not a plain tensor state dict; refusing to unpickle it "
                        f"with arbitrary code ({type(e).__name__}: {first_line(e)[:160]})") from None
    require(isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values()),
            f"--inception-weights {path}: expected a dict of tensors, got {type(state).__name__}")
    return state




class SafeInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 (same layers and features) whose weights never pass through a pickle.

    The parent reads ``feature_extractor_weights_path`` with ``torch.load(weights_only=False)``; here the
    file is read by :func:`load_inception_state_dict` and the parent gets the tensors re-serialised in
    memory, so the only pickle it ever opens is one this process wrote from plain tensors.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        require(feature_extractor_weights_path is not None,
                f"{INCEPTION_EXTRACTOR} needs a local weights file (--inception-weights); nothing is downloaded")
        buffer = io.BytesIO()
        torch.save(load_inception_state_dict(feature_extractor_weights_path), buffer)
        buffer.seek(0)
        super().__init__(name, features_list, feature_extractor_weights_path=buffer, **kwargs)


def register_digits_feature_extractor() -> None:
    """Register ``digits-classifier`` and the pickle-free Inception with torch-fidelity (idempotent)."""
    if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_EXTRACTOR, DigitsClassifierFeatureExtractor)
    if SAFE_INCEPTION_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(SAFE_INCEPTION_EXTRACTOR, SafeInceptionV3)


register_digits_feature_extractor()


def registered_name(feature_extractor: str) -> str:
    """The torch-fidelity registry name behind a user-facing extractor name."""
    return SAFE_INCEPTION_EXTRACTOR if feature_extractor == INCEPTION_EXTRACTOR else feature_extractor


class ImageTensorDataset(Dataset):
    """A uint8 (N, 3, H, W) tensor as the map-style Dataset torch-fidelity reads (one image per item)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def check_uint8_images(images: torch.Tensor, what: str) -> torch.Tensor:
    """Return ``images`` on the CPU, contiguous, after checking it is uint8 (N >= 2, 3, H, W)."""
    require(torch.is_tensor(images), f"{what}: expected a torch.Tensor, got {type(images).__name__}")
    require(images.dtype == torch.uint8, f"{what}: expected dtype uint8 (0..255), got {images.dtype}")
    require(images.dim() == 4 and images.shape[1] == 3, f"{what}: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    # FID needs a covariance, i.e. at least two samples.
    require(images.shape[0] >= 2, f"{what}: need at least 2 images, got {images.shape[0]}")
    return images.detach().cpu().contiguous()


def list_image_files(folder: str | Path) -> list[Path]:
    """Sorted image files directly inside ``folder`` (``data.IMAGE_SUFFIXES``: png, jpg, jpeg, webp, bmp)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(folder: str | Path) -> torch.Tensor:
    """All images in ``folder`` (non-recursive) as uint8 (N, 3, H, W); they must share one size."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    require(folder.is_dir(), f"reference folder not found: {folder}")
    files = list_image_files(folder)
    require(len(files) >= 2, f"reference folder {folder} holds {len(files)} images ({', '.join(IMAGE_SUFFIXES)}); need at least 2")
    arrays = []
    for f in files:
        with Image.open(f) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    sizes = {a.shape for a in arrays}
    require(len(sizes) == 1, f"reference images in {folder} differ in size ({sorted(sizes)[:3]}...); resize them to one size first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def load_reference(reference: str | Path | torch.Tensor) -> torch.Tensor:
    """Reference images as uint8 (N, 3, H, W): ``"digits"`` (all 1,797 real digits, 32x32), a folder, or a tensor."""
    if torch.is_tensor(reference):
        return check_uint8_images(reference, "reference images")
    if str(reference) == DIGITS_REFERENCE:
        return digits_uint8(load_digits_32()[0])
    return check_uint8_images(load_image_folder(reference), f"reference folder {reference}")


def reference_size(reference: str | Path) -> int:
    """How many images ``"digits"`` or a reference folder holds (without loading them)."""
    if str(reference) == DIGITS_REFERENCE:
        return int(load_digits_8x8()[0].shape[0])
    return len(list_image_files(reference))


def default_inception_weights() -> Path:
    """Where torch.hub would have cached torch-fidelity's Inception weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def resolve_inception_weights(path: str | Path | None) -> Path:
    """A local Inception weights file (given, else torch.hub's cache) or a UserError: we never download."""
    if path is None:
        cached = default_inception_weights()
        require(cached.is_file(),
                f"feature extractor {INCEPTION_EXTRACTOR} needs local weights: pass --inception-weights PATH "
                f"(torch-fidelity's {INCEPTION_WEIGHTS_FILENAME}); none found at {cached} and nothing is downloaded")
        return cached
    path = Path(path)
    require(path.is_file(), f"Inception weights file not found: {path}")
    return path


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, memoised on (path, size, mtime) so a 100 MB weights file is read once."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def tensor_sha256(x: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's shape and bytes (a cache key for reference features)."""
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(x.contiguous().numpy().tobytes())
    return h.hexdigest()


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse a device string; a CUDA device without CUDA is a UserError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"bad device {device!r}: {e}") from None
    require(dev.type in ("cpu", "cuda"), f"device must be cpu or cuda[:N], got {device!r}")
    require(dev.type != "cuda" or torch.cuda.is_available(), f"device {device!r} requested but CUDA is not available")
    return dev


def compute_metrics(
    generated: torch.Tensor,
    reference: str | Path | torch.Tensor = DIGITS_REFERENCE,
    feature_extractor: str = DIGITS_EXTRACTOR,
    inception_weights: str | Path | None = None,
    classifier_path: str | Path | None = None,
    kid_subset_size: int = 1000,
    isc_splits: int = 10,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """FID, IS and KID of ``generated`` uint8 (N, 3, H, W) against ``reference`` via torch-fidelity.

    ``reference``: ``"digits"``, a folder of images, or a uint8 tensor. ``feature_extractor``:
    ``digits-classifier`` (weights: ``classifier_path`` or the shipped asset) or ``inception-v3-compat``
    (weights: ``inception_weights``, else torch.hub's cache; never downloaded). IS is computed on
    ``generated`` alone. ``kid_subset_size`` and ``isc_splits`` are clamped to the sample counts.
    ``cache_dir``: where torch-fidelity may cache reference features (keyed by content and weight hashes);
    None disables caching. Returns ``{fid, isc_mean, isc_std, kid_mean, kid_std}`` as floats.
    """
    import torch_fidelity

    require(feature_extractor in FEATURE_EXTRACTORS,
            f"unknown feature extractor {feature_extractor!r}; choose from {', '.join(FEATURE_EXTRACTORS)}")
    require(kid_subset_size >= 2 and isc_splits >= 1 and batch_size >= 1,
            f"kid_subset_size must be >= 2, isc_splits and batch_size >= 1 (got {kid_subset_size}, {isc_splits}, {batch_size})")
    if feature_extractor == INCEPTION_EXTRACTOR:
        weights = resolve_inception_weights(inception_weights)
    else:
        weights = resolve_classifier_files(classifier_path)[0]
    generated = check_uint8_images(generated, "generated images")
    reference = load_reference(reference)
    dev = torch.device(device)
    use_cuda = dev.type == "cuda" and torch.cuda.is_available()
    if dev.type == "cuda" and not use_cuda:
        warnings.warn(f"device {device} requested but CUDA is unavailable: computing metrics on the CPU", stacklevel=2)

    n_gen, n_ref = generated.shape[0], reference.shape[0]
    kwargs = dict(
        input1=ImageTensorDataset(generated),
        input2=ImageTensorDataset(reference),
        cuda=use_cuda,
        isc=True, fid=True, kid=True,
        feature_extractor=registered_name(feature_extractor),
        feature_extractor_weights_path=str(weights),
        batch_size=batch_size,
        kid_subset_size=min(kid_subset_size, n_gen, n_ref),
        isc_splits=min(isc_splits, n_gen),  # every split needs at least one sample
        save_cpu_ram=True,  # num_workers=0: no worker processes copying in-memory tensors
        verbose=verbose,
        cache=cache_dir is not None,
    )
    if cache_dir is not None:
        # Only the reference is cached; its key covers the images, the extractor and its weights.
        kwargs["cache_root"] = str(cache_dir)
        kwargs["input2_cache_name"] = f"ref-{tensor_sha256(reference)[:16]}-w-{file_sha256(weights)[:16]}"
    with torch.cuda.device(dev) if use_cuda else contextlib.nullcontext():
        out = torch_fidelity.calculate_metrics(**kwargs)
    return {
        "fid": float(out[torch_fidelity.KEY_METRIC_FID]),
        "isc_mean": float(out[torch_fidelity.KEY_METRIC_ISC_MEAN]),
        "isc_std": float(out[torch_fidelity.KEY_METRIC_ISC_STD]),
        "kid_mean": float(out[torch_fidelity.KEY_METRIC_KID_MEAN]),
        "kid_std": float(out[torch_fidelity.KEY_METRIC_KID_STD]),
    }


_EXTRACTORS: dict[tuple[str, str, str], FeatureExtractorBase] = {}


def feature_layers(feature_extractor: str) -> tuple[str, str]:
    """(layer for FID/KID/PRC, layer for IS) of a user-facing extractor name, as torch-fidelity picks them."""
    cls = FEATURE_EXTRACTORS_REGISTRY[registered_name(feature_extractor)]
    return cls.get_default_feature_layer_for_metric("fid"), cls.get_default_feature_layer_for_metric("isc")


def feature_dim(feature_extractor: str, classifier_path: str | Path | None = None) -> int:
    """Dimension of the FID features: the classifier's ``feature_dim`` (64 shipped) or Inception's 2048."""
    if feature_extractor == INCEPTION_EXTRACTOR:
        return 2048
    return int(load_digits_classifier(classifier_path).config["feature_dim"])


def extractor_weights(feature_extractor: str, inception_weights: str | Path | None,
                      classifier_path: str | Path | None) -> Path:
    """The weights file behind an extractor (what its features depend on; part of every cache key)."""
    if feature_extractor == INCEPTION_EXTRACTOR:
        return resolve_inception_weights(inception_weights)
    return resolve_classifier_files(classifier_path)[0]


@torch.no_grad()
def extract_features(images: torch.Tensor, feature_extractor: str, weights: str | Path,
                     device: str | torch.device = "cpu", batch_size: int = 64) -> dict[str, torch.Tensor]:
    """One pass of a torch-fidelity extractor over uint8 (N, 3, H, W) images.

    Returns ``{"features": (N, D) float32 for FID/KID/PRC, "logits": (N, C) for IS}`` on the CPU, through
    torch-fidelity's own ``create_feature_extractor`` / ``get_featuresdict_from_dataset``. The extractor
    is built once per (name, weights, device) and process.
    """
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    images = check_uint8_images(images, "images")
    dev = torch.device(device)
    use_cuda = dev.type == "cuda" and torch.cuda.is_available()
    fid_layer, isc_layer = feature_layers(feature_extractor)
    key = (feature_extractor, str(weights), str(dev))
    if key not in _EXTRACTORS:
        _EXTRACTORS.clear()  # one extractor at a time: Inception is 100 MB
        with torch.cuda.device(dev) if use_cuda else contextlib.nullcontext():
            _EXTRACTORS[key] = create_feature_extractor(
                registered_name(feature_extractor), [fid_layer, isc_layer], cuda=use_cuda,
                feature_extractor_weights_path=str(weights), verbose=False)
    with torch.cuda.device(dev) if use_cuda else contextlib.nullcontext():
        out = get_featuresdict_from_dataset(ImageTensorDataset(images), _EXTRACTORS[key], batch_size, use_cuda,
                                            save_cpu_ram=True, verbose=False)
    return {"features": out[fid_layer].float().contiguous(), "logits": out[isc_layer].float().contiguous()}


@torch.no_grad()
def classifier_predictions(images: torch.Tensor, classifier_path: str | Path | None = None,
                           device: str | torch.device = "cpu") -> torch.Tensor:
    """(N,) digits the classifier reads in uint8 (N, 3, H, W) ``images``."""
    clf = load_digits_classifier(classifier_path, device=device)
    return clf.predict(images.to(device).float() / 255.0).cpu()
