"""Modality ablation: ``ablate=[none,image,audio,all]`` runs every task with each modality
removed from every record and reports the change of each task's main value (its first).

An ablation is ``none``, ``all`` (every modality) or modality names joined by ``+``
(``image``, ``audio``, ``image+audio``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mmfuse.evaluation.scoring import get_value, value_names
from mmfuse.evaluation.table import OVERALL, fmt, markdown
from mmfuse.types import MODALITIES

NONE, ALL = "none", "all"


def ablation_drops(name: str) -> tuple[str, ...]:
    """The modalities an ablation removes: ``"none"`` -> (), ``"all"`` -> every one."""
    if name == NONE:
        return ()
    if name == ALL:
        return MODALITIES
    parts = tuple(name.split("+"))
    unknown = [p for p in parts if p not in MODALITIES]
    if unknown:
        choices = [NONE, ALL, *MODALITIES]
        raise ValueError(f"ablate: unknown {unknown} in {name!r}; choose from {choices}")
    return parts


def header(ablation: str) -> str:
    """A column title: ``none`` -> ``all media``, ``all`` -> ``no media``, else ``no <x>``."""
    return {NONE: "all media", ALL: "no media"}.get(ablation, f"no {ablation}")


def _primary(metrics: Mapping, sub: str) -> tuple[str, float]:
    name = value_names(metrics)[0]
    values = metrics["overall"] if sub == OVERALL else metrics["tasks"][sub]
    return name, get_value(values, name)


def drops(per_ablation: Mapping[str, Mapping[str, Mapping]], baseline: str = NONE) -> dict:
    """``{task: {ablation: {sub-task: value - baseline value}}}`` of each task's main value,
    overall and per sub-task."""
    base = per_ablation[baseline]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for ablation, tasks in per_ablation.items():
        if ablation == baseline:
            continue
        for task, metrics in tasks.items():
            subs = [OVERALL, *metrics["tasks"]]
            out.setdefault(task, {})[ablation] = {
                sub: _primary(metrics, sub)[1] - _primary(base[task], sub)[1] for sub in subs
            }
    return out


def ablation_table(
    per_ablation: Mapping[str, Mapping[str, Mapping]],
    single_names: Mapping[str, str] | None = None,
    baseline: str = NONE,
) -> str:
    """A row per (task, sub-task): the main value with every ablation and, after it, its
    change from ``baseline`` in brackets."""
    ablations: Sequence[str] = list(per_ablation)
    names = single_names or {}
    rows = []
    for task, metrics in per_ablation[ablations[0]].items():
        subs = [OVERALL, *(metrics["tasks"] if len(metrics["tasks"]) > 1 else [])]
        for sub in subs:
            name, _ = _primary(metrics, sub)
            cells = [task, sub, name or names.get(task, "score")]
            base = (
                _primary(per_ablation[baseline][task], sub)[1] if baseline in per_ablation else None
            )
            for ablation in ablations:
                value = _primary(per_ablation[ablation][task], sub)[1]
                delta = "" if base is None or ablation == baseline else f" ({value - base:+.3f})"
                cells.append(fmt(value) + delta)
            rows.append(cells)
    headers = ["task", "sub-task", "metric", *(header(a) for a in ablations)]
    return markdown(headers, rows, 3)
