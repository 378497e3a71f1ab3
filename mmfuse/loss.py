"""Next-token cross-entropy over supervised (assistant) tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmfuse.processing.text import IGNORE_INDEX

WEIGHTINGS = ("token", "sample", "square")


def check_weighting(weighting: str) -> str:
    """Returns ``weighting`` if ``next_token_loss`` knows it; else raises ValueError."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return weighting


def next_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ids: list[str] | None = None,
    check_supervised: bool = True,
    weighting: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean cross-entropy of predicting ``labels[t+1]`` from position t.

    ``weighting`` sets how much each supervised token of a sample (row) with n of them
    counts: ``token`` 1 (the plain token mean: long answers outweigh short ones), ``sample``
    1/n (every sample counts the same, whatever its length) or ``square`` 1/sqrt(n) (between
    the two; InternVL 2.5's square averaging).

    Args:
        logits: (B, L, V).
        labels: (B, L), ``IGNORE_INDEX`` where no loss applies.
        ids: record ids, named in the error when nothing is supervised.
        check_supervised: raise when nothing is supervised. The check reads the count back
            to the host (a device sync); the training step leaves it to the processor, which
            already rejects every record without a supervised token.
        weighting: ``token``, ``sample`` or ``square``.

    Returns:
        (loss, total weight: the number of supervised tokens with ``token``).

    Raises:
        ValueError: when the batch has no supervised token (a silent zero loss otherwise),
            or for an unknown ``weighting``.
    """
    check_weighting(weighting)
    targets = labels[:, 1:]  # (B, L-1)
    supervised = targets != IGNORE_INDEX
    if check_supervised and not bool(supervised.any()):
        raise ValueError(f"batch without any supervised token; records: {ids}")
    flat_logits, flat_targets = logits[:, :-1].flatten(0, 1).float(), targets.flatten()
    if weighting == "token":
        count = supervised.sum()
        loss = F.cross_entropy(
            flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss / count, count
    losses = F.cross_entropy(
        flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)  # (B, L-1), 0 where unsupervised
    per_row = supervised.sum(dim=1)  # (B,)
    # a row without supervised tokens has no loss; its weight does not matter
    n = per_row.clamp(min=1).float()
    weights = 1 / n if weighting == "sample" else n.rsqrt()  # (B,) per token of the row
    total = (weights * per_row).sum()
    return (losses.sum(dim=1) * weights).sum() / total, total


def global_token_mean(
    loss: torch.Tensor,
    count: torch.Tensor,
    world_size: int,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Makes data-parallel training minimise the token mean over the global batch.

    Each rank's ``loss`` is its own token mean ``S_r / n_r``. DDP (and FSDP, DeepSpeed)
    average gradients over the ``W`` ranks, which would weight every rank equally however
    many supervised tokens it had. Back-propagating ``S_r * W / N`` instead, with
    ``N = sum_r n_r``, makes the averaged gradient ``grad(sum_r S_r) / N``: that of the
    token mean of the whole global batch, as one process with all of it computes. One
    all-reduce of ``(S_r, n_r)`` per step. With a ``weighting`` other than ``token``,
    ``S_r`` and ``n_r`` are the weighted sums and the weight (``next_token_loss``).

    Args:
        loss: this rank's token mean (with gradient).
        count: this rank's supervised tokens.
        world_size: number of ranks.
        sum_over_ranks: all-reduce (sum) of a tensor over ranks.

    Returns:
        (the loss to back-propagate on this rank, the global token mean to log, the same
        on every rank). With one rank, both are ``loss``.
    """
    if world_size == 1:
        return loss, loss
    totals = sum_over_ranks(torch.stack([loss.detach() * count, count.to(loss.dtype)]))
    return loss * (count * world_size / totals[1]), totals[0] / totals[1]
