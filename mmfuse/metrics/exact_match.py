"""Exact match after light normalisation, overall and per task."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable


def normalize_answer(text: str) -> str:
    """Lower-cases, strips surrounding spaces and one final period."""
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


class ExactMatchByTask:
    """Accumulates exact-match scores per task; ``overall`` is the mean over all records."""

    def __init__(self) -> None:
        self.hits: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def update(self, tasks: Iterable[str], predictions: Iterable[str], references: Iterable[str]):
        for task, prediction, reference in zip(tasks, predictions, references, strict=True):
            self.hits[task] += exact_match(prediction, reference)
            self.counts[task] += 1

    def compute(self) -> dict:
        """Returns ``{"overall": acc, "tasks": {task: acc}, "n": {task: count}}``."""
        total = sum(self.counts.values())
        tasks = {t: self.hits[t] / self.counts[t] for t in sorted(self.counts)}
        overall = sum(self.hits.values()) / total if total else 0.0
        return {"overall": overall, "tasks": tasks, "n": {t: self.counts[t] for t in tasks}}
