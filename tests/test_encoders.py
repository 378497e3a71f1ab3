"""Tests of mmfuse.modules.encoders: vision (timm ViT), audio (wav2vec2), text (BERT)."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import assert_skipped_without_autograd, tiny_w2v_config, tokenizer
from safetensors.torch import save_file
from transformers import BertConfig

from mmfuse.modules.encoders import AudioEncoder, TextEncoder, VisionEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = 8
VIT = dict(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)


@pytest.fixture
def vision():
    torch.manual_seed(0)
    return VisionEncoder(D, **VIT).eval()


@pytest.fixture
def audio():
    torch.manual_seed(0)
    return AudioEncoder(D, config=tiny_w2v_config()).eval()


def _frames(length: int) -> int:
    """Output frames of the (10, 5), (8, 8), (8, 8) conv stack."""
    for kernel, stride in ((10, 5), (8, 8), (8, 8)):
        length = (length - kernel) // stride + 1
    return length


def _assert_all_grads(module: torch.nn.Module, zero: bool) -> None:
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        assert param.grad is not None, name
        if zero:
            assert (param.grad == 0).all(), name


# ----------------------------------------------------------------------------- vision


def test_vision_shapes_and_mask(vision):
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    present = torch.tensor([True, False, True])
    out = vision(pixels, present)
    assert out.feats.shape == (3, 1 + 4, D)  # class token + 2x2 patches
    assert out.mask.dtype == torch.bool
    assert out.mask.tolist() == [[True] * 5, [False] * 5, [True] * 5]
    assert (out.feats[1] == 0).all()
    # a present row's tokens depend on that row's pixels only
    alone = vision(pixels[2:], torch.tensor([True]))
    torch.testing.assert_close(out.feats[2], alone.feats[0], atol=1e-5, rtol=1e-5)


def test_vision_without_images_gives_zero_gradients(vision):
    pixels = torch.zeros(2, 3, 32, 32)
    out = vision(pixels, torch.tensor([False, False]))
    assert not out.mask.any()
    (out.feats * out.mask[..., None]).sum().backward()
    _assert_all_grads(vision, zero=True)


def test_vision_conv_stem_grid_and_position_embedding_scale():
    torch.manual_seed(0)
    stem_vit = {**VIT, "patch_size": 2}  # 2x2 cells of the 8x8 map after two stride-2 convs
    vision = VisionEncoder(D, conv_stem=[4, 8], pos_embed_std=1.0, **stem_vit)
    assert isinstance(vision.backbone.patch_embed.backbone[1], torch.nn.BatchNorm2d)
    assert 0.7 < vision.backbone.pos_embed.std().item() < 1.3  # timm alone gives 0.02
    out = vision(torch.randn(2, 3, 32, 32), torch.tensor([True, True]))
    assert out.feats.shape == (2, 1 + 4 * 4, D)


def test_vision_dummy_row_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    vision = VisionEncoder(D, conv_stem=[4, 8], **{**VIT, "patch_size": 2}).train()
    norm = vision.backbone.patch_embed.backbone[1]
    vision(torch.randn(2, 3, 32, 32), torch.tensor([True, False]))
    seen = norm.running_mean.clone()
    assert not torch.equal(seen, torch.zeros_like(seen))  # real images update the statistics
    out = vision(torch.zeros(2, 3, 32, 32), torch.tensor([False, False]))  # the dummy row
    torch.testing.assert_close(norm.running_mean, seen)
    assert norm.training  # and the layer is back in training mode
    (out.feats * out.mask[..., None]).sum().backward()
    _assert_all_grads(vision, zero=True)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_without_the_modality_and_without_autograd_the_encoder_does_not_run(vision, audio, kind):
    if kind == "image":
        assert_skipped_without_autograd(vision, torch.zeros(2, 3, 32, 32), torch.tensor([0, 0]) > 0)
    else:
        assert_skipped_without_autograd(audio, torch.zeros(2, 1), torch.tensor([0, 0]))


def test_vision_loads_safetensors_weights(tmp_path, vision):
    path = tmp_path / "vit.safetensors"
    save_file(vision.backbone.state_dict(), str(path))
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = VisionEncoder(D, pretrained=str(path), **VIT).eval()
    loaded.proj.load_state_dict(vision.proj.state_dict())
    for name, tensor in vision.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[name], tensor), name
    torch.manual_seed(1)
    pixels, present = torch.randn(2, 3, 32, 32), torch.tensor([True, True])
    torch.testing.assert_close(loaded(pixels, present).feats, vision(pixels, present).feats)


def test_vision_loads_a_torch_state_dict_with_a_classifier_head(tmp_path):
    torch.manual_seed(0)
    with_head = timm.create_model("vit_tiny_patch16_224", **VIT).eval()  # 1000-class head
    assert "head.weight" in with_head.state_dict()
    torch.save(with_head.state_dict(), tmp_path / "vit.pth")
    loaded = VisionEncoder(D, pretrained=str(tmp_path / "vit.pth"), **VIT).eval()
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(
        loaded.backbone.forward_features(pixels), with_head.forward_features(pixels)
    )


# ----------------------------------------------------------------------------- audio


def test_audio_shapes_and_frame_mask(audio):
    torch.manual_seed(1)
    waves = torch.randn(3, 4000)
    lengths = torch.tensor([4000, 2000, 0])
    out = audio(waves, lengths)
    assert out.feats.shape == (3, _frames(4000), D) and _frames(4000) == 12
    assert out.mask.sum(dim=1).tolist() == [12, _frames(2000), 0] and _frames(2000) == 6
    assert out.mask[1, :6].all() and not out.mask[1, 6:].any()
    assert (out.feats[2] == 0).all()


def test_audio_padding_does_not_change_valid_frames(audio):
    torch.manual_seed(1)
    waves = torch.randn(2, 4000)
    lengths = torch.tensor([4000, 2000])
    out = audio(waves, lengths)
    changed = waves.clone()
    changed[1, 2000:] = 5.0
    valid = out.mask[1]
    torch.testing.assert_close(audio(changed, lengths).feats[1, valid], out.feats[1, valid])
    alone = audio(waves[1:, :2000], torch.tensor([2000]))
    torch.testing.assert_close(alone.feats[0], out.feats[1, valid], atol=1e-5, rtol=1e-5)


def test_audio_without_waves_gives_zero_gradients(audio):
    out = audio(torch.zeros(2, 4000), torch.tensor([0, 0]))
    assert not out.mask.any()
    (out.feats * out.mask[..., None]).sum().backward()
    _assert_all_grads(audio, zero=True)


def test_audio_batch_without_audio_as_collated(audio):
    """A batch without audio is collated to (B, 1) zero waves: still one masked frame."""
    out = audio(torch.zeros(3, 1), torch.tensor([0, 0, 0]))
    assert out.feats.shape[0] == 3 and out.feats.shape[1] >= 1
    assert not out.mask.any() and torch.isfinite(out.feats).all()
    (out.feats * out.mask[..., None]).sum().backward()
    _assert_all_grads(audio, zero=True)


def test_audio_too_short_for_a_frame_next_to_a_long_clip(audio):
    assert _frames(200) == 0
    out = audio(torch.randn(2, 4000), torch.tensor([4000, 200]))
    assert out.mask.sum(dim=1).tolist() == [12, 0]


def test_audio_batch_of_only_very_short_clips(audio):
    out = audio(torch.randn(1, 200), torch.tensor([200]))  # 12.5 ms at 16 kHz
    assert not out.mask.any() and torch.isfinite(out.feats).all()


def test_audio_loads_pretrained_directory(tmp_path, audio):
    audio.backbone.save_pretrained(str(tmp_path / "w2v"))
    torch.manual_seed(123)
    loaded = AudioEncoder(D, pretrained=str(tmp_path / "w2v")).eval()
    loaded.proj.load_state_dict(audio.proj.state_dict())
    torch.manual_seed(1)
    waves, lengths = torch.randn(2, 4000), torch.tensor([4000, 3000])
    expected = audio(waves, lengths)
    got = loaded(waves, lengths)
    torch.testing.assert_close(got.feats, expected.feats)
    assert torch.equal(got.mask, expected.mask)


def test_audio_needs_config_or_pretrained():
    with pytest.raises(ValueError, match="config or a pretrained"):
        AudioEncoder(D)


def test_audio_spec_embed_frozen_without_spec_augment():
    config = tiny_w2v_config()
    config.mask_time_prob = 0.05  # creates masked_spec_embed, but SpecAugment stays off
    torch.manual_seed(0)
    encoder = AudioEncoder(D, config=config)
    assert encoder.backbone.masked_spec_embed is not None
    assert not encoder.backbone.masked_spec_embed.requires_grad


# ----------------------------------------------------------------------------- text


@pytest.fixture
def text():
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return TextEncoder(tokenizer(), D, config=config).eval()


def test_text_encoder_sized_by_tokenizer(text):
    tok = tokenizer()
    assert text.backbone.config.vocab_size == len(tok)
    assert text.backbone.get_input_embeddings().num_embeddings == len(tok)
    assert text.backbone.config.pad_token_id == tok.pad_token_id
    assert getattr(text.backbone, "pooler", None) is None


def test_text_encoder_shapes_and_mask(text):
    tok = tokenizer()
    a = tok("What color is the circle?", add_special_tokens=False)["input_ids"]
    b = tok("Describe the sound.", add_special_tokens=False)["input_ids"]
    width = max(len(a), len(b))
    ids = torch.full((3, width), tok.pad_token_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    ids[0, : len(a)], ids[1, : len(b)] = torch.tensor(a), torch.tensor(b)
    mask[0, : len(a)], mask[1, : len(b)] = 1, 1
    out = text(ids, mask)
    assert out.feats.shape == (3, width, D)
    assert out.mask.dtype == torch.bool and torch.equal(out.mask, mask.bool())
    assert torch.isfinite(out.feats).all()  # row 2 has no token at all
    # padded positions do not influence the real tokens
    alone = text(torch.tensor([b]), torch.ones(1, len(b), dtype=torch.long))
    torch.testing.assert_close(out.feats[1, : len(b)], alone.feats[0], atol=1e-5, rtol=1e-5)


def test_text_encoder_needs_config_or_pretrained():
    with pytest.raises(ValueError, match="config or a pretrained"):
        TextEncoder(tokenizer(), D)
