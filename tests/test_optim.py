"""Tests of mmfuse.optim: parameter groups and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build_tiny
from torch import nn

from mmfuse.optim import param_groups, warmup_cosine

NAMED_NO_DECAY = ("pos_embed", "cls_token", "queries", "type_embed", "null_token")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    _, model, _ = build_tiny(tmp_path_factory.mktemp("out"), overrides=["model/text=bert_tiny"])
    return model


def _split(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    decay = [names[id(p)] for p in groups[0]["params"]]
    no_decay = [names[id(p)] for p in groups[1]["params"]]
    return decay, no_decay


def test_groups_partition_the_trainable_parameters(model):
    groups = param_groups(model, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decay, no_decay = _split(model, groups)
    assert not set(decay) & set(no_decay)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(decay + no_decay) == sorted(trainable)
    assert len(decay) == len(set(decay)) and len(no_decay) == len(set(no_decay))


def test_what_is_decayed(model):
    decay, no_decay = _split(model, param_groups(model, 0.1))
    linear_weights = {
        f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    # the output embedding is tied to the input embedding: it is the embedding, not a Linear
    linear_weights.discard("decoder.lm_head.weight")
    assert linear_weights and linear_weights <= set(decay)
    assert "encoders.image.backbone.patch_embed.proj.weight" in decay  # a conv kernel
    assert "decoder.model.layers.0.self_attn.q_proj.weight" in decay
    assert "fusion.blocks.0.cross.to_kv.weight" in decay
    for name in decay:
        assert not name.endswith(".bias") and "norm" not in name.lower()


def test_what_is_not_decayed(model):
    decay, no_decay = _split(model, param_groups(model, 0.1))
    no_decay = set(no_decay)
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert biases and biases <= no_decay
    norms = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if "Norm" in type(m).__name__
        for p, _ in m.named_parameters(recurse=False)
    }
    assert any("RMSNorm" in type(m).__name__ for m in model.modules())
    assert norms and norms <= no_decay
    embeddings = {
        f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Embedding)
    }
    assert {
        "decoder.model.embed_tokens.weight",
        "encoders.text.backbone.embeddings.word_embeddings.weight",
        "encoders.text.backbone.embeddings.position_embeddings.weight",
    } <= embeddings
    assert embeddings <= no_decay
    for expected in (
        "encoders.image.backbone.pos_embed",
        "encoders.image.backbone.cls_token",
        "fusion.queries",
        "fusion.null_token",
        "fusion.type_embed.image",
        "fusion.type_embed.audio",
        "fusion.type_embed.text",
    ):
        assert expected in no_decay, expected
    assert {n for n in no_decay if any(k in n for k in NAMED_NO_DECAY)} >= {
        "fusion.queries",
        "encoders.image.backbone.pos_embed",
    }


def test_frozen_parameters_are_left_out():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    module[2].weight.requires_grad_(False)
    groups = param_groups(module, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 4]
    assert groups[0]["params"][0] is module[0].weight


def test_name_rules_on_a_custom_module():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embedding = nn.Parameter(torch.zeros(5, 3))  # by name
            self.embedding_proj = nn.Parameter(torch.zeros(3, 3))  # not an embedding
            self.scale = nn.Parameter(torch.ones(3))  # 1-D
            self.kernel = nn.Parameter(torch.zeros(2, 2, 2))

    custom = Custom()
    decay, no_decay = _split(custom, param_groups(custom, 0.1))
    assert sorted(decay) == ["embedding_proj", "kernel"]
    assert sorted(no_decay) == ["scale", "word_embedding"]


def test_lr_scale_gives_a_component_groups_of_its_own(model):
    groups = param_groups(model, 0.1, lr_scale={"encoders.image": 3.0, "fusion": 0.5}, lr=2e-3)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] * 3
    assert [g.get("lr") for g in groups] == [None, None, 6e-3, 6e-3, 1e-3, 1e-3]
    names = {id(p): n for n, p in model.named_parameters()}
    image = {names[id(p)] for g in groups[2:4] for p in g["params"]}
    fusion = {names[id(p)] for g in groups[4:6] for p in g["params"]}
    rest = {names[id(p)] for g in groups[:2] for p in g["params"]}
    assert image == {n for n in names.values() if n.startswith("encoders.image.")}
    assert fusion == {n for n in names.values() if n.startswith("fusion.")}
    assert not rest & (image | fusion) and len(rest | image | fusion) == len(names)
    # the decay rules hold inside a scaled component too
    assert "encoders.image.backbone.pos_embed" in {names[id(p)] for p in groups[3]["params"]}
    # the schedule scales every group's own learning rate
    optimizer = torch.optim.AdamW(groups, lr=2e-3)
    warmup_cosine(optimizer, total_steps=10, warmup_steps=2)
    expected = [1e-3, 1e-3, 3e-3, 3e-3, 5e-4, 5e-4]  # half the peak in the first warm-up step
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected)


def test_lr_scale_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="no trainable parameter under 'encoders.imag'"):
        param_groups(model, 0.1, lr_scale={"encoders.imag": 2.0}, lr=1e-3)
    with pytest.raises(ValueError, match="needs the optimiser's lr"):
        param_groups(model, 0.1, lr_scale={"fusion": 2.0})


def _lrs(total, **kwargs):
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = warmup_cosine(optimizer, total_steps=total, **kwargs)
    lrs = []
    for _ in range(total + 3):
        lrs.append(optimizer.param_groups[0]["lr"] / 2.0)
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_cosine_shape():
    lrs = _lrs(20, warmup_steps=5, min_lr_ratio=0.1)
    # linear warm-up: equal increments up to the peak
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert max(lrs) == pytest.approx(1.0) and lrs[5] == pytest.approx(1.0)
    # cosine decay: monotone, halfway at the middle, ends at min_lr_ratio and stays there
    decay = lrs[5:21]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert lrs[5 + 15 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert lrs[20] == pytest.approx(0.1)
    assert lrs[21:] == pytest.approx([0.1, 0.1])


def test_warmup_ratio_and_steps():
    by_ratio = _lrs(100, warmup_ratio=0.1, min_lr_ratio=0.0)
    assert by_ratio[9] == pytest.approx(1.0) and by_ratio[0] == pytest.approx(0.1)
    assert by_ratio[100] == pytest.approx(0.0, abs=1e-12)
    # warmup_steps wins over warmup_ratio
    both = _lrs(100, warmup_steps=4, warmup_ratio=0.5)
    assert both[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_no_warmup_starts_at_peak():
    lrs = _lrs(10, min_lr_ratio=0.2)
    assert lrs[0] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.2)
