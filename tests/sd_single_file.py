"""Test helper: a diffusers Stable Diffusion pipeline written as one ``.safetensors`` file in the original
(CompVis/LDM) layout, the way community fine-tunes are shared.

diffusers reads that layout (``from_single_file``) but writes it only in a script outside the package, so this is
the inverse of its ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` / ``convert_ldm_clip_checkpoint``
for the block layouts SD 1.x and the tiny digits-SD use (any number of blocks and layers per block, cross-attention
blocks where the config says so); the tests check the round trip tensor for tensor.
"""

from __future__ import annotations

import torch

UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out."))


def _unet_prefixes(config) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, original prefix, is a resnet) for every block of a UNet2DConditionModel config."""
    per = config["layers_per_block"] + 1  # an input/output block slot per layer, plus the down/up sampler's
    n = len(config["down_block_types"])
    out = []
    for i in range(n):
        for j in range(config["layers_per_block"]):
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i * per + j + 1}.0.", True))
            out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i * per + j + 1}.1.", False))
        if i < n - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * per}.0.op.", False))
        has_attention = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(per):
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * per + j}.0.", True))
            out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * per + j}.1.", False))
        if i < n - 1:
            slot = 2 if has_attention else 1
            out.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * per + per - 1}.{slot}.", False))
    out += [("mid_block.resnets.0.", "middle_block.0.", True), ("mid_block.attentions.0.", "middle_block.1.", False),
            ("mid_block.resnets.1.", "middle_block.2.", True)]
    return out


def unet_to_original(state: dict, config) -> dict:
    """A UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    prefixes = _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        if key in top:
            new = top[key]
        else:
            ours, theirs, resnet = next(p for p in prefixes if key.startswith(p[0]))
            rest = key[len(ours):]
            if resnet:
                rest = next((b + rest[len(a):] for a, b in UNET_RESNET if rest.startswith(a)), rest)
            new = theirs + rest
        out["model.diffusion_model." + new] = value
    return out


def vae_to_original(state: dict, config) -> dict:
    """An AutoencoderKL state dict -> ``first_stage_model.*`` keys (attention projections as 1x1 convolutions)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n = len(config["down_block_types"])
    prefixes = [("encoder.mid_block.resnets.0.", "encoder.mid.block_1."),
                ("encoder.mid_block.resnets.1.", "encoder.mid.block_2."),
                ("decoder.mid_block.resnets.0.", "decoder.mid.block_1."),
                ("decoder.mid_block.resnets.1.", "decoder.mid.block_2.")]
    for i in range(n):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                     (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                     (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                     (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    out = {}
    for key, value in state.items():
        if key in top:
            new = top[key]
        elif ".mid_block.attentions.0." in key:
            part, rest = key.split(".mid_block.attentions.0.")
            rest = next(rest.replace(a, b, 1) for a, b in VAE_ATTENTION if rest.startswith(a))
            new = f"{part}.mid.attn_1.{rest}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # (out, in) -> (out, in, 1, 1)
        else:
            ours, theirs = next(p for p in prefixes if key.startswith(p[0]))
            new = theirs + key[len(ours):].replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + new] = value
    return out


def to_original_layout(pipe) -> dict[str, torch.Tensor]:
    """UNet, VAE and CLIP text encoder of an SD 1.x pipeline in one original-layout state dict."""
    state = {**unet_to_original(pipe.unet.state_dict(), pipe.unet.config),
             **vae_to_original(pipe.vae.state_dict(), pipe.vae.config)}
    # the original layout names transformers' CLIPTextModel weights text_model.* (transformers 5 leaves that out)
    state.update({"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
                  for k, v in pipe.text_encoder.state_dict().items()})
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def save_single_file(pipe, path) -> str:
    """Write ``pipe`` as one original-layout ``.safetensors`` file; returns its path."""
    from safetensors.torch import save_file

    save_file(to_original_layout(pipe), str(path))
    return str(path)
