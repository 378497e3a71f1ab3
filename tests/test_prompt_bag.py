"""Tests of mmfuse.modules.prompt_bag (the bag-of-words prompt encoder)."""

from __future__ import annotations

import pytest
import torch
from helpers import tokenizer

from mmfuse.modules.prompt_bag import BagOfWordsEncoder

D = 8


@pytest.fixture
def bag():
    torch.manual_seed(0)
    return BagOfWordsEncoder(tokenizer(), D)


def _batch(tok, *prompts: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


def test_one_vector_per_token_at_unit_scale(bag):
    tok = tokenizer()
    assert bag.embed.num_embeddings == len(tok)
    # the projection starts as the identity: tokens are the raw word vectors, std about 1
    torch.testing.assert_close(bag.proj.weight, torch.eye(D))
    assert bag.proj.bias.abs().max() == 0
    assert 0.8 < bag.embed.weight.std().item() < 1.2
    ids, mask = _batch(tok, "What shape is the red one?", "Describe the sound.")
    out = bag(ids, mask)
    assert out.feats.shape == (2, ids.shape[1], D)
    assert out.mask.dtype == torch.bool and torch.equal(out.mask, mask.bool())
    torch.testing.assert_close(out.feats[0], bag.embed.weight[ids[0]])
    # padded positions are zero, so a sum over tokens is the sum over the real ones
    assert out.feats[1][~mask[1].bool()].abs().max() == 0


def test_no_context_a_word_is_the_same_vector_anywhere(bag):
    tok = tokenizer()
    ids, mask = _batch(tok, "What shape is the red one?", "the red one")
    out = bag(ids, mask)
    red = tok.convert_tokens_to_ids(tok.tokenize(" red"))[0]
    first = out.feats[0][ids[0] == red]
    second = out.feats[1][ids[1] == red]
    torch.testing.assert_close(first, second)
    # different questions differ by their words' vectors
    blue = _batch(tok, "What shape is the blue one?")
    diff = bag(*blue).feats[0].sum(0) - out.feats[0].sum(0)
    blue_id = tok.convert_tokens_to_ids(tok.tokenize(" blue"))[0]
    torch.testing.assert_close(diff, bag.embed.weight[blue_id] - bag.embed.weight[red])


def test_every_parameter_gets_a_gradient(bag):
    ids, mask = _batch(tokenizer(), "How many beeps are there?")
    bag(ids, mask).feats.sum().backward()
    for name, param in bag.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
