"""A small CNN that reads 8x8 handwritten digits: the judge behind digits FID/IS/KID and prompt accuracy.

It is trained by ``train_scripts/train_digits_classifier.py`` on scikit-learn's digits and shipped in
``assets/digits-classifier/`` (``model.safetensors`` + ``config.json``; no pickles). Whatever the input
resolution, images are first reduced to the 8x8 grey grid the digits live on (``downscale_to_8x8``), so
32x32 digits-SD samples and the original 8x8 digits are judged identically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffdistill.digits import downscale_to_8x8
from diffdistill.errors import UserError, require

# <repo>/assets/digits-classifier, next to the package (editable install / source checkout).
DEFAULT_CLASSIFIER_DIR = Path(__file__).resolve().parents[2] / "assets" / "digits-classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class DigitsClassifier(nn.Module):
    """Conv(1->c1) -> Conv(c1->c2) -> pool -> Conv(c2->c2) -> pool -> MLP(feature_dim) -> 10 logits.

    Inputs are images in [0, 1]: (N, 3, H, W), (N, 1, H, W) or (N, H, W); they are averaged to grey and
    pooled to 8x8 before the network sees them.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), feature_dim: int = 64, num_classes: int = 10,
                 dropout: float = 0.2):
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        self.config = {"channels": [c1, c2], "feature_dim": int(feature_dim), "num_classes": int(num_classes),
                       "dropout": float(dropout)}
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 2 * 2, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def to_grey_8x8(x: torch.Tensor) -> torch.Tensor:
        """Any accepted input -> (N, 1, 8, 8) float grey in [0, 1]."""
        if x.dim() == 3:  # (N, H, W)
            x = x[:, None]
        if x.dim() != 4:
            raise ValueError(f"expected images (N, C, H, W) or (N, H, W), got shape {tuple(x.shape)}")
        return downscale_to_8x8(x.float())[:, None]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim): what FID and KID compare."""
        x = self.to_grey_8x8(x) * 2.0 - 1.0  # centre the input; (N, 1, 8, 8)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)  # (N, c2, 4, 4)
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(x, 2)  # (N, c2, 2, 2)
        return F.relu(self.fc(x.flatten(1)))  # (N, feature_dim)

    def logits_from_features(self, feats: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """(N, feature_dim) -> (N, 10) logits; ``bias=False`` gives IS's "unbiased" logits as for Inception."""
        feats = self.dropout(feats)
        return self.head(feats) if bias else feats @ self.head.weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) images in [0, 1] -> (N, 10) class logits."""
        return self.logits_from_features(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """(N, ...) images in [0, 1] -> (N,) predicted digit labels, evaluated in batches."""
        was_training = self.training
        self.eval()
        out = [self(x[i:i + batch_size]).argmax(dim=1) for i in range(0, x.shape[0], batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def resolve_classifier_files(path: str | Path | None = None) -> tuple[Path, Path]:
    """Return (weights file, config file) for a classifier folder or a ``model.safetensors`` path."""
    path = Path(path) if path is not None else DEFAULT_CLASSIFIER_DIR
    if path.suffix == ".safetensors" and not path.is_dir():
        weights, config = path, path.parent / CONFIG_NAME
    else:
        weights, config = path / WEIGHTS_NAME, path / CONFIG_NAME
    require(weights.is_file() and config.is_file(),
            f"digits classifier not found: expected {weights} and {config} "
            f"(train it with `python train_scripts/train_digits_classifier.py`)")
    return weights, config


def load_digits_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitsClassifier:
    """Load the shipped classifier (default ``assets/digits-classifier``) in eval mode, frozen."""
    from safetensors.torch import load_file

    weights, config_file = resolve_classifier_files(path)
    try:
        config = json.loads(config_file.read_text())
        arch = config["architecture"]
    except (json.JSONDecodeError, KeyError) as e:
        raise UserError(f"{config_file} is not a digits classifier config ({type(e).__name__}: {e})") from None
    require(arch == "DigitsClassifier", f"{config_file}: unknown architecture {arch!r}, expected 'DigitsClassifier'")
    model = DigitsClassifier(channels=tuple(config["channels"]), feature_dim=config["feature_dim"],
                             num_classes=config["num_classes"], dropout=config.get("dropout", 0.0))
    model.load_state_dict(load_file(str(weights)))
    model.requires_grad_(False)
    return model.to(device).eval()


def save_digits_classifier(model: DigitsClassifier, folder: str | Path, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture + ``extra`` metadata) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"architecture": "DigitsClassifier", **model.config, **(extra or {})}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder
