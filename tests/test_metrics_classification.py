"""Tests of mmfuse.metrics.classification: hand-computed values, and scikit-learn if installed."""

from __future__ import annotations

import random
import warnings

import pytest

from mmfuse.metrics.classification import accuracy, macro_f1, per_label_f1

REFS = ["cat", "cat", "dog", "dog", "dog", "bird", "bird", "fish"]
PREDS = ["cat", "dog", "dog", "dog", "cat", "bird", "cat", "owl"]


def test_accuracy():
    assert accuracy(REFS, PREDS) == pytest.approx(4 / 8)
    assert accuracy([1, 2, 3], [1, 2, 3]) == 1.0
    assert accuracy(["a"], ["b"]) == 0.0


def test_per_label_and_macro_f1_hand_computed():
    # label  TP FP FN  F1 = 2TP / (2TP + FP + FN)
    # cat     1  2  1  2/5    (predicted at 0, 4, 6; right at 0; missed at 1)
    # dog     2  1  1  4/6    (predicted at 1, 2, 3; right at 2, 3; missed at 4)
    # bird    1  0  1  2/3
    # fish    0  0  1  0      (in the references only: never predicted)
    # owl     0  1  0  0      (predicted only: no support; counted, F1 0, as in sklearn)
    f1 = per_label_f1(REFS, PREDS)
    assert f1 == pytest.approx({"cat": 2 / 5, "dog": 4 / 6, "bird": 2 / 3, "fish": 0.0, "owl": 0.0})
    assert macro_f1(REFS, PREDS) == pytest.approx((2 / 5 + 4 / 6 + 2 / 3) / 5, abs=1e-12)


def test_labels_absent_from_both_sides_do_not_count():
    # "c" is a class of the task but occurs in neither list: it is not averaged in (sklearn's
    # default labels=None gives the same); a perfect prediction scores 1.
    assert macro_f1(["a", "b", "a"], ["a", "b", "a"]) == 1.0
    assert macro_f1([0, 1, 1, 1], [1, 1, 1, 1]) == pytest.approx((0 + 6 / 7) / 2)


def test_errors():
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])
    with pytest.raises(ValueError):
        macro_f1([], [])


def test_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    cases = [(REFS, PREDS), ([0, 1, 1, 1], [1, 1, 1, 1]), (["a"], ["b"])]
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 40)
        labels = list(range(rng.randint(1, 7)))
        cases.append(
            ([rng.choice(labels) for _ in range(n)], [rng.choice(labels) for _ in range(n)])
        )
    for refs, preds in cases:
        expected = metrics.accuracy_score(refs, preds)
        assert accuracy(refs, preds) == pytest.approx(expected, abs=1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the default zero_division="warn" never fires
            expected = metrics.f1_score(refs, preds, average="macro")
        assert macro_f1(refs, preds) == pytest.approx(expected, abs=1e-12)
