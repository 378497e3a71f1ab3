"""Tests of mmfuse.loss.next_token_loss."""

from __future__ import annotations

import math

import pytest
import torch

from mmfuse.loss import next_token_loss
from mmfuse.processing.text import IGNORE_INDEX


def _token_losses(logits, labels, b):
    """The cross-entropy of each supervised token of row b, by hand."""
    losses = []
    for t in range(labels.shape[1] - 1):
        target = int(labels[b, t + 1])
        if target != IGNORE_INDEX:
            row = logits[b, t].double()
            losses.append(float(torch.logsumexp(row, 0) - row[target]))
    return losses


def _hand_loss(logits, labels):
    losses = [x for b in range(labels.shape[0]) for x in _token_losses(logits, labels, b)]
    return sum(losses) / len(losses), len(losses)


@pytest.fixture
def example():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor(
        [
            [3, IGNORE_INDEX, 4, 1, IGNORE_INDEX],  # the label at t=0 is never a target
            [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 0],
        ]
    )
    return logits, labels


def test_matches_hand_computation(example):
    logits, labels = example
    loss, count = next_token_loss(logits, labels)
    expected, expected_count = _hand_loss(logits, labels)
    assert int(count) == expected_count == 4
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_ignored_positions_do_not_count(example):
    logits, labels = example
    loss, _ = next_token_loss(logits, labels)
    changed = logits.clone()
    # positions whose next label is ignored (and the last position) never enter the loss
    changed[0, 0] += 100 * torch.randn(7)
    changed[0, 3] += 100 * torch.randn(7)
    changed[1, :2] += 100 * torch.randn(2, 7)
    changed[:, -1] += 100 * torch.randn(2, 7)
    assert float(next_token_loss(changed, labels)[0]) == pytest.approx(float(loss), rel=1e-6)
    # the first label is not a target: changing it changes nothing
    relabelled = labels.clone()
    relabelled[0, 0] = 5
    assert float(next_token_loss(logits, relabelled)[0]) == pytest.approx(float(loss), rel=1e-6)


def test_gradient_only_on_supervised_positions(example):
    logits, labels = example
    logits = logits.clone().requires_grad_(True)
    next_token_loss(logits, labels)[0].backward()
    used = torch.zeros(2, 5, dtype=torch.bool)
    used[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert (logits.grad[~used] == 0).all()
    assert (logits.grad[used].abs().sum(-1) > 0).all()


def test_uniform_logits_give_log_vocab():
    labels = torch.tensor([[IGNORE_INDEX, 2, 3]])
    loss, count = next_token_loss(torch.zeros(1, 3, 11), labels)
    assert int(count) == 2 and float(loss) == pytest.approx(math.log(11))


def test_half_precision_logits_are_computed_in_float():
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 9)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3]])
    loss, _ = next_token_loss(logits.to(torch.bfloat16), labels)
    assert loss.dtype == torch.float32
    expected, _ = _hand_loss(logits.to(torch.bfloat16).float(), labels)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_no_supervised_token_raises_naming_the_records():
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[1, 0] = 3  # position 0 is never a target
    with pytest.raises(ValueError, match=r"without any supervised token.*rec-a.*rec-b"):
        next_token_loss(torch.randn(2, 4, 5), labels, ["rec-a", "rec-b"])


@pytest.fixture
def uneven():
    """A one-token answer and a three-token answer."""
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor(
        [
            [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 2, IGNORE_INDEX],
            [IGNORE_INDEX, 4, 5, 6, IGNORE_INDEX],
        ]
    )
    return logits, labels


def test_sample_weighting_is_the_mean_of_the_samples_means(uneven):
    logits, labels = uneven
    short, long = (_token_losses(logits, labels, b) for b in (0, 1))
    assert (len(short), len(long)) == (1, 3)
    loss, weight = next_token_loss(logits, labels, weighting="sample")
    assert float(weight) == pytest.approx(2.0)  # one per sample
    assert float(loss) == pytest.approx((short[0] + sum(long) / 3) / 2, rel=1e-6)
    # the token mean weighs the long answer three times as much
    token_loss, count = next_token_loss(logits, labels, weighting="token")
    assert int(count) == 4
    assert float(token_loss) == pytest.approx((short[0] + sum(long)) / 4, rel=1e-6)
    assert float(token_loss) != pytest.approx(float(loss), rel=1e-3)


def test_square_weighting_weighs_each_sample_by_the_root_of_its_length(uneven):
    logits, labels = uneven
    short, long = (_token_losses(logits, labels, b) for b in (0, 1))
    loss, weight = next_token_loss(logits, labels, weighting="square")
    # tokens weigh 1/sqrt(n): the samples' means weigh 1 and sqrt(3)
    expected = (short[0] + math.sqrt(3) * sum(long) / 3) / (1 + math.sqrt(3))
    assert float(weight) == pytest.approx(1 + math.sqrt(3))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_weighted_losses_ignore_rows_without_supervised_tokens(uneven):
    logits, labels = uneven
    padded_logits = torch.cat([logits, torch.randn(1, 5, 7)])
    padded_labels = torch.cat([labels, torch.full((1, 5), IGNORE_INDEX)])
    for weighting in ("sample", "square"):
        loss, weight = next_token_loss(logits, labels, weighting=weighting)
        padded = next_token_loss(padded_logits, padded_labels, weighting=weighting)
        assert float(padded[0]) == pytest.approx(float(loss), rel=1e-6)
        assert float(padded[1]) == pytest.approx(float(weight), rel=1e-6)


def test_unknown_weighting_is_refused(example):
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        next_token_loss(*example, weighting="turn")
