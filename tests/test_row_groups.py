"""Tests of mmfuse.row_groups: cutting a padded batch into groups of rows of similar length."""

from __future__ import annotations

import itertools

import pytest
import torch

from mmfuse.row_groups import RowGroup, row_groups


def _right_padded(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()


def _as_sets(groups: list[RowGroup]) -> list[tuple[set[int], int, int]]:
    return [(set(g.rows.tolist()), g.start, g.stop) for g in groups]


def _positions(groups: list[RowGroup]) -> int:
    return sum(len(g.rows) * (g.stop - g.start) for g in groups)


def test_short_and_long_rows_are_split_and_trimmed():
    mask = _right_padded([9, 2, 8, 3], width=10)
    groups = row_groups(mask, max_groups=2)
    assert _as_sets(groups) == [({1, 3}, 0, 3), ({0, 2}, 0, 9)]
    assert _positions(groups) == 2 * 3 + 2 * 9  # 24 of the batch's 40


def test_left_padding_is_trimmed_from_the_left():
    mask = _right_padded([9, 2, 8, 3], width=10).flip(1)
    assert _as_sets(row_groups(mask, max_groups=2)) == [({1, 3}, 7, 10), ({0, 2}, 1, 10)]


def test_one_group_returns_the_whole_batch():
    mask = _right_padded([9, 2, 8, 3], width=10)
    (group,) = row_groups(mask, max_groups=1)
    assert group.rows.tolist() == [0, 1, 2, 3] and (group.start, group.stop) == (0, 10)


def test_a_group_must_save_enough_positions():
    mask = _right_padded([10, 10, 10, 9], width=10)  # a split saves 1 of 40 positions
    (group,) = row_groups(mask, max_groups=3, min_saving=0.1)
    assert (group.start, group.stop) == (0, 10) and len(group.rows) == 4
    assert len(row_groups(mask, max_groups=3, min_saving=0.0)) == 2


def test_rows_without_attended_positions_join_the_shortest_group():
    mask = _right_padded([0, 2, 10, 10, 2, 10], width=10)
    groups = row_groups(mask, max_groups=2)
    assert _as_sets(groups) == [({0, 1, 4}, 0, 2), ({2, 3, 5}, 0, 10)]


@pytest.mark.parametrize("seed", range(5))
def test_the_split_has_the_fewest_positions(seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 13, (7,), generator=generator).tolist()
    mask = _right_padded(lengths, width=12)
    groups = row_groups(mask, max_groups=3, min_saving=0.0)
    # brute force: every way to cut the rows, sorted by length, into 1 to 3 runs
    ordered = sorted(lengths)
    best = min(
        sum((b - a) * max(ordered[a:b]) for a, b in itertools.pairwise([0, *cuts, len(ordered)]))
        for count in range(3)
        for cuts in itertools.combinations(range(1, len(ordered)), count)
    )
    assert _positions(groups) == best
    covered = sorted(r for g in groups for r in g.rows.tolist())
    assert covered == list(range(7))
    for group in groups:  # every attended position of a row lies in its group's span
        rows = mask[group.rows]
        assert rows[:, : group.start].sum() == 0 and rows[:, group.stop :].sum() == 0


def test_max_groups_must_be_positive():
    with pytest.raises(ValueError, match="max_groups must be at least 1"):
        row_groups(torch.ones(2, 3), max_groups=0)
