"""Attention maps of the fusion (``mmfuse-attention``) and the capture that feeds them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mmfuse.attention_maps import (
    AUDIO_FIGSIZE,
    DPI,
    IMAGE_FIGSIZE,
    attention_maps,
    capture_attention,
    fusion_attention,
    prompt_batch,
    run,
)
from mmfuse.model_dir import save_model_dir
from mmfuse.modules.attention import Attention
from tests.helpers import build_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGE_PX = (int(IMAGE_FIGSIZE[0] * DPI), int(IMAGE_FIGSIZE[1] * DPI))
AUDIO_PX = (int(AUDIO_FIGSIZE[0] * DPI), int(AUDIO_FIGSIZE[1] * DPI))
# the conv-stem hybrid ViT (8x8 grid at 64x64) with its d_model tied to the tiny preset's
HYBRID = ["model/vision=vit_small", "model.vision.embed_dim=32", "model.vision.depth=1"]


def _model(tmp_path: Path, fusion: str, extra: tuple[str, ...] = ()):
    proc, model, cfg = build_tiny(tmp_path / fusion, overrides=[f"model/fusion={fusion}", *extra])
    return proc, model.eval(), cfg


def _attention_state(model: torch.nn.Module) -> list[dict]:
    return [dict(vars(m)) for m in model.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("fusion", ["cross_attention", "qformer", "perceiver"])
def test_capture_gives_softmax_weights_and_leaves_nothing(
    fusion: str, tmp_path: Path, media: Path
) -> None:
    extra = ("model/text=bert_tiny",) if fusion == "qformer" else ()
    proc, model, _ = _model(tmp_path, fusion, extra)
    batch = prompt_batch(proc, "What color is it?", media / "a.png", media / "s.wav")
    before = _attention_state(model)
    with torch.no_grad():
        reference = model.encode(batch)
        with capture_attention(model.fusion) as records:
            captured = model.encode(batch)
    assert _attention_state(model) == before, "no recorder left on any Attention"
    assert all(m.recorder is None for m in model.modules() if isinstance(m, Attention))
    torch.testing.assert_close(captured.feats, reference.feats, atol=1e-5, rtol=1e-5)
    assert records and all(len(calls) == 1 for calls in records.values())
    for calls in records.values():
        weights = calls[0]  # (B, h, L, S)
        assert weights.dim() == 4 and (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))

    with pytest.raises(RuntimeError, match="stop"), capture_attention(model.fusion) as records:
        raise RuntimeError("stop")
    assert _attention_state(model) == before, "cleaned up after an error too"


@pytest.mark.parametrize("fusion", ["cross_attention", "qformer", "perceiver"])
def test_maps_sum_to_one_on_the_patch_grid(fusion: str, tmp_path: Path, media: Path) -> None:
    proc, model, _ = _model(tmp_path, fusion, tuple(HYBRID))
    batch = prompt_batch(proc, "What color is it?", media / "a.png", media / "s.wav")
    maps = fusion_attention(model, batch)
    assert maps.grid == (8, 8), "conv stem: 8x8 cells at 64x64, class token left out"
    if fusion == "perceiver":  # a resampler per modality
        assert len(maps.layers) == sum(len(r.layers) for r in model.fusion.resamplers.values())
    else:
        assert len(maps.layers) == len(model.fusion.blocks)
    for layer in [maps.mean, *maps.layers]:
        if layer.image is not None:
            assert layer.image.shape == (8, 8)
            assert layer.image.sum() == pytest.approx(1.0, abs=1e-5)
            assert 0 < layer.image_share + layer.class_share <= 1 + 1e-6
        if layer.audio is not None:
            frames = int(model.encoders["audio"].backbone._get_feat_extract_output_lengths(16000))
            assert layer.audio.shape == (frames,)
            assert layer.audio.sum() == pytest.approx(1.0, abs=1e-5)
    if fusion == "perceiver":
        assert {layer.label.split()[0] for layer in maps.layers} == {"image", "audio"}
        assert all((layer.image is None) != (layer.audio is None) for layer in maps.layers)
    else:
        shares = [
            layer.image_share + layer.class_share + layer.audio_share for layer in maps.layers
        ]
        assert all(0 < s < 1 for s in shares), "the rest goes to the null token"


def test_cli_writes_pngs_of_the_expected_sizes(tmp_path: Path, media: Path) -> None:
    proc, model, cfg = _model(tmp_path, "cross_attention", tuple(HYBRID))
    model_dir = save_model_dir(model, cfg, tmp_path / "model")
    out = tmp_path / "maps"
    written = run(
        OmegaConf.create(
            {
                "ckpt": str(model_dir),
                "prompt": "What color is the circle?",
                "image": str(media / "a.png"),
                "audio": str(media / "s.wav"),
                "output_dir": str(out),
                "device": "cpu",
                "max_new_tokens": 4,
            }
        )
    )
    layers = len(model.fusion.blocks)
    expected = {"image_attention.png", "audio_attention.png", "attention.json"}
    expected |= {f"{m}_attention_layer{i}.png" for m in ("image", "audio") for i in range(layers)}
    assert {p.name for p in written} == expected == {p.name for p in out.iterdir()}
    for path in written:
        if path.suffix == ".png":
            with Image.open(path) as image:
                assert image.format == "PNG"
                assert image.size == (IMAGE_PX if path.name.startswith("image") else AUDIO_PX)
    content = json.loads((out / "attention.json").read_text())
    assert content["fusion"] == "CrossAttentionFusion" and content["grid"] == [8, 8]
    assert np.isclose(np.sum(content["layers"][0]["image"]), 1.0, atol=1e-3)


def test_image_only_and_concat(tmp_path: Path, media: Path) -> None:
    proc, model, _ = _model(tmp_path, "perceiver")
    maps = attention_maps(model, proc, "What color?", image=str(media / "a.png"))
    assert maps.grid == (4, 4), "vit_tiny: 16-pixel patches at 64x64"
    assert maps.mean.audio is None and all(layer.audio is None for layer in maps.layers)
    assert isinstance(maps.answer, str)
    proc, model, _ = _model(tmp_path, "concat")
    with pytest.raises(ValueError, match="concat.*no attention"):
        attention_maps(model, proc, "What color?", image=str(media / "a.png"))
