"""Row groups: run one padded batch through the decoder as a few shorter batches.

A training batch mixes one-word answers with captions, so its rows are padded to the longest
one: on the built-in world half of the decoder's positions are padding. The rows of a batch
do not interact in the decoder, so the batch can be cut into groups of rows of similar
length, each trimmed to its own longest row, and run group by group. The logits are the same
(up to float rounding) and the batch keeps its random mix of tasks, which length-grouped
sampling (``data.sampler=length_grouped``) does not.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowGroup(NamedTuple):
    """Rows (N,) of the batch and the column span ``[start, stop)`` that holds all their
    attended positions."""

    rows: torch.Tensor
    start: int
    stop: int


def row_groups(
    attention_mask: torch.Tensor, max_groups: int, min_saving: float = 0.1
) -> list[RowGroup]:
    """Splits a padded batch into at most ``max_groups`` groups of rows, cutting the padded
    positions the decoder runs over.

    Rows are ordered by the length of their attended span and cut into contiguous groups
    with the fewest (rows x span) positions in all (exact, by dynamic programming). Each
    group beyond the first must save at least ``min_saving`` of the whole batch's positions,
    since every group costs a decoder call of its own.

    Args:
        attention_mask: (B, L), nonzero where a position is attended (left, right or no
            padding).
        max_groups: most groups; 1 returns the whole batch as one group without reading the
            mask (no host synchronisation).
        min_saving: the share of the batch's B x L positions each extra group must save.

    Returns:
        The groups; one group with every row and the full span when grouping saves too
        little. Rows without any attended position go into the shortest group.
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be at least 1, got {max_groups}")
    rows, width = attention_mask.shape
    everything = RowGroup(torch.arange(rows, device=attention_mask.device), 0, width)
    if max_groups == 1 or rows < 2:
        return [everything]
    attended = attention_mask.bool().cpu()
    any_attended = attended.any(dim=1)
    columns = torch.arange(width)
    starts = torch.where(attended, columns, width).amin(dim=1)  # (B,)
    stops = torch.where(attended, columns + 1, 0).amax(dim=1)  # (B,)
    starts[~any_attended], stops[~any_attended] = 0, 0
    first, last = starts.tolist(), stops.tolist()
    order = sorted(range(rows), key=lambda r: (last[r] - first[r], first[r]))
    cuts = _best_cuts(order, first, last, max_groups, min_saving * rows * width)
    if len(cuts) == 1:
        return [everything]
    groups = []
    for begin, end in zip([0, *cuts], cuts, strict=False):
        members = order[begin:end]
        start = min(first[r] for r in members)
        stop = max(last[r] for r in members)
        if stop <= start:  # only rows without attended positions: keep one column
            start, stop = 0, 1
        index = torch.tensor(members, device=attention_mask.device)
        groups.append(RowGroup(index, start, stop))
    return groups


def _best_cuts(
    order: list[int], starts: list[int], stops: list[int], max_groups: int, group_cost: float
) -> list[int]:
    """The ends (exclusive, in ``order``) of the groups with the fewest positions plus
    ``group_cost`` per group beyond the first."""
    n = len(order)
    # cost[first][last]: positions of the group order[first:last] (rows x their span)
    cost = [[0] * (n + 1) for _ in range(n + 1)]
    for first in range(n):
        low, high = float("inf"), 0
        for last in range(first + 1, n + 1):
            low = min(low, starts[order[last - 1]])
            high = max(high, stops[order[last - 1]])
            cost[first][last] = (last - first) * max(high - low, 0)

    inf = float("inf")
    # best[g][i]: fewest positions for order[:i] in exactly g groups; back[g][i]: last cut
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    back = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for groups in range(1, max_groups + 1):
        for end in range(1, n + 1):
            for cut in range(groups - 1, end):
                value = best[groups - 1][cut] + cost[cut][end]
                if value < best[groups][end]:
                    best[groups][end], back[groups][end] = value, cut
    chosen = min(range(1, max_groups + 1), key=lambda g: (best[g][n] + (g - 1) * group_cost, g))
    cuts, end = [], n
    for groups in range(chosen, 0, -1):
        cuts.append(end)
        end = back[groups][end]
    return cuts[::-1]
