"""Tests of mmfuse.lora: adapters through peft, what trains, merging into plain weights."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from helpers import build_tiny, collate, mixed_records
from safetensors.torch import load_file

from mmfuse.freezing import apply_freezing
from mmfuse.lora import apply_lora, has_lora, merge_lora, parse_lora_config
from mmfuse.loss import next_token_loss
from mmfuse.model_dir import CONFIG, WEIGHTS, load_model_dir, save_model_dir
from mmfuse.optim import param_groups
from mmfuse.train import train
from tests.conftest import tiny_train_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "components": {"decoder": True}}


def _logits(model, batch):
    with torch.no_grad():
        return model(batch)[0]


def _steps(model, batch, steps=2, lr=1e-2):
    """AdamW steps on ``batch`` over the trainable parameters (as training groups them)."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        next_token_loss(*model(batch))[0].backward()
        optimizer.step()


def test_only_lora_and_fusion_parameters_change(tmp_path, media):
    proc, model, _ = build_tiny(tmp_path)
    rules = {"encoders": {"image": True, "audio": True}, "conditioning": True}
    assert apply_freezing(model, rules) == ["encoders.image", "encoders.audio", "conditioning"]
    assert apply_lora(model, LORA) == ["decoder"]
    lora = {n for n in dict(model.named_parameters()) if ".lora_" in n}
    fusion = {n for n in dict(model.named_parameters()) if n.startswith("fusion.")}
    assert lora and all(n.startswith("decoder.") for n in lora)
    # r x in + out x r per adapted Linear: q, k, v, o (32x32), gate, up (32->64), down
    per_layer = 4 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 64 * 4) + (4 * 64 + 32 * 4)
    assert sum(p.numel() for n, p in model.named_parameters() if n in lora) == 2 * per_layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora | fusion
    before = {n: t.clone() for n, t in model.state_dict().items()}
    batch = collate(proc, mixed_records(), media)
    _steps(model, batch)  # two steps: lora_A moves once lora_B is no longer zero
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == lora | fusion
    # the frozen encoders keep their dropout off and their statistics
    assert not any(m.training for e in model.encoders.values() for m in e.modules())


@pytest.mark.parametrize("decoder", ["llama_tiny", "gpt2_tiny"])
def test_merge_and_save_give_the_same_logits(tmp_path, media, decoder, monkeypatch):
    proc, model, cfg = build_tiny(tmp_path, overrides=[f"model/decoder={decoder}"])
    apply_lora(model, {**LORA, "components": {"decoder": True, "encoders": {"image": True}}})
    batch = collate(proc, mixed_records(), media)
    _steps(model, batch)
    model.eval()
    expected = _logits(model, batch)
    assert merge_lora(model) > 0 and not has_lora(model)
    names = list(model.state_dict())
    assert not any("lora_" in n or "base_layer" in n for n in names)
    torch.testing.assert_close(_logits(model, batch), expected, atol=1e-5, rtol=1e-4)
    out = save_model_dir(model, cfg, tmp_path / "model")
    assert set(load_file(out / WEIGHTS)) <= set(names)  # tied weights are saved once
    assert "lora" not in (out / CONFIG).read_text()
    monkeypatch.setitem(sys.modules, "peft", None)  # importing peft now fails
    loaded, loaded_proc = load_model_dir(out)
    assert not has_lora(loaded)
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-5, rtol=1e-4)


def test_component_settings_and_trainable_base_parameters(tmp_path):
    config = {
        "r": 8,
        "alpha": 16,
        "components": {
            "decoder": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
            "encoders": {
                "audio": {"target_modules": "all-linear", "trainable": [r".*layer_norm\..*"]},
                "text": True,  # model=tiny has no prompt encoder: skipped
            },
        },
    }
    parsed = parse_lora_config(config)
    assert parsed["decoder"]["r"] == 2 and parsed["decoder"]["alpha"] == 16
    assert parsed["encoders.audio"]["r"] == 8 and parsed["encoders.text"]["dropout"] == 0.0
    _, model, _ = build_tiny(tmp_path)
    assert apply_lora(model, config) == ["decoder", "encoders.audio"]
    q = model.decoder.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.shape == (2, 32)
    assert not hasattr(model.decoder.model.layers[0].self_attn.k_proj, "lora_A")
    audio = model.encoders["audio"]
    kept = {n for n, p in audio.backbone.named_parameters() if p.requires_grad and "lora_" not in n}
    assert kept and all("layer_norm." in n for n in kept)
    assert all(p.requires_grad for p in audio.proj.parameters())  # the projection trains
    assert not any(p.requires_grad for n, p in model.decoder.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"components": {"decoder": {"target_modules": ["nope"]}}}, "lora.components.decoder"),
        ({"components": {"decoder": {"trainable": ["nope"]}}}, "decoder.trainable: 'nope'"),
        ({"components": {"decoder": {"r": 2, "rank": 4}}}, r"decoder: unknown keys \['rank'\]"),
        ({"rank": 4}, r"lora: unknown keys \['rank'\]"),
        ({"components": {"fusion": True}}, "lora.components.fusion: not a part"),
    ],
)
def test_bad_settings_name_the_component(tmp_path, config, message):
    _, model, _ = build_tiny(tmp_path)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, config)


def test_train_with_lora_writes_a_plain_model_directory(world_dir, tmp_path, compose_train, caplog):
    overrides = [o for o in tiny_train_overrides(world_dir, tmp_path) if "limit_val" not in o]
    cfg = compose_train(
        [
            *overrides,
            "trainer.max_steps=2",
            "+trainer.limit_val_batches=0",
            "logger=none",
            "lora=decoder",
            "lora.r=4",
            "freeze=encoders",
        ]
    )
    with caplog.at_level(logging.INFO):
        metrics = train(cfg)
    assert metrics["train/loss"] > 0
    assert "parameters per component" in caplog.text
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(".lora_A." in n for n in checkpoint["state_dict"])  # training had adapters
    model, _ = load_model_dir(tmp_path / "model")
    assert not has_lora(model)
    assert not any("lora_" in n for n in load_file(tmp_path / "model" / WEIGHTS))
