"""Evaluation: the digits classifier, the torch-fidelity feature extractor and metrics, and `diffdistill bench`.

The classifier and torch-fidelity tests run on real digits in a few seconds; the bench itself is in
tests/test_bench.py.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from diffdistill.digits import digits_uint8, load_digits_8x8, load_digits_32
from diffdistill.errors import UserError
from diffdistill.eval import fidelity
from diffdistill.eval.digits_classifier import (
    DEFAULT_CLASSIFIER_DIR,
    DigitsClassifier,
    load_digits_classifier,
    save_digits_classifier,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: single-threaded torch and BLAS


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
    with pytest.raises(UserError, match=r"Inception weights file not found: .*missing\.pth"):
        fidelity.compute_metrics(real_digits[:10], real_digits[10:20], feature_extractor="inception-v3-compat",
                                 inception_weights=tmp_path / "missing.pth")


def test_bad_images_are_user_errors(real_digits):
    with pytest.raises(UserError, match=r"expected dtype uint8 \(0\.\.255\), got torch\.float32"):
        fidelity.compute_metrics(real_digits[:10].float(), "digits")
    with pytest.raises(UserError, match="at least 2"):
        fidelity.compute_metrics(real_digits[:1], "digits")


# ---------------------------------------------------------------------------------------------- bench
# (the bench itself: tests/test_bench.py)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
