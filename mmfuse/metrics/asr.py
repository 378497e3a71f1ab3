"""Corpus-level word and character error rates for speech recognition.

WER = (S + D + I) / N over the whole corpus: the Levenshtein edits of every hypothesis against
its reference, summed, divided by the total number of reference words (not a mean of per-utterance
rates). CER is the same over characters, spaces between words included. This is what
``jiwer.wer(references, hypotheses)`` / ``jiwer.cer`` compute for lists of sentences.

Both normalise first with :func:`normalize_asr_text` (lower-case, delete Unicode punctuation,
i.e. every character whose category starts with "P" as ``jiwer.RemovePunctuation`` does, collapse
whitespace to single spaces). Pass ``normalizer=None`` to compare the text as given (split on
whitespace), or any ``str -> str`` function.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence


def normalize_asr_text(text: str, lowercase: bool = True, remove_punctuation: bool = True) -> str:
    """``"Hello,  World! It's"`` -> ``"hello world its"`` (apostrophes are punctuation too)."""
    if lowercase:
        text = text.lower()
    if remove_punctuation:
        text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


def _edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance (unit-cost substitutions, deletions, insertions)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i]
        for j, h in enumerate(hyp, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


Normalizer = Callable[[str], str] | None


def _as_list(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _error_rate(references, hypotheses, normalizer: Normalizer, unit: Callable) -> float:
    refs, hyps = _as_list(references), _as_list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    edits = total = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        if normalizer is not None:
            ref, hyp = normalizer(ref), normalizer(hyp)
        ref_units, hyp_units = unit(ref), unit(hyp)
        edits += _edit_distance(ref_units, hyp_units)
        total += len(ref_units)
    if total == 0:
        raise ValueError("the references are empty (after normalisation); the rate is undefined")
    return edits / total


def wer(
    references: str | Sequence[str],
    hypotheses: str | Sequence[str],
    normalizer: Normalizer = normalize_asr_text,
) -> float:
    """Corpus word error rate: total word edits / total reference words."""
    return _error_rate(references, hypotheses, normalizer, str.split)


def cer(
    references: str | Sequence[str],
    hypotheses: str | Sequence[str],
    normalizer: Normalizer = normalize_asr_text,
) -> float:
    """Corpus character error rate: total character edits / total reference characters.

    With ``normalizer=None`` the text is only stripped (as jiwer's default for CER) and every
    character, inner whitespace included, counts.
    """
    return _error_rate(references, hypotheses, normalizer, lambda s: list(s.strip()))
