"""Tests of mmfuse.metrics.exact_match."""

from __future__ import annotations

import pytest

from mmfuse.metrics.exact_match import ExactMatchByTask, exact_match, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Red.", "red"),
        (" Top Left ", "top left"),
        ("top left .", "top left"),
        ("YES", "yes"),
        ("3.5", "3.5"),
        ("", ""),
        ("end..", "end."),  # only one final period goes
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("Red.", "red") == 1.0
    assert exact_match(" Top Left ", "top left") == 1.0
    assert exact_match("red circle", "red") == 0.0
    assert exact_match("", "red") == 0.0


def test_exact_match_by_task():
    metric = ExactMatchByTask()
    metric.update(
        ["image/color", "image/color", "audio/pitch"],
        ["Red.", "blue", "high"],
        ["red", "red", "high"],
    )
    metric.update(["audio/pitch", "both/total"], ["low", "Five"], ["middle", "five"])
    result = metric.compute()
    assert set(result) == {"overall", "tasks", "n"}
    assert result["overall"] == pytest.approx(3 / 5)
    assert result["tasks"] == {"audio/pitch": 0.5, "both/total": 1.0, "image/color": 0.5}
    assert list(result["tasks"]) == sorted(result["tasks"])
    assert result["n"] == {"audio/pitch": 2, "both/total": 1, "image/color": 2}


def test_empty_metric():
    assert ExactMatchByTask().compute() == {"overall": 0.0, "tasks": {}, "n": {}}


def test_update_needs_equal_lengths():
    with pytest.raises(ValueError):
        ExactMatchByTask().update(["a", "b"], ["x"], ["x", "y"])
