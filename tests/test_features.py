"""Feature plumbing (diffdistill/features.py): taps return what they promise, only when asked, and go away."""

from __future__ import annotations

import pytest
import torch

from diffdistill.errors import UserError
from diffdistill.features import (
    FeatureHead,
    FeatureTaps,
    TeacherFeatureNetwork,
    stage_modules,
    use_classic_attention,
)


@pytest.fixture(scope="module")
def unet(tiny_sd):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()


def _inputs(unet, b=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(b, 4, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 500][:b]), text


def test_taps_return_block_outputs_with_the_promised_shapes_only_inside_capture(unet):
    x, t, text = _inputs(unet)
    names = [f"down.{i}" for i in range(len(unet.down_blocks))] + ["mid", "up.0"]
    taps = FeatureTaps(stage_modules(unet, names))
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=text)
    assert taps.features == {}  # not capturing: nothing kept
    with torch.no_grad(), taps.capture():
        out = unet(x, t, encoder_hidden_states=text).sample
    assert list(taps.features) == names  # in the order the blocks ran
    chans = unet.config.block_out_channels
    sizes = [8 // 2 ** min(i + 1, len(chans) - 1) for i in range(len(chans))]  # the last down block keeps its size
    for i, c in enumerate(chans):
        assert tuple(taps.features[f"down.{i}"].shape) == (2, c, sizes[i], sizes[i])
    assert tuple(taps.features["mid"].shape) == (2, chans[-1], sizes[-1], sizes[-1])
    assert taps.features["up.0"].shape[1] == chans[-1]
    # The taps see the real activations: the mid block's own output on the same inputs.
    n_before = len(taps.features)
    taps.remove()
    with torch.no_grad(), taps.capture():
        again = unet(x, t, encoder_hidden_states=text).sample
    assert taps.features == {} and n_before == len(names)  # removed hooks keep nothing
    torch.testing.assert_close(out, again)  # taps never change the network's output


def test_always_on_tap_keeps_the_latest_call(unet):
    x, t, text = _inputs(unet)
    tap = FeatureTaps(stage_modules(unet, ["mid"]), always=True)
    try:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=text)
            first = tap.features["mid"].clone()
            unet(x * 2, t, encoder_hidden_states=text)
        assert not torch.equal(first, tap.features["mid"])
    finally:
        tap.remove()


def test_unknown_block_names_are_one_line_errors(unet):
    with pytest.raises(UserError, match="unknown UNet block.*down.9"):
        stage_modules(unet, ["down.9"])


def test_teacher_feature_network_and_heads(unet):
    x, t, text = _inputs(unet)
    net = TeacherFeatureNetwork(unet)
    feats, cond = net(x, t, text)
    assert [f.shape[1] for f in feats] == net.channels()
    assert cond.shape == (2, net.cond_dim(text.shape[-1]))
    heads = [FeatureHead(c, cond.shape[1]) for c in net.channels()]
    logits = [h(f, cond) for h, f in zip(heads, feats)]
    assert all(tuple(g.shape) == (2,) for g in logits)
    net.taps.remove()
    net.temb_tap.remove()


def test_classic_attention_allows_double_backward(unet):
    import copy

    from diffusers.models.attention_processor import AttnProcessor

    net = use_classic_attention(copy.deepcopy(unet))
    assert all(isinstance(p, AttnProcessor) for p in net.attn_processors.values())
    x, t, text = _inputs(net, b=1)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(net(x, t, encoder_hidden_states=text).sample.square().sum(), x, create_graph=True)
    g.square().sum().backward()  # R1's second derivative
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0  # a real second derivative
