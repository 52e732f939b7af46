"""Feature plumbing shared by the methods that look inside networks: forward-hook taps, the projection
heads that classify tapped features, the attention-processor swap that double backward needs, the
frozen feature networks of ADD/LADD's discriminator, and ``frozen``: a generator's loss read through a critic
without training the critic.

ADD taps the frozen teacher's down and mid blocks (a transformer's blocks: SD3-Turbo's LADD), DMD2's GAN
head taps the fake score network's mid block, and feature knowledge distillation taps matching blocks of
teacher and student: all through :class:`FeatureTaps`, so a hook is registered, read and cleared in one way.
A transformer block's image tokens (B, N, C) are folded back to the latent grid (B, C, h, w) as they are kept.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserError, require


def first_output(output):
    """The tensor a block returns: diffusers' down blocks return (hidden, residuals), others a tensor."""
    return output[0] if isinstance(output, tuple) else output


def image_tokens_as_grid(output) -> torch.Tensor:
    """A joint transformer block's image stream, (encoder_hidden_states, hidden_states) -> hidden (B, N, C),
    folded to the square latent-patch grid (B, C, sqrt N, sqrt N)."""
    h = output[1] if isinstance(output, tuple) else output
    side = int(round(h.shape[1] ** 0.5))
    return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)


def is_transformer(net) -> bool:
    """True for a diffusers transformer denoiser (SD3's MMDiT, Flux): it has ``transformer_blocks``."""
    return hasattr(getattr(net, "module", net), "transformer_blocks")


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module):
    """Parameters of ``modules`` do not require grad inside the block, and get their flags back after.

    A graph built inside still carries gradients *through* the modules (to their inputs) but records
    none *for* their parameters, so a later backward leaves them untouched: a generator's loss read
    through its critic."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


class FeatureTaps:
    """Forward hooks on ``modules`` (name -> module) that keep each module's output while capturing.

    ``always=True`` keeps the latest output of every call (DMD2's head reads the mid block after the fake
    network's own pass); otherwise outputs are kept only inside ``capture()``, so the same network can run
    untapped elsewhere. ``features`` maps name -> the latest output, in registration order.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], always: bool = False, pick=first_output):
        self.features: dict[str, torch.Tensor] = {}
        self._capturing = always
        self._pick = pick  # block output -> the kept tensor (``stage_pick``)
        self._handles = [module.register_forward_hook(self._keeper(name)) for name, module in modules.items()]

    def _keeper(self, name: str):
        def keep(module, inputs, output):
            if self._capturing:
                self.features[name] = self._pick(output)
        return keep

    def capture(self) -> _Capture:
        """Context manager: clear ``features``, keep outputs inside the block, stop keeping them after it."""
        return _Capture(self)

    def values(self) -> list[torch.Tensor]:
        """The kept outputs in registration order."""
        return list(self.features.values())

    def remove(self) -> None:
        """Unregister every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _Capture:
    def __init__(self, taps: FeatureTaps):
        self.taps = taps

    def __enter__(self) -> FeatureTaps:
        self._was = self.taps._capturing
        self.taps.features = {}
        self.taps._capturing = True
        return self.taps

    def __exit__(self, *exc) -> None:
        self.taps._capturing = self._was


def stage_modules(net, names: Iterable[str] = ()) -> dict[str, torch.nn.Module]:
    """Named blocks to tap. A UNet: ``down.0``..``down.K``, ``mid``, ``up.0``.. (default: every down block + mid);
    a transformer: ``block.0``..``block.K`` and ``mid`` (the middle block) (default: every block)."""
    if is_transformer(net):
        blocks = getattr(net, "module", net).transformer_blocks
        table = {f"block.{i}": b for i, b in enumerate(blocks)}
        table["mid"] = blocks[len(blocks) // 2]
        default = [f"block.{i}" for i in range(len(blocks))]
    else:
        table = {f"down.{i}": b for i, b in enumerate(net.down_blocks)}
        table["mid"] = net.mid_block
        table.update({f"up.{i}": b for i, b in enumerate(net.up_blocks)})
        default = [*(f"down.{i}" for i in range(len(net.down_blocks))), "mid"]
    names = list(names) or default
    unknown = [n for n in names if n not in table]
    kind = "transformer" if is_transformer(net) else "UNet"
    require(not unknown, f"unknown {kind} block(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    return {n: table[n] for n in names}


def stage_channels(net, names: Iterable[str] = ()) -> list[int]:
    """Channels of the feature maps that ``stage_modules(net, names)`` keep."""
    cfg = getattr(net, "module", net).config
    if is_transformer(net):
        return [cfg.num_attention_heads * cfg.attention_head_dim] * len(stage_modules(net, names))
    width = {f"down.{i}": c for i, c in enumerate(cfg.block_out_channels)}
    width["mid"] = cfg.block_out_channels[-1]
    width.update({f"up.{i}": c for i, c in enumerate(reversed(cfg.block_out_channels))})
    return [width[n] for n in stage_modules(net, names)]


def stage_pick(net):
    """How a tapped block's output becomes a feature map: ``first_output`` for UNet blocks, the image tokens
    folded to the grid for transformer blocks."""
    return image_tokens_as_grid if is_transformer(net) else first_output


def use_classic_attention(module: torch.nn.Module) -> torch.nn.Module:
    """Swap every attention processor of a diffusers model for ``AttnProcessor`` (in place; returns it).

    R1 penalties differentiate a gradient: PyTorch's SDPA kernels have no double backward (on CPU at
    least), the classic matmul-softmax processor has."""
    from diffusers.models.attention_processor import AttnProcessor

    if is_transformer(module):  # joint (MMDiT) attention has its own processors: see ``math_attention``
        return module
    module.set_attn_processor(AttnProcessor())
    return module


def math_attention(on: bool = True):
    """Context: scaled_dot_product_attention on PyTorch's math kernel (differentiable twice) when ``on``."""
    if not on:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class FeatureHead(torch.nn.Module):
    """A projection-discriminator head on one feature map: per-location logits plus <cond, features>."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        groups = 32 if channels % 32 == 0 else 1
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.GroupNorm(groups, channels), torch.nn.SiLU(),
            torch.nn.Conv2d(channels, channels, 1))
        self.out = torch.nn.Conv2d(channels, 1, 1)
        self.cond = torch.nn.Linear(cond_dim, channels)

    def forward(self, feat: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features + (B, cond_dim) conditioning -> (B,) logits."""
        h = self.body(feat.float())  # (B, C, h, w)
        logits = self.out(h) + (h * self.cond(cond.float())[:, :, None, None]).sum(1, keepdim=True) / h.shape[1] ** 0.5
        return logits.flatten(1).mean(1)  # (B,)


class TeacherFeatureNetwork(torch.nn.Module):
    """LADD: the frozen teacher network's features on noised latents (a UNet's down/mid blocks, a transformer's
    blocks), and its noise embedding. ``denoiser`` (``Teacher.denoiser(unet)``) calls it as its family does
    (default: a UNet called with the timesteps as given)."""

    def __init__(self, unet, denoiser=None, double_backward: bool = False):
        super().__init__()
        self.unet = unet
        self._denoiser = denoiser
        if double_backward:
            use_classic_attention(unet)
        # a transformer keeps its joint-attention processors; their SDPA runs on the math kernel, which has
        # the double backward R1 needs (the fused CPU and flash kernels have none)
        self._math_attention = double_backward and is_transformer(unet)
        self.taps = FeatureTaps(stage_modules(self.unet), pick=stage_pick(self.unet))
        # the noise-level embedding: a UNet's time_embedding, an MMDiT's time_text_embed (noise level + pooled text)
        temb = self.unet.time_text_embed if is_transformer(self.unet) else self.unet.time_embedding
        self.temb_tap = FeatureTaps({"temb": temb})

    def channels(self) -> list[int]:
        """Channels of each tapped feature map."""
        return stage_channels(self.unet)

    def cond_dim(self, text_dim: int) -> int:
        """Width of the conditioning vector: pooled text + the network's noise-level embedding."""
        if is_transformer(self.unet):
            return text_dim + stage_channels(self.unet, ["mid"])[0]
        return text_dim + self.unet.time_embedding.linear_2.out_features

    def forward(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor):
        """(features per block, conditioning vector = [pooled text, noise-level embedding])."""
        with self.taps.capture(), self.temb_tap.capture(), math_attention(self._math_attention):
            if self._denoiser is None:
                self.unet(latents, t, encoder_hidden_states=text)
            else:
                self._denoiser.model_output(latents, t, text)
        cond = torch.cat([text.mean(1).float(), self.temb_tap.features["temb"].float()], dim=1)
        return self.taps.values(), cond


class ImageFeatureNetwork(torch.nn.Module):
    """An image model from a local folder (e.g. DINOv2): hidden states of several layers on decoded images."""

    def __init__(self, path: str, vae, scaling_factor: float, double_backward: bool = False):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        p = Path(path)
        require(p.is_dir(), f"--feature-network {path!r}: not 'teacher' and not a local model folder")
        try:
            AutoConfig.from_pretrained(str(p), local_files_only=True)
            # R1 needs double backward, which SDPA kernels lack: eager attention then.
            kwargs = {"attn_implementation": "eager"} if double_backward else {}
            self.model = AutoModel.from_pretrained(str(p), local_files_only=True, **kwargs).eval().requires_grad_(False)
        except Exception as e:  # noqa: BLE001 - any failure to read the folder is one line for the user
            raise UserError(f"--feature-network {path}: cannot load a model offline: {str(e).splitlines()[0]}") from None
        if double_backward:
            vae = use_classic_attention(copy.deepcopy(vae))
        self.vae, self.scaling = vae, scaling_factor
        size = getattr(self.model.config, "image_size", 224)
        self.size = size if isinstance(size, int) else size[0]
        hidden = getattr(self.model.config, "hidden_size", None)
        require(hidden is not None, f"--feature-network {path}: the model config has no hidden_size")
        self.hidden = hidden
        layers = getattr(self.model.config, "num_hidden_layers", 4)
        self.layers = sorted({max(1, layers * k // 4) for k in (1, 2, 3, 4)})

    def channels(self) -> list[int]:
        """Channels of each tapped layer (the model's hidden size)."""
        return [self.hidden] * len(self.layers)

    def cond_dim(self, text_dim: int) -> int:
        """Width of the conditioning vector: pooled text."""
        return text_dim

    def forward(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor):
        """(features per layer folded to grids, pooled text) of the decoded ``latents``."""
        images = self.vae.decode(latents / self.scaling).sample.clamp(-1, 1)  # differentiable decode
        images = F.interpolate((images + 1) / 2, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = self.model(pixel_values=images, output_hidden_states=True)
        feats = []
        for i in self.layers:
            h = out.hidden_states[i]  # (B, 1 + N, D) tokens: drop the class token, fold to a grid
            tokens = h[:, 1:] if h.shape[1] > 1 else h
            side = int(tokens.shape[1] ** 0.5)
            feats.append(tokens[:, : side * side].transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side))
        return feats, text.mean(1).float()


def unet_block_shapes(config) -> dict[str, tuple[int, int]]:
    """What a UNet2DConditionModel's block outputs look like: name (``down.i``, ``mid``, ``up.j``) -> (channels,
    downscale), the output being (B, channels, sample_size / downscale, sample_size / downscale). Every down block
    but the last halves the resolution, every up block but the last doubles it."""
    channels = list(config["block_out_channels"])
    n = len(channels)
    shapes = {f"down.{i}": (channels[i], 2 ** min(i + 1, n - 1)) for i in range(n)}
    if config.get("mid_block_type") is not None:
        shapes["mid"] = (channels[-1], 2 ** (n - 1))
    shapes.update({f"up.{j}": (channels[n - 1 - j], 2 ** max(0, n - 2 - j)) for j in range(n)})
    return shapes


class ChannelProjections(torch.nn.Module):
    """Feature KD's projections P_k: a 1x1 convolution from the student's width to the teacher's for every tapped
    pair whose widths differ (FitNets, Romero et al. 2015), the identity where they agree."""

    def __init__(self, widths: dict[str, tuple[int, int]]):
        super().__init__()
        self.convs = torch.nn.ModuleDict({name.replace(".", "_"): torch.nn.Conv2d(c_s, c_t, 1)
                                          for name, (c_s, c_t) in widths.items() if c_s != c_t})

    def forward(self, name: str, feat: torch.Tensor) -> torch.Tensor:
        """The student feature ``feat`` (B, C_s, h, w) of pair ``name`` in the teacher's width (B, C_t, h, w)."""
        conv = self.convs[name.replace(".", "_")] if name.replace(".", "_") in self.convs else None
        return feat if conv is None else conv(feat)
