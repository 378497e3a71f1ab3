"""Tests of mmfuse.freezing: rules, the parameter table, the checks, eval mode and no_grad."""

from __future__ import annotations

import copy
import functools
import logging

import lightning as L
import pytest
import torch
from helpers import build_tiny, compose_cfg, mixed_records, samples
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from mmfuse.freezing import (
    ParamCount,
    apply_freezing,
    check_trainable,
    format_table,
    frozen_units,
    parameter_table,
    parse_freeze_config,
)
from mmfuse.lit_module import MMFuseLitModule
from mmfuse.lora import apply_lora
from mmfuse.processing.collate import Collator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))  # 12 + 3
        self.proj = nn.Linear(3, 2)  # 6 + 2


class _Toy(nn.Module):
    """Components with hand-countable parameters (see test_table_counts_by_hand)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"image": _Encoder()})  # 23
        self.fusion = nn.Linear(2, 2)  # 6
        self.conditioning = nn.LayerNorm(2)  # 4
        self.decoder = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 5))  # 10 + (10 tied) + 5
        self.decoder[1].weight = self.decoder[0].weight


RULES = {"encoders": {"image": {"patterns": [".*"], "except": [r"proj\..*"]}}, "decoder": True}


def test_table_counts_by_hand():
    toy = _Toy()
    assert parameter_table(toy) == [
        ParamCount("encoders.image", 23, 23),
        ParamCount("fusion", 6, 6),
        ParamCount("conditioning", 4, 4),
        ParamCount("decoder", 15, 15),  # the tied output weight counts once
        ParamCount("total", 48, 48),
    ]
    frozen = apply_freezing(toy, RULES)
    assert frozen == ["decoder"]
    rows = check_trainable(toy, frozen)
    assert rows == [
        ParamCount("encoders.image", 23, 8),
        ParamCount("fusion", 6, 6),
        ParamCount("conditioning", 4, 4),
        ParamCount("decoder", 15, 0),
        ParamCount("total", 48, 18),
    ]
    assert [n for n, p in toy.named_parameters() if p.requires_grad] == [
        "encoders.image.proj.weight",
        "encoders.image.proj.bias",
        "fusion.weight",
        "fusion.bias",
        "conditioning.weight",
        "conditioning.bias",
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["component", "total", "trainable"]
    assert lines[1].split() == ["encoders.image", "23", "8"]
    assert lines[-1].split() == ["total", "48", "18"]


def test_parameters_outside_components_get_a_row():
    toy = _Toy()
    toy.scale = nn.Parameter(torch.ones(3))
    assert parameter_table(toy)[-2:] == [ParamCount("other", 3, 3), ParamCount("total", 51, 51)]


def test_nested_and_dotted_keys_are_the_same_rule():
    nested = parse_freeze_config(RULES)
    dotted = parse_freeze_config(
        {"encoders.image": RULES["encoders"]["image"], "decoder": True, "fusion": None}
    )
    assert nested == dotted
    assert nested["decoder"].patterns == (".*",) and nested["decoder"].exceptions == ()
    with pytest.raises(ValueError, match="encoders.image is given twice"):
        parse_freeze_config({"encoders.image": True, "encoders": {"image": True}})


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"encoder": {"image": True}}, r"freeze.encoder.image: the model has no component"),
        ({"fusion": {"patterns": ["weights"]}}, r"freeze.fusion.patterns: 'weights' matches no"),
        ({"fusion": {"except": ["nope"]}}, r"freeze.fusion.except: 'nope' matches no"),
        ({"fusion": {"patterns": ["("]}}, r"freeze.fusion.patterns: bad regex"),
        ({"fusion": {"patterns": [".*"], "exept": ["x"]}}, r"fusion: unknown keys \['exept'\]"),
        ({"fusion": {"pattern": [".*"]}}, r"freeze.fusion.pattern: expected true or"),
        ({"fusion": "all"}, r"freeze.fusion: expected true or"),
    ],
)
def test_bad_rules_name_the_component(rules, message):
    with pytest.raises(ValueError, match=message):
        apply_freezing(_Toy(), rules)


def test_a_known_component_the_model_lacks_is_skipped(caplog):
    toy = _Toy()
    with caplog.at_level(logging.WARNING):
        assert apply_freezing(toy, {"encoders": {"audio": True}}) == []
    assert "freeze.encoders.audio: the model has no such component" in caplog.text
    assert all(p.requires_grad for p in toy.parameters())


def test_check_names_the_component_that_breaks_the_rule():
    toy = _Toy()
    frozen = apply_freezing(toy, RULES)
    toy.decoder[1].bias.requires_grad_(True)  # e.g. LoRA in a frozen component
    with pytest.raises(ValueError, match="decoder: configured frozen .* 5 of its parameters"):
        check_trainable(toy, frozen)
    toy = _Toy()
    apply_freezing(toy, {"fusion": {"patterns": ["weight"]}})  # partly frozen: it trains
    toy.fusion.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="fusion: set to train but none of its 6 parameters"):
        check_trainable(toy, [])


def test_frozen_parts_stay_in_eval_mode():
    _, model, _ = build_tiny("unused", overrides=["+model.vision.conv_stem=[8]"])
    apply_freezing(model, {"encoders": {"image": True, "audio": {"patterns": [r"backbone\..*"]}}})
    model.train()
    image, audio = model.encoders["image"], model.encoders["audio"]
    assert frozen_units(model) == [image, audio.backbone]
    assert not any(m.training for m in image.modules())
    assert not any(m.training for m in audio.backbone.modules())
    assert audio.training and audio.proj.training and model.fusion.training
    model.eval()
    assert not any(m.training for m in model.modules())


class _Probe(Callback):
    """Records modes at every training batch and gradients before every optimiser step."""

    def __init__(self) -> None:
        self.modes: list[tuple[int, bool, bool]] = []
        self.image_grads: list[bool] = []
        self.fusion_grads: list[bool] = []
        self.grad_enabled: list[bool] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        def record(module, args, out):
            if trainer.training:
                self.grad_enabled.append(torch.is_grad_enabled())

        pl_module.model.encoders["image"].register_forward_hook(record)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        trainer.model.train()  # as a training loop does at every epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        image = pl_module.model.encoders["image"]
        self.modes.append(
            (
                trainer.current_epoch,
                any(m.training for m in image.modules()),
                pl_module.model.fusion.training,
            )
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        model = pl_module.model
        self.image_grads.append(
            any(p.grad is not None for p in model.encoders["image"].parameters())
        )
        self.fusion_grads.append(all(p.grad is not None for p in model.fusion.parameters()))


def _fit(proc, model, frozen, media, tmp_path, probe=None, epochs=2):
    """Fits ``model`` on the four mixed records, two per batch."""
    collate = Collator(proc.tokenizer.pad_token_id, "right", proc.image.size)
    proc_samples = samples(proc, mixed_records(), media)
    loader = DataLoader(proc_samples, batch_size=2, collate_fn=collate)
    module = MMFuseLitModule(
        model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), frozen=frozen
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=CSVLogger(tmp_path, name="", version=""),
        callbacks=[probe] if probe else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    return trainer


def test_frozen_encoder_stays_in_eval_mode_across_epochs_and_gets_no_grad(tmp_path, media):
    # a conv stem brings BatchNorm, whose running statistics must not move
    proc, model, _ = build_tiny(tmp_path, overrides=["+model.vision.conv_stem=[8]"])
    frozen = apply_freezing(model, {"encoders": {"image": True}})
    assert frozen == ["encoders.image"]
    image_before = copy.deepcopy(model.encoders["image"].state_dict())
    fusion_before = copy.deepcopy(model.fusion.state_dict())
    probe = _Probe()
    _fit(proc, model, frozen, media, tmp_path, probe)
    # 4 records in batches of 2: two steps per epoch, two epochs
    assert probe.modes == [(0, False, True), (0, False, True), (1, False, True), (1, False, True)]
    assert probe.image_grads == [False] * 4 and probe.fusion_grads == [True] * 4
    assert probe.grad_enabled == [False] * 4  # the frozen encoder ran under no_grad
    for name, value in model.encoders["image"].state_dict().items():
        assert torch.equal(value, image_before[name]), name  # weights and BatchNorm statistics
    assert not torch.equal(model.fusion.state_dict()["queries"], fusion_before["queries"])
    hparams = (tmp_path / "hparams.yaml").read_text()
    image_total = sum(p.numel() for p in model.encoders["image"].parameters())
    assert f"parameters/encoders.image/total: {image_total}" in hparams
    assert "parameters/encoders.image/trainable: 0" in hparams


def test_fit_fails_at_start_when_lora_meets_a_frozen_decoder(tmp_path, media):
    proc, model, _ = build_tiny(tmp_path)
    frozen = apply_freezing(model, {"decoder": True})
    apply_lora(model, {"r": 2, "components": {"decoder": True}})
    with pytest.raises(ValueError, match="decoder: configured frozen"):
        _fit(proc, model, frozen, media, tmp_path, epochs=1)


def test_alignment_preset(tmp_path):
    _, model, cfg = build_tiny(tmp_path, overrides=["freeze=alignment"])
    frozen = apply_freezing(model, cfg.freeze)  # encoders.text is not in model=tiny: skipped
    assert frozen == ["decoder"]
    trains = ("encoders.image.proj.", "encoders.audio.proj.", "fusion.", "conditioning.")
    for name, param in model.named_parameters():
        assert param.requires_grad == name.startswith(trains), name
    rows = {r.component: r for r in check_trainable(model, frozen)}
    proj = sum(p.numel() for p in model.encoders["image"].proj.parameters())
    assert rows["encoders.image"].trainable == proj
    assert compose_cfg(tmp_path).freeze.decoder is None  # nothing frozen by default
