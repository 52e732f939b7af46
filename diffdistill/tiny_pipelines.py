"""Tiny Stable Diffusion pipelines: digits-SD's architecture, which ``train_scripts/train_digits_sd.py`` trains.

A tiny AutoencoderKL (3x32x32 <-> 4x8x8), a CLIP tokenizer over a 13-word vocabulary, a tiny frozen
CLIPTextModel, a UNet2DConditionModel and SD 1.5's noise schedule. Tests and benchmark scripts build
random-weight copies of the same pipeline with ``build_pipeline`` (``save_pipeline``: on disk) in about a second.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .digits import DIGITS_MARKER

# The whole vocabulary the prompts use; every other word falls back to byte-level tokens.
WORDS = ["a", "handwritten", "digit"] + [str(k) for k in range(10)]
TOKENIZER_MAX_LENGTH = 16


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the standard byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer_files(folder: Path) -> None:
    """Write a CLIP BPE vocabulary (vocab.json, merges.txt) that spells each word in WORDS as one token."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in WORDS:
        chars = list(word)
        if len(chars) == 1:
            continue
        # Left-to-right merge chain: ((h a) n) d ... the last merge adds the end-of-word marker.
        piece = chars[0]
        for i, c in enumerate(chars[1:], start=1):
            right = c + "</w>" if i == len(chars) - 1 else c
            merges.append(f"{piece} {right}")
            piece = piece + right
            tokens.append(piece)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tokenizer(folder: Path):
    """Return a CLIPTokenizer over the digits vocabulary (written into ``folder``)."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split(" ")) for line in (folder / "merges.txt").read_text().splitlines()[1:] if line]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TOKENIZER_MAX_LENGTH,
                         pad_token="<|endoftext|>")


def build_text_encoder(tokenizer, seed: int):
    """A tiny, frozen, randomly initialised CLIPTextModel (hidden size 32); frozen is the SD setting."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
    )
    model = CLIPTextModel(config).eval()
    model.requires_grad_(False)
    return model


def build_vae(**overrides):
    """AutoencoderKL 3x32x32 <-> 4x8x8 (three blocks, two downsamplings); ``overrides``: e.g. SD3's shift_factor."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        **overrides,
    )


def build_unet(time_cond_proj_dim: int | None = None):
    """UNet2DConditionModel for 4x8x8 latents, cross-attention dim 32 (the text encoder's width)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def build_scheduler(prediction_type: str = "epsilon"):
    """SD 1.5's noise schedule (scaled_linear betas 0.00085..0.012, 1000 steps) in a DDIMScheduler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_safety_parts() -> dict:
    """A tiny random StableDiffusionSafetyChecker (1-layer CLIP vision tower, 32 wide) and its CLIPImageProcessor,
    as StableDiffusionPipeline takes them (``requires_safety_checker=True``)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1)
    config = CLIPConfig(text_config={**tower, "vocab_size": 100},
                        vision_config={**tower, "image_size": 32, "patch_size": 4}, projection_dim=32)
    return {"safety_checker": StableDiffusionSafetyChecker(config).eval(),
            "feature_extractor": CLIPImageProcessor(size=32, crop_size=32), "requires_safety_checker": True}


def build_pipeline(seed: int = 0, prediction_type: str = "epsilon", safety_checker: bool = False):
    """An untrained digits-SD StableDiffusionPipeline with seeded random weights (for tests and smoke runs);
    ``safety_checker=True`` gives it a tiny random safety checker."""
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp) / "tok")
    text_encoder = build_text_encoder(tokenizer, seed)
    torch.manual_seed(seed)
    vae, unet = build_vae(), build_unet()
    scheduler = build_scheduler(prediction_type)
    safety = (build_safety_parts() if safety_checker else
              {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False})
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, **safety)


def save_pipeline(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon",
                  safety_checker: bool = False) -> str:
    """``build_pipeline(seed, prediction_type, safety_checker)`` saved to ``folder`` as safetensors, marked as a
    digits pipeline; returns the folder as a string."""
    build_pipeline(seed=seed, prediction_type=prediction_type,
                   safety_checker=safety_checker).save_pretrained(str(folder), safe_serialization=True)
    (Path(folder) / "diffdistill.json").write_text(json.dumps(DIGITS_MARKER) + "\n")  # a digits pipeline
    return str(folder)


SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)


def save_sd15_sized_pipeline(folder: Path, tiny: bool) -> None:
    """Save a random-weight SD pipeline for GPU smoke runs: SD 1.5's UNet (or a tiny one), a small VAE with 8x
    downsampling and a 1-layer text encoder of the UNet's cross-attention width."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    width = unet.config.cross_attention_dim
    tokenizer = build_tokenizer(folder.parent / "tokenizer-src")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
        num_attention_heads=4 if tiny else 12, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * (2 if tiny else 4),
                        up_block_types=("UpDecoderBlock2D",) * (2 if tiny else 4),
                        block_out_channels=(32, 32) if tiny else (32, 32, 64, 64), norm_num_groups=32,
                        sample_size=16 if tiny else 512)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)


# --------------------------------------------------------------------------------------------------
# Tiny flow-matching families (tests): SD3's MMDiT with its CLIP pair and no T5
# --------------------------------------------------------------------------------------------------

SD3_SHIFT = 3.0  # SD3's own scheduler shift, so that tests exercise the shifted schedule
TINY_SD3_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
    pos_embed_max_size=16,
)


def build_clip(tokenizer, seed: int, width: int = 16, layers: int = 1, projection: bool = True):
    """A tiny frozen CLIP text encoder: CLIPTextModelWithProjection (SDXL's second and SD3's two CLIPs) or,
    ``projection=False``, CLIPTextModel (SDXL's first, Flux's CLIP)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=TOKENIZER_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=width)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval().requires_grad_(False)


def build_t5(tokenizer, seed: int, width: int = 32):
    """A tiny frozen T5EncoderModel over the digits tokenizer's ids (SD3's third and Flux's second encoder)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2,
                      pad_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval().requires_grad_(False)


def build_sd3_pipeline(seed: int = 0, shift: float = SD3_SHIFT, t5: bool = True):
    """An untrained tiny StableDiffusion3Pipeline: a 2-block SD3Transformer2DModel on 4x8x8 latents, two CLIP
    text encoders of width 16 (joint 2 x 16 = 32 = joint_attention_dim; pooled 16 + 16 = 32), a tiny T5 of
    width 32 over the same digits vocabulary (``t5=False``: ``text_encoder_3=None``, the T5 tokens are zeros,
    as SD3 runs without T5), digits-SD's VAE and a ``FlowMatchEulerDiscreteScheduler`` with SD3's shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, tokenizer_2, tokenizer_3 = (build_tokenizer(Path(tmp) / f"tok{i}") for i in range(3))
    text_encoder, text_encoder_2 = build_clip(tokenizer, seed), build_clip(tokenizer_2, seed + 1)
    text_encoder_3 = build_t5(tokenizer_3, seed + 2) if t5 else None
    torch.manual_seed(seed)
    vae = build_vae(shift_factor=0.1)  # SD3's and Flux's VAEs shift latents before scaling them
    transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3 if t5 else None)


def save_sd3_pipeline(folder: str | Path, seed: int = 0, t5: bool = True) -> str:
    """``build_sd3_pipeline(seed, t5=t5)`` saved to ``folder`` as safetensors; returns the folder as a string."""
    build_sd3_pipeline(seed, t5=t5).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), cross_attention_dim=32,
    projection_class_embeddings_input_dim=8 * 6 + 16, norm_num_groups=32,
)


def build_sdxl_pipeline(seed: int = 0):
    """An untrained tiny StableDiffusionXLPipeline: SDXL's UNet layout (added text_time conditions, 8-d time ids,
    pooled width 16) on 4x8x8 latents, a CLIPTextModel and a CLIPTextModelWithProjection of width 16 (joint
    2 x 16 = 32 = cross_attention_dim), digits-SD's VAE and SD's noise schedule in an EulerDiscreteScheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, tokenizer_2 = (build_tokenizer(Path(tmp) / f"tok{i}") for i in range(2))
    text_encoder = build_clip(tokenizer, seed, layers=2, projection=False)
    text_encoder_2 = build_clip(tokenizer_2, seed + 1)
    torch.manual_seed(seed)
    vae, unet = build_vae(), UNet2DConditionModel(**TINY_SDXL_UNET)
    scheduler = EulerDiscreteScheduler.from_config(build_scheduler().config, timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def save_sdxl_pipeline(folder: str | Path, seed: int = 0) -> str:
    """``build_sdxl_pipeline(seed)`` saved to ``folder`` as safetensors; returns the folder as a string."""
    build_sdxl_pipeline(seed).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


# --------------------------------------------------------------------------------------------------
# Full-size random-weight SDXL and SD3 pipelines for GPU smoke runs (benchmarks/tools/gpu_smoke.py)
# --------------------------------------------------------------------------------------------------

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)


def _one_layer_clip(tokenizer, width: int, projection: bool):
    """A one-layer random CLIP text encoder of ``width`` (SDXL's and SD3's encoders are 768 and 1280 wide)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=1, num_attention_heads=width // 64, projection_dim=width,
                            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _smoke_vae(latent_channels: int, shift_factor: float | None):
    """A small random VAE with SD's 8x downsampling (four 32-wide blocks) and ``latent_channels``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(32, 32, 32, 32), norm_num_groups=32, sample_size=1024,
                         shift_factor=shift_factor)


def save_family_sized_pipeline(family: str, folder: Path, tiny: bool) -> None:
    """Save a random-weight pipeline of ``family`` for GPU smoke runs: ``sd15`` (SD 1.5's UNet), ``sdxl`` (SDXL's
    2.6B UNet, one-layer 768/1280 CLIPs) or ``sd3`` (SD3-medium's 2B MMDiT, one-layer CLIPs, no T5); ``tiny``:
    the test-sized pipelines of the same family (CPU)."""
    if family == "sd15":
        return save_sd15_sized_pipeline(folder, tiny)
    if tiny:
        (save_sdxl_pipeline if family == "sdxl" else save_sd3_pipeline)(folder)
        return None
    from diffusers import (
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    tok, tok2 = (build_tokenizer(folder.parent / f"tokenizer-src-{i}") for i in range(2))
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=_smoke_vae(4, None), text_encoder=_one_layer_clip(tok, 768, False),
            text_encoder_2=_one_layer_clip(tok2, 1280, True), tokenizer=tok, tokenizer_2=tok2,
            unet=UNet2DConditionModel(**SDXL_UNET), add_watermarker=False,
            scheduler=EulerDiscreteScheduler.from_config(build_scheduler().config, timestep_spacing="leading"))
    else:
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER), vae=_smoke_vae(16, 0.0609),
            text_encoder=_one_layer_clip(tok, 768, True), text_encoder_2=_one_layer_clip(tok2, 1280, True),
            tokenizer=tok, tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return None


def build_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """An untrained tiny FluxPipeline: a 1 + 1 block FluxTransformer2DModel on digits-SD's 4-channel 8x8 latents
    (packed 2x2: 16 tokens of 16 features), a CLIPTextModel (pooled width 32) and a tiny T5 (width 32), Flux's
    dynamically shifted flow-matching scheduler, and a guidance embedding (Flux-dev: the guidance scale is an
    input; ``guidance_embeds=False``: Flux-schnell's layout)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, tokenizer_2 = (build_tokenizer(Path(tmp) / f"tok{i}") for i in range(2))
    text_encoder = build_clip(tokenizer, seed, width=32, projection=False)
    text_encoder_2 = build_t5(tokenizer_2, seed + 1)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=build_vae(shift_factor=0.1), text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        transformer=transformer)


def save_flux_pipeline(folder: str | Path, seed: int = 0, guidance_embeds: bool = True) -> str:
    """``build_flux_pipeline(seed, guidance_embeds)`` saved to ``folder`` as safetensors; returns the folder."""
    build_flux_pipeline(seed, guidance_embeds).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)
