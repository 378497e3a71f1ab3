"""Tests of mmfuse.modules.audio_frontend: the channels-last wav2vec2 feature encoder computes
what transformers' feature encoder computes, on the same parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_w2v_config
from torch import nn
from transformers import Wav2Vec2Model
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder

from mmfuse.modules.audio_frontend import ChannelsLastFeatureEncoder
from mmfuse.modules.encoders import AudioEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(**overrides):
    """Three conv layers of different widths, kernels and strides."""
    layers = dict(conv_dim=[8, 12, 16], conv_kernel=[10, 8, 4], conv_stride=[5, 4, 4])
    return tiny_w2v_config(**{**layers, **overrides})


def _pair(**overrides) -> tuple[nn.Module, ChannelsLastFeatureEncoder]:
    """The transformers encoder and a channels-last one on a deep copy of its layers."""
    torch.manual_seed(0)
    original = Wav2Vec2FeatureEncoder(_config(**overrides))
    for param in original.parameters():  # LayerNorms start at 1 and 0: make them matter
        nn.init.normal_(param, std=0.3)
    return original, ChannelsLastFeatureEncoder(copy.deepcopy(original))


@pytest.mark.parametrize("conv_bias", [False, True])
def test_forward_and_gradients_equal_transformers(conv_bias):
    original, fast = _pair(conv_bias=conv_bias)
    waves = torch.randn(3, 1600, generator=torch.Generator().manual_seed(1))
    want, got = original(waves), fast(waves)
    assert got.shape == want.shape == (3, 16, 19)  # 1600 samples -> 319 -> 78 -> 19 frames
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    weights = torch.randn_like(want)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    for (name, a), b in zip(original.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    original, fast = _pair()
    waves = torch.randn(2, 1600, generator=torch.Generator().manual_seed(2))
    fast(waves).square().sum().backward()
    plain = [p.grad.clone() for p in fast.parameters()]
    fast.zero_grad()
    for layer in fast.conv_layers:
        layer.gradient_checkpointing = True
    out = fast(waves)
    assert out.grad_fn is not None
    out.square().sum().backward()
    for a, b in zip(plain, fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a, rtol=1e-5, atol=1e-6)


def test_a_wrapped_convolution_runs_its_own_forward():
    """An adapter around a convolution (as LoRA puts there) is not bypassed."""

    class Negated(nn.Module):
        def __init__(self, conv: nn.Conv1d) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -self.conv(x)

    original, fast = _pair()
    for encoder in (original, fast):
        encoder.conv_layers[1].conv = Negated(encoder.conv_layers[1].conv)
    waves = torch.randn(2, 1600, generator=torch.Generator().manual_seed(3))
    bare = ChannelsLastFeatureEncoder(_pair()[0])  # unwrapped: must differ
    assert not torch.allclose(bare(waves), original(waves), atol=1e-3)
    torch.testing.assert_close(fast(waves), original(waves), rtol=1e-5, atol=1e-5)


def test_only_layer_norm_front_ends_are_supported():
    assert ChannelsLastFeatureEncoder.supports(Wav2Vec2FeatureEncoder(_config()))
    group = Wav2Vec2FeatureEncoder(_config(feat_extract_norm="group", do_stable_layer_norm=False))
    assert not ChannelsLastFeatureEncoder.supports(group)
    assert not ChannelsLastFeatureEncoder.supports(None)
    with pytest.raises(ValueError, match="not a LayerNorm conv feature encoder"):
        ChannelsLastFeatureEncoder(group)


def test_audio_encoder_uses_it_with_the_same_parameter_names():
    encoder = AudioEncoder(d_model=8, config=_config())
    assert isinstance(encoder.backbone.feature_extractor, ChannelsLastFeatureEncoder)
    plain = Wav2Vec2Model(_config())
    assert set(encoder.backbone.state_dict()) == set(plain.state_dict())
    grouped = AudioEncoder(d_model=8, config=_config(feat_extract_norm="group"))
    assert type(grouped.backbone.feature_extractor) is Wav2Vec2FeatureEncoder


def test_freeze_feature_encoder_freezes_it():
    encoder = AudioEncoder(d_model=8, config=_config())
    encoder.backbone.freeze_feature_encoder()
    extractor = encoder.backbone.feature_extractor
    assert not any(p.requires_grad for p in extractor.parameters())
    assert all(p.requires_grad for p in encoder.backbone.encoder.parameters())
