"""Tests of mmfuse.lit_module: what the LightningModule gives its optimiser."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import build_tiny

from mmfuse.lit_module import MMFuseLitModule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    _, model, _ = build_tiny(tmp_path_factory.mktemp("out"))
    return model


def test_optimizer_gets_decay_groups(model):
    module = MMFuseLitModule(model, optimizer=partial(torch.optim.AdamW, lr=1e-3))
    optimizer = module.configure_optimizers()["optimizer"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3]


def test_lr_scale_reaches_the_optimizer(model):
    module = MMFuseLitModule(
        model, optimizer=partial(torch.optim.AdamW, lr=1e-3), lr_scale={"encoders.audio": 4.0}
    )
    optimizer = module.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-3, 4e-3, 4e-3])
    audio = {id(p) for p in model.encoders["audio"].parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups[2:] for p in g["params"]} == audio
