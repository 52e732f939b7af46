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
- ``inception-v3-compat`` would silently try to download its weights; here it needs a local file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from diffdistill.digits import digits_uint8, load_digits_32
from diffdistill.errors import UserError, require
from diffdistill.eval.digits_classifier import load_digits_classifier, resolve_classifier_files

DIGITS_EXTRACTOR = "digits-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
FEATURE_EXTRACTORS = (DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR)
# torch-fidelity's Inception weights file name (what torch.hub would have downloaded into its cache).
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
DIGITS_REFERENCE = "digits"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


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


def register_digits_feature_extractor() -> None:
    """Register ``digits-classifier`` with torch-fidelity (idempotent: the registry refuses duplicates)."""
    if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_EXTRACTOR, DigitsClassifierFeatureExtractor)


register_digits_feature_extractor()


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
    """Sorted image files directly inside ``folder`` (png, jpg, jpeg, bmp, webp)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(folder: str | Path) -> torch.Tensor:
    """All images in ``folder`` (non-recursive) as uint8 (N, 3, H, W); they must share one size."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    require(folder.is_dir(), f"reference folder not found: {folder}")
    files = list_image_files(folder)
    require(len(files) >= 2, f"reference folder {folder} holds {len(files)} images ({', '.join(IMAGE_EXTENSIONS)}); need at least 2")
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
        feature_extractor=feature_extractor,
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


@torch.no_grad()
def prompt_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier_path: str | Path | None = None,
                    device: str | torch.device = "cpu") -> float:
    """Fraction of uint8 (N, 3, H, W) ``images`` the digits classifier reads as ``labels`` (N,)."""
    require(images.shape[0] == labels.shape[0], f"{images.shape[0]} images but {labels.shape[0]} labels")
    clf = load_digits_classifier(classifier_path, device=device)
    pred = clf.predict(images.to(device).float() / 255.0).cpu()
    return float((pred == labels.cpu()).double().mean())
