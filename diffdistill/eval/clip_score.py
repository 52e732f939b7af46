"""CLIP score (Hessel et al. 2021) of each sample against its prompt, with a local transformers CLIP model.

Per sample: ``max(100 · cos(image embedding, text embedding), 0)``, as torchmetrics' ``CLIPScore`` defines
it; the bench keeps the per-sample scores so the mean gets a bootstrap interval and paired comparisons.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffdistill.errors import UserError, first_line, require

_LOADED: dict[tuple[str, str], tuple] = {}


def check_clip_folder(path: str | Path) -> Path:
    """A local CLIP folder (config.json + weights + tokenizer + preprocessor) or a one-line UserError."""
    path = Path(path)
    require(path.is_dir(), f"--clip-model {path}: folder not found (a local transformers CLIP checkpoint)")
    require((path / "config.json").is_file(), f"--clip-model {path}: no config.json (not a transformers CLIP folder)")
    require((path / "preprocessor_config.json").is_file(),
            f"--clip-model {path}: no preprocessor_config.json (save a CLIPImageProcessor with the model)")
    return path


def load_clip(path: str | Path, device: torch.device):
    """(CLIPModel, CLIPProcessor) from a local folder, in eval mode on ``device``; loaded once per process."""
    from transformers import CLIPModel, CLIPProcessor

    key = (str(Path(path).resolve()), str(device))
    if key not in _LOADED:
        _LOADED.clear()
        try:
            model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
            processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--clip-model {path}: could not load a CLIP model ({first_line(e)})") from None
        _LOADED[key] = (model, processor)
    return _LOADED[key]


def _embedding(output) -> torch.Tensor:
    """transformers >= 5 returns a model output whose pooler_output is the projection; older versions a tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


@torch.no_grad()
def clip_scores(images: torch.Tensor, prompts: list[str], path: str | Path, device: torch.device,
                batch_size: int = 64) -> torch.Tensor:
    """(N,) CLIP scores of uint8 (N, 3, H, W) ``images`` against ``prompts`` (one per image)."""
    model, processor = load_clip(path, device)
    max_length = getattr(processor.tokenizer, "model_max_length", 77)
    out = []
    for start in range(0, images.shape[0], batch_size):
        imgs = list(images[start:start + batch_size])
        text = prompts[start:start + batch_size]
        pixels = processor(images=imgs, return_tensors="pt")["pixel_values"].to(device)
        tokens = processor.tokenizer(text, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        img = _embedding(model.get_image_features(pixel_values=pixels))
        txt = _embedding(model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                 attention_mask=tokens["attention_mask"].to(device)))
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        out.append((100 * cos).clamp(min=0).cpu())
    return torch.cat(out)
