"""Next-token cross-entropy over supervised (assistant) tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfuse.processing.text import IGNORE_INDEX


def next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, ids: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of predicting ``labels[t+1]`` from position t.

    Args:
        logits: (B, L, V).
        labels: (B, L), ``IGNORE_INDEX`` where no loss applies.
        ids: record ids, named in the error when nothing is supervised.

    Returns:
        (loss, number of supervised tokens).

    Raises:
        ValueError: when the batch has no supervised token (a silent zero loss otherwise).
    """
    targets = labels[:, 1:]  # (B, L-1)
    count = (targets != IGNORE_INDEX).sum()
    if int(count) == 0:
        raise ValueError(f"batch without any supervised token; records: {ids}")
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss / count, count
