"""Any CSV with a header -> one-turn records, through a column mapping.

``--column KEY=COLUMN`` (repeatable, or comma-separated: ``--column question=q,answer=a``) maps
the record's fields to the CSV's columns. Keys:

- ``answer`` (required): the assistant's answer.
- ``question``: the user's text; a blank cell (or no ``question`` column) takes ``--prompt``,
  and with neither the row is bad (``empty question``).
- ``image``, ``audio``: media paths, relative to ``--image-root`` / ``--audio-root`` (default:
  the CSV's directory); a blank cell means no such medium in that row.
- ``id``: the record id; without it the id is ``<csv stem>-<n>`` for the n-th data row.
- ``task``: the record's task; without it ``--task`` (default ``csv``).
- ``references``: extra acceptable answers, separated by ``--references-sep`` (default
  ``|``); the answer is put first when it is not among them.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
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

NAME = "csv"
HELP = "generic CSV with a column mapping (--column answer=COL,question=COL,...)"
KEYS = ("id", "question", "answer", "image", "audio", "task", "references")
TASK = "csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="KEY=COLUMN",
        help=f"map a record field to a CSV column; keys: {', '.join(KEYS)} (answer is required)",
    )
    parser.add_argument("--prompt", help="the question when there is no question cell")
    parser.add_argument("--image-root", type=Path, help="default: the CSV's directory")
    parser.add_argument("--audio-root", type=Path, help="default: the CSV's directory")
    parser.add_argument("--delimiter", default=",", help="the CSV's field separator")
    parser.add_argument(
        "--references-sep", default="|", help="separator inside the references cell"
    )


def from_args(args: argparse.Namespace) -> Iterator[Item]:
    try:
        columns = parse_columns(args.column)
    except ValueError as err:
        raise SystemExit(f"mmfuse-convert csv: error: {err}") from err
    return records(
        args.input,
        columns,
        prompt=args.prompt,
        image_root=args.image_root,
        audio_root=args.audio_root,
        delimiter=args.delimiter,
        references_sep=args.references_sep,
        task=args.task,
    )


def parse_columns(specs: Sequence[str]) -> dict[str, str]:
    """``["question=q,answer=a", "image=img"]`` -> ``{"question": "q", "answer": "a", ...}``.

    Raises:
        ValueError: a malformed item, an unknown or repeated key, or no ``answer``.
    """
    columns: dict[str, str] = {}
    for spec in specs:
        for item in spec.split(","):
            key, sep, column = item.partition("=")
            key, column = key.strip(), column.strip()
            if not sep or not column:
                raise ValueError(f"--column {item!r}: expected KEY=COLUMN")
            if key not in KEYS:
                raise ValueError(f"--column {item!r}: unknown key {key!r}; keys: {KEYS}")
            if key in columns:
                raise ValueError(f"--column: {key!r} is mapped twice")
            columns[key] = column
    if "answer" not in columns:
        raise ValueError("--column answer=COLUMN is required")
    return columns


def records(
    path: Path,
    columns: dict[str, str],
    prompt: str | None = None,
    image_root: Path | None = None,
    audio_root: Path | None = None,
    delimiter: str = ",",
    references_sep: str = "|",
    task: str | None = None,
) -> Iterator[Item]:
    """Converts a CSV through ``columns`` (see ``parse_columns``); yields items in row order."""
    roots = {
        "image": image_root if image_root is not None else path.parent,
        "audio": audio_root if audio_root is not None else path.parent,
    }
    for number, (where, row) in enumerate(read_csv(path, list(columns.values()), delimiter), 1):
        try:
            record = _record(path, number, row, columns, prompt, roots, references_sep, task)
        except Bad as bad:
            yield bad.row(path, where)
            continue
        yield Converted(path, where, record)


def _record(
    path: Path,
    number: int,
    row: dict[str, str | None],
    columns: dict[str, str],
    prompt: str | None,
    roots: dict[str, Path],
    references_sep: str,
    task: str | None,
) -> dict:
    answer = cell(row, columns["answer"], empty=EMPTY_ANSWER)
    question = cell(row, columns["question"], empty=None) if "question" in columns else ""
    question = question or (prompt or "").strip()
    if not question:
        raise Bad(EMPTY_QUESTION, "no question cell and no --prompt")
    record_id = cell(row, columns["id"]) if "id" in columns else f"{path.stem}-{number}"
    media = []
    for kind in ("image", "audio"):
        name = cell(row, columns[kind], empty=None) if kind in columns else ""
        if name:
            media.append(media_part(kind, roots[kind], name))
    row_task = cell(row, columns["task"], empty=None) if "task" in columns else ""
    references = None
    if "references" in columns:
        given = cell(row, columns["references"], empty=None).split(references_sep)
        references = [r.strip() for r in given if r.strip()]
        if answer not in references:
            references.insert(0, answer)
    return qa_record(record_id, row_task or task or TASK, media, question, answer, references)
