"""ClothoAQA CSV -> audio question answering records.

Input: ``clotho_aqa_train.csv`` (or ``_val``/``_test``) with columns ``file_name,
QuestionText, answer, confidence``: one row per (question, annotator), usually three
annotators per question. The rows of one question (same ``file_name`` and ``QuestionText``)
become one record, in order of first appearance: the audio, the question, and the majority
answer (compared case-insensitively; a tie goes to the answer with more ``yes`` confidences,
then to the one given first); every annotator's answer, in row order, goes into
``references``.

Files are ``file_name`` under ``--audio-root`` (default: the CSV's directory; in the ClothoAQA
archive, ``audio_files/``). The source has no question ids: a record's id is
``<file_name>#q<n>``, its question's position among that file's questions (stable for a given
CSV). Task ``clotho_aqa/yes-no`` when every answer is yes or no, else ``clotho_aqa/single``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from data_modules.converters.common import (
    EMPTY_ANSWER,
    EMPTY_QUESTION,
    Bad,
    Converted,
    Item,
    cell,
    media_part,
    qa_record,
    read_csv,
)

NAME = "clotho_aqa"
HELP = "ClothoAQA CSV (file_name, QuestionText, answer, confidence)"
COLUMNS = ("file_name", "QuestionText", "answer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--audio-root", type=Path, help="directory holding the clips (default: the CSV's directory)"
    )


def from_args(args: argparse.Namespace) -> Iterator[Item]:
    return records(args.input, args.audio_root, args.task)


def records(path: Path, audio_root: Path | None = None, task: str | None = None) -> Iterator[Item]:
    """Converts a ClothoAQA CSV; bad rows come first, then one record per question."""
    root = audio_root if audio_root is not None else path.parent
    questions: dict[tuple[str, str], list[tuple[str, str, str]]] = {}  # -> (where, answer, conf)
    for where, row in read_csv(path, COLUMNS):
        try:
            file_name = cell(row, "file_name")
            question = cell(row, "QuestionText", empty=EMPTY_QUESTION)
            answer = cell(row, "answer", empty=EMPTY_ANSWER)
        except Bad as bad:
            yield bad.row(path, where)
            continue
        confidence = (row.get("confidence") or "").strip().lower()
        questions.setdefault((file_name, question), []).append((where, answer, confidence))
    numbers: Counter[str] = Counter()
    for (file_name, question), rows in questions.items():
        numbers[file_name] += 1
        references = [answer for _, answer, _ in rows]
        yes_no = all(a.lower() in ("yes", "no") for a in references)
        record = qa_record(
            f"{file_name}#q{numbers[file_name]}",
            task or ("clotho_aqa/yes-no" if yes_no else "clotho_aqa/single"),
            [media_part("audio", root, file_name)],
            question,
            majority_answer(rows),
            references,
        )
        yield Converted(path, rows[0][0], record)


def majority_answer(rows: list[tuple[str, str, str]]) -> str:
    """The most given answer of ``(where, answer, confidence)`` rows (see the module doc)."""
    votes: Counter[str] = Counter(answer.lower() for _, answer, _ in rows)
    sure: Counter[str] = Counter(answer.lower() for _, answer, conf in rows if conf == "yes")
    first: dict[str, str] = {}
    for _, answer, _ in rows:
        first.setdefault(answer.lower(), answer)
    order = list(first)
    best = max(order, key=lambda key: (votes[key], sure[key], -order.index(key)))
    return first[best]
