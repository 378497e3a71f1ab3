"""Accuracy and macro F1 for single-label classification, as scikit-learn defines them.

``macro_f1`` reproduces ``sklearn.metrics.f1_score(y_true, y_pred, average="macro")`` with its
default ``labels=None``: the label set is the union of the labels in the references and in the
predictions, and the macro F1 is the unweighted mean of the per-label F1 = 2TP / (2TP + FP + FN).
A label that is never in the references and never predicted is not in that set, so it does not
dilute the mean. Every label in the set occurs at least once, so 2TP + FP + FN > 0 and sklearn's
``zero_division`` never applies: a label only ever predicted (no support) or only ever in the
references (never predicted) simply gets F1 = 0, with no warning.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence


def _check(references: Sequence[Hashable], predictions: Sequence[Hashable]) -> None:
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("need at least one example")


def accuracy(references: Sequence[Hashable], predictions: Sequence[Hashable]) -> float:
    """Fraction of examples whose prediction equals the reference."""
    _check(references, predictions)
    return sum(r == p for r, p in zip(references, predictions, strict=True)) / len(references)


def per_label_f1(references: Sequence[Hashable], predictions: Sequence[Hashable]) -> dict:
    """F1 of every label in the union of references and predictions."""
    _check(references, predictions)
    tp = Counter(r for r, p in zip(references, predictions, strict=True) if r == p)
    fp = Counter(p for r, p in zip(references, predictions, strict=True) if r != p)
    fn = Counter(r for r, p in zip(references, predictions, strict=True) if r != p)
    labels = set(references) | set(predictions)
    return {label: 2 * tp[label] / (2 * tp[label] + fp[label] + fn[label]) for label in labels}


def macro_f1(references: Sequence[Hashable], predictions: Sequence[Hashable]) -> float:
    """Unweighted mean of :func:`per_label_f1` (sklearn ``average="macro"``)."""
    scores = per_label_f1(references, predictions)
    return sum(scores.values()) / len(scores)
