"""Tests of mmfuse.lit_module: what the LightningModule gives its optimiser."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import build_tiny, collate, mixed_records, record, write_media

from mmfuse.lit_module import MMFuseLitModule
from mmfuse.loss import WEIGHTINGS, next_token_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def model(built):
    return built[1]


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


@pytest.mark.parametrize("weighting", ["token", "sample", "square"])
def test_the_training_loss_uses_the_configured_weighting(built, tmp_path, weighting):
    proc, model, _ = built
    write_media(tmp_path)
    # answers of different lengths: the three weightings give three different losses
    records = [*mixed_records(), record("long", "Say it.", "yes, yes and yes again, yes")]
    batch = collate(proc, records, tmp_path)
    module = MMFuseLitModule(
        model, optimizer=partial(torch.optim.AdamW, lr=1e-3), loss_weighting=weighting
    )
    with torch.no_grad():  # the same dropout draws for both forward passes
        torch.manual_seed(0)
        loss = module.training_step(batch, 0)
        torch.manual_seed(0)
        logits, labels = model(batch)
    expected = {w: float(next_token_loss(logits, labels, weighting=w)[0]) for w in WEIGHTINGS}
    assert float(loss) == pytest.approx(expected[weighting])
    assert len({round(value, 4) for value in expected.values()}) == 3


def test_an_unknown_loss_weighting_is_refused(model):
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        MMFuseLitModule(model, optimizer=torch.optim.AdamW, loss_weighting="turn")
