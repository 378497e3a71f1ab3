"""Markdown tables of evaluation results (printed and written to ``results.md``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mmfuse.evaluation.scoring import get_value, value_names

OVERALL = "overall"


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int) -> str:
    """A markdown table; columns from ``numeric_from`` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def task_table(metrics: Mapping, single_name: str = "score") -> str:
    """One task's metrics: a row per sub-task and ``overall``, a column per value
    (``single_name`` heads the column of a task with one plain value)."""
    names = value_names(metrics)
    headers = ["task", "n", *(n or single_name.replace("_", " ") for n in names)]
    rows = [
        [sub, str(metrics["n"][sub]), *(fmt(get_value(values, n)) for n in names)]
        for sub, values in metrics["tasks"].items()
    ]
    total = str(sum(metrics["n"].values()))
    rows.append([OVERALL, total, *(fmt(get_value(metrics["overall"], n)) for n in names)])
    return markdown(headers, rows, 1)


def long_rows(
    task: str, metrics: Mapping, single_name: str = "score"
) -> list[tuple[str, str, str, float]]:
    """``(task, sub-task, value name, value)`` for every value, overall first."""
    out = []
    names = value_names(metrics)
    entries = [(OVERALL, metrics["overall"]), *metrics["tasks"].items()]
    if len(metrics["tasks"]) == 1:  # the sub-task would repeat overall
        entries = entries[:1]
    for sub, values in entries:
        for name in names:
            out.append((task, sub, name or single_name, get_value(values, name)))
    return out


def comparison_table(
    columns: Mapping[str, Mapping[str, Mapping]], single_names: Mapping[str, str] | None = None
) -> str:
    """``{column: {task: metrics}}`` (checkpoints or ablations) -> one row per (task,
    sub-task, value), one column per key. ``single_names[task]`` names a plain value."""
    names = single_names or {}
    keys: dict[tuple[str, str, str], dict[str, float]] = {}
    for column, tasks in columns.items():
        for task, metrics in tasks.items():
            for task_name, sub, name, value in long_rows(task, metrics, names.get(task, "score")):
                keys.setdefault((task_name, sub, name), {})[column] = value
    rows = [
        [task, sub, name, *(fmt(values.get(c)) for c in columns)]
        for (task, sub, name), values in keys.items()
    ]
    return markdown(["task", "sub-task", "metric", *columns], rows, 3)
