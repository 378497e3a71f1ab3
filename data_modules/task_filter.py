"""Selecting conversation records by task: ``data.tasks=[image/caption,audio/caption]``.

A pattern is a task name or a shell-style wildcard (``"*/caption"``, ``"image/*"``), matched
against the record's ``task``. A multi-turn record that names the task of every answer in
``turn_tasks`` (the built-in world's records do) keeps its leading turns whose tasks match
and loses the rest, so that a record asking for a caption and then a colour is served as the
caption turn alone; a record whose first turn does not match is dropped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path


def task_matches(task: str, patterns: Sequence[str]) -> bool:
    """Whether ``task`` matches any of ``patterns`` (names or ``fnmatch`` wildcards)."""
    return any(fnmatch.fnmatchcase(task, pattern) for pattern in patterns)


def select_tasks(
    records: Sequence[dict], patterns: Sequence[str], source: str | Path = "<records>"
) -> list[dict]:
    """The records (cut to their leading matching turns) whose task matches ``patterns``.

    Records that are cut are copies; the others are passed through.

    Raises:
        ValueError: no record matches, naming ``source``, the patterns and the tasks present.
    """
    patterns = [str(p) for p in patterns]
    selected = []
    for record in records:
        kept = _leading_turns(record, patterns)
        if kept is not None:
            selected.append(kept)
    if not selected:
        present = sorted({str(r.get("task")) for r in records})
        raise ValueError(f"{source}: no record matches data.tasks={patterns} (tasks: {present})")
    return selected


def _leading_turns(record: dict, patterns: Sequence[str]) -> dict | None:
    if not task_matches(str(record.get("task", "")), patterns):
        return None
    turn_tasks = record.get("turn_tasks")
    if not isinstance(turn_tasks, list) or not turn_tasks:
        return record
    keep = 0
    while keep < len(turn_tasks) and task_matches(str(turn_tasks[keep]), patterns):
        keep += 1
    if keep == 0:
        return None
    if keep == len(turn_tasks):
        return record
    messages, answers = [], 0
    for message in record["messages"]:
        messages.append(message)
        answers += message.get("role") == "assistant"
        if answers == keep:
            break
    return {**record, "messages": messages, "turn_tasks": turn_tasks[:keep]}
