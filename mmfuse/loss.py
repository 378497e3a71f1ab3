"""Next-token cross-entropy over supervised (assistant) tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmfuse.processing.text import IGNORE_INDEX


def next_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ids: list[str] | None = None,
    check_supervised: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of predicting ``labels[t+1]`` from position t.

    Args:
        logits: (B, L, V).
        labels: (B, L), ``IGNORE_INDEX`` where no loss applies.
        ids: record ids, named in the error when nothing is supervised.
        check_supervised: raise when nothing is supervised. The check reads the count back
            to the host (a device sync); the training step leaves it to the processor, which
            already rejects every record without a supervised token.

    Returns:
        (loss, number of supervised tokens).

    Raises:
        ValueError: when the batch has no supervised token (a silent zero loss otherwise).
    """
    targets = labels[:, 1:]  # (B, L-1)
    count = (targets != IGNORE_INDEX).sum()
    if check_supervised and int(count) == 0:
        raise ValueError(f"batch without any supervised token; records: {ids}")
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss / count, count


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
    all-reduce of ``(S_r, n_r)`` per step.

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
