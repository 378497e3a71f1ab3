"""Metric dispatch: a task's metric names -> per-record scores and corpus values, overall and
per sub-task (the records' ``task`` field).

A row is one record's outputs: ``id``, ``task``, ``prediction`` (the generated text, before
post-processing), ``reference`` (the last assistant turn), ``references`` (every acceptable
answer), and for the other passes ``choices``/``answer_index``/``option_logprobs``/
``option_tokens`` (multiple choice) or ``nll``/``tokens`` (perplexity). Scoring adds
``scores`` (per-record values) and ``score`` (the first of them).

Metrics (each reproduces the reference implementation in ``mmfuse.metrics``):

====================  ==========  =============================================================
name                  needs       values
====================  ==========  =============================================================
exact_match           generation  mean exact match with the last assistant turn (normalised)
exact_match_any       generation  mean exact match with any of the references
vqa_accuracy          generation  official VQA accuracy over the references (ten in VQAv2)
caption               generation  BLEU-1..4, ROUGE-L, CIDEr-D (pycocoevalcap) over references
wer / cer             generation  corpus word / character error rate
accuracy / macro_f1   generation  classification accuracy, macro F1 (normalised labels)
choice_generate       generation  accuracy_generate: the letter or option text in the answer
choice_loglik         options     accuracy_loglik: the option of highest log-likelihood
perplexity            nll         exp(total NLL / total assistant tokens)
====================  ==========  =============================================================
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hydra.utils import instantiate

from mmfuse.evaluation.tasks import LETTERS, TaskConfig
from mmfuse.metrics.asr import cer, wer
from mmfuse.metrics.caption import caption_scores
from mmfuse.metrics.classification import accuracy, macro_f1
from mmfuse.metrics.exact_match import exact_match, normalize_answer
from mmfuse.metrics.vqa import vqa_accuracy

GENERATE, OPTIONS, NLL = "generate", "options", "nll"


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def _no_final_period(text: str) -> str:
    text = text.rstrip()
    return text[:-1] if text.endswith(".") else text


POSTPROCESS: dict[str, Callable[[str], str]] = {
    "strip": str.strip,
    "first_line": _first_line,
    "lower": str.lower,
    "no_final_period": _no_final_period,
}


def postprocess(text: str | None, steps: Sequence[str]) -> str:
    """Applies the named steps in order (None -> "")."""
    text = text or ""
    for step in steps:
        if step not in POSTPROCESS:
            raise ValueError(f"postprocess: unknown step {step!r}; known: {sorted(POSTPROCESS)}")
        text = POSTPROCESS[step](text)
    return text


# ----------------------------------------------------------------------------- multiple choice


def extract_choice(text: str, choices: Sequence[str]) -> int | None:
    """The option an answer names, or None when it names none or several. In order: a
    capital letter alone (``B``, ``(B)``, ``B.``), a leading letter marked by ``.``, ``:``
    or ``)`` (``B. red``), ``answer: B`` / ``the answer is (B)``, the option text (equal after
    normalisation, else the only option contained as whole words), a leading letter and a
    space (``B red``)."""
    letters = LETTERS[: len(choices)]
    stripped = text.strip()
    marked = (
        rf"^\(?([{letters}])\)?\.?$",
        rf"^\(?([{letters}])(?:\)|[.:])",
        rf"(?i:\banswer\b(?:\s+is)?)\s*:?\s*\(?([{letters}])\b",
    )
    for pattern in marked:
        found = re.search(pattern, stripped)
        if found:
            return letters.index(found.group(1))
    answer = normalize_answer(stripped)
    options = [normalize_answer(c) for c in choices]
    if answer in options:
        return options.index(answer)
    contained = [
        k for k, option in enumerate(options) if re.search(rf"\b{re.escape(option)}\b", answer)
    ]
    if len(contained) == 1:
        return contained[0]
    found = re.match(rf"^([{letters}])\s", stripped)
    return letters.index(found.group(1)) if found and not contained else None


def loglik_choice(row: dict, length_normalize: bool) -> int:
    """The option with the highest (optionally per-token) log-likelihood."""
    values = row["option_logprobs"]
    if length_normalize:
        values = [v / max(n, 1) for v, n in zip(values, row["option_tokens"], strict=True)]
    return max(range(len(values)), key=values.__getitem__)


# ----------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """``row(answer, row, task)`` gives per-record values (their corpus value is the mean);
    ``corpus(answers, rows, task)`` gives corpus-level values directly."""

    needs: str
    row: Callable[[str, dict, TaskConfig], dict[str, float]] | None = None
    corpus: Callable[[list[str], list[dict], TaskConfig], dict[str, float]] | None = None


def _choice_generate(answer: str, row: dict, task: TaskConfig) -> dict[str, float]:
    picked = extract_choice(answer, row["choices"])
    row["extracted_choice"] = picked
    return {"accuracy_generate": float(picked == row["answer_index"])}


def _choice_loglik(answer: str, row: dict, task: TaskConfig) -> dict[str, float]:
    picked = loglik_choice(row, task.choices.length_normalize)
    return {"accuracy_loglik": float(picked == row["answer_index"])}


def _row_wer(answer: str, row: dict, task: TaskConfig) -> dict[str, float]:
    try:
        return {"wer": wer(row["reference"], answer)}
    except ValueError:  # an empty reference: no per-record rate
        return {}


def _labels(answers: list[str], rows: list[dict]) -> tuple[list[str], list[str]]:
    return [normalize_answer(r["reference"]) for r in rows], [normalize_answer(a) for a in answers]


def _caption(answers: list[str], rows: list[dict], task: TaskConfig) -> dict[str, float]:
    refs = {i: r["references"] or [r["reference"]] for i, r in enumerate(rows)}
    return caption_scores(dict(enumerate(answers)), refs)


def _row_perplexity(answer: str, row: dict, task: TaskConfig) -> dict[str, float]:
    return {"perplexity": math.exp(row["nll"] / row["tokens"])} if row["tokens"] else {}


def _perplexity(answers: list[str], rows: list[dict], task: TaskConfig) -> dict[str, float]:
    tokens = sum(r["tokens"] for r in rows)
    if tokens == 0:
        raise ValueError(f"task {task.name}: no assistant tokens to compute perplexity on")
    return {"perplexity": math.exp(sum(r["nll"] for r in rows) / tokens)}


METRICS: dict[str, Metric] = {
    "exact_match": Metric(
        GENERATE, row=lambda a, r, t: {"exact_match": exact_match(a, r["reference"])}
    ),
    "exact_match_any": Metric(
        GENERATE,
        row=lambda a, r, t: {
            "exact_match_any": max(exact_match(a, ref) for ref in r["references"] or [""])
        },
    ),
    "vqa_accuracy": Metric(
        GENERATE, row=lambda a, r, t: {"vqa_accuracy": vqa_accuracy(a, r["references"])}
    ),
    "caption": Metric(GENERATE, corpus=_caption),
    "wer": Metric(
        GENERATE,
        row=_row_wer,
        corpus=lambda a, rows, t: {"wer": wer([r["reference"] for r in rows], a)},
    ),
    "cer": Metric(
        GENERATE, corpus=lambda a, rows, t: {"cer": cer([r["reference"] for r in rows], a)}
    ),
    "accuracy": Metric(
        GENERATE,
        row=lambda a, r, t: {
            "accuracy": float(normalize_answer(a) == normalize_answer(r["reference"]))
        },
        corpus=lambda a, rows, t: {"accuracy": accuracy(*_labels(a, rows))},
    ),
    "macro_f1": Metric(
        GENERATE, corpus=lambda a, rows, t: {"macro_f1": macro_f1(*_labels(a, rows))}
    ),
    "choice_generate": Metric(GENERATE, row=_choice_generate),
    "choice_loglik": Metric(OPTIONS, row=_choice_loglik),
    "perplexity": Metric(NLL, row=_row_perplexity, corpus=_perplexity),
}


def _custom(spec: dict) -> Metric:
    fn = instantiate({**spec, "_partial_": True})

    def corpus(answers: list[str], rows: list[dict], task: TaskConfig) -> dict[str, float]:
        return dict(fn([{**r, "prediction": a} for r, a in zip(rows, answers, strict=True)]))

    return Metric(GENERATE, corpus=corpus)


def metrics_of(task: TaskConfig) -> list[Metric]:
    """The task's metrics; an unknown name is an error that lists the known ones."""
    out = []
    for spec in task.metrics:
        if isinstance(spec, dict) and "_target_" in spec:
            out.append(_custom(spec))
        elif spec in METRICS:
            out.append(METRICS[spec])
        else:
            raise ValueError(f"task {task.name}: unknown metric {spec!r}; known: {sorted(METRICS)}")
    return out


def needs(task: TaskConfig) -> set[str]:
    """The model passes the task's metrics need: ``generate``, ``options``, ``nll``."""
    return {m.needs for m in metrics_of(task)}


def score_rows(task: TaskConfig, rows: list[dict]) -> dict:
    """Scores ``rows`` (in place: ``scores`` and ``score``) and returns the task's metrics
    ``{"overall", "tasks": {sub-task: ...}, "n": {sub-task: records}}``. A task whose metrics
    give one value reports plain numbers; with several values each is ``{name: value}``."""
    if not rows:
        raise ValueError(f"task {task.name}: no records to score")
    metrics = metrics_of(task)
    generating = any(m.needs == GENERATE for m in metrics)
    for row in rows:
        _fill_references(row)
        if generating and row.get("reference") is None:
            raise ValueError(f"task {task.name}: row {row.get('id')!r} has no reference(s)")
    answers = [postprocess(r.get("prediction"), task.postprocess) for r in rows]
    per_row = [
        [m.row(a, r, task) if m.row is not None else {} for a, r in zip(answers, rows, strict=True)]
        for m in metrics
    ]
    for i, row in enumerate(rows):
        row["scores"] = {k: v for values in per_row for k, v in values[i].items()}
        if row["scores"]:
            row["score"] = next(iter(row["scores"].values()))

    def values(indices: list[int]) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric, row_values in zip(metrics, per_row, strict=True):
            for name in dict.fromkeys(k for i in indices for k in row_values[i]):
                scored = [row_values[i][name] for i in indices if name in row_values[i]]
                out[name] = sum(scored) / len(scored)
            if metric.corpus is not None:
                picked = [answers[i] for i in indices], [rows[i] for i in indices]
                out.update(metric.corpus(*picked, task))
        return out

    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row.get("task") or task.name].append(i)
    overall = values(list(range(len(rows))))
    single = len(overall) == 1

    def shape(found: dict[str, float]) -> float | dict[str, float]:
        return next(iter(found.values())) if single else found

    return {
        "overall": shape(overall),
        "tasks": {name: shape(values(idx)) for name, idx in sorted(groups.items())},
        "n": {name: len(idx) for name, idx in sorted(groups.items())},
    }


def _fill_references(row: dict) -> None:
    """A row needs only one of ``reference`` and ``references`` (or ``choices`` and
    ``answer_index``); the others are derived."""
    if row.get("reference") is None and row.get("choices") and "answer_index" in row:
        row["reference"] = row["choices"][row["answer_index"]]
    references = row.get("references") or []
    if row.get("reference") is None and references:
        row["reference"] = references[0]
    if not references and row.get("reference") is not None:
        row["references"] = [row["reference"]]


def value_names(metrics: dict) -> list[str]:
    """The value names of a metrics dict (``[""]`` for a single plain value)."""
    overall = metrics["overall"]
    return list(overall) if isinstance(overall, dict) else [""]


def get_value(values: float | dict, name: str) -> float:
    return values if not isinstance(values, dict) else values[name]
