"""Building blocks the format converters share: rows, bad rows, media references, readers.

A converter reads its input and yields, in input order, one ``Converted`` per good record or
one ``BadRow`` per input row it cannot use. It does not decide what happens to bad rows and
does not know where the output goes: ``data_modules.convert.convert`` does both. Media parts
of a converted record hold a ``Media`` (where the file is on disk) instead of a path string;
the writer turns it into a path relative to the output file.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Reasons a row is bad; ``--on-bad skip`` counts skipped rows by these keys.
MISSING_FIELD = "missing field"
EMPTY_QUESTION = "empty question"
EMPTY_ANSWER = "empty answer"
UNKNOWN_ROLE = "unknown role"
PLACEHOLDER_MISMATCH = "image placeholder mismatch"
NO_ASSISTANT_TURN = "no assistant turn"
UNKNOWN_IMAGE = "unknown image"
INVALID_VALUE = "invalid value"
UNSUPPORTED = "unsupported"
DUPLICATE_ID = "duplicate id"
MISSING_MEDIA = "missing media"


class ConversionError(ValueError):
    """An input that cannot be converted; the message names the file, the row and why."""

    def __init__(self, source: str | Path, where: str, reason: str, detail: str = "") -> None:
        text = f"{source}: {where}: {reason}" + (f": {detail}" if detail else "")
        super().__init__(text)
        self.source, self.where, self.reason, self.detail = str(source), where, reason, detail


@dataclass(frozen=True)
class Media:
    """A media file named by an input: ``name`` as the input spells it, under ``root``.

    Attributes:
        root: directory relative names are resolved against.
        name: the path as written in the input (relative to ``root``, or absolute).
    """

    root: Path
    name: str

    @property
    def file(self) -> Path:
        """The file's absolute path (``root`` is ignored for an absolute ``name``)."""
        return Path(os.path.abspath(self.root / self.name))

    @property
    def copy_name(self) -> str:
        """Where the file goes under a ``--copy-media`` directory: its path below ``root``,
        or its base name when it is not below ``root``."""
        root = Path(os.path.abspath(self.root))
        try:
            return self.file.relative_to(root).as_posix()
        except ValueError:
            return self.file.name


@dataclass(frozen=True)
class Converted:
    """A good record and where it came from (``where`` names the row, e.g. ``line 7``)."""

    source: Path
    where: str
    record: dict


@dataclass(frozen=True)
class BadRow:
    """An input row that cannot be converted, and why (``reason`` is one of the keys above)."""

    source: Path
    where: str
    reason: str
    detail: str = ""

    def error(self) -> ConversionError:
        return ConversionError(self.source, self.where, self.reason, self.detail)


Item = Converted | BadRow


class Bad(Exception):
    """Raised inside a converter's per-row code; the converter turns it into a ``BadRow``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def row(self, source: Path, where: str) -> BadRow:
        return BadRow(source, where, self.reason, self.detail)


# ----------------------------------------------------------------------------- records


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def media_part(kind: str, root: Path, name: str) -> dict:
    """An ``image`` or ``audio`` part pointing at ``name`` under ``root``."""
    return {"type": kind, "path": Media(root, name)}


def qa_record(
    record_id: str,
    task: str,
    media: Sequence[dict],
    question: str,
    answer: str,
    references: Sequence[str] | None = None,
) -> dict:
    """A one-turn record: user = media parts then the question, assistant = the answer.

    ``references`` (all acceptable answers, the answer included) become the record's
    optional top-level ``"references"`` field.
    """
    record: dict = {
        "id": record_id,
        "task": task,
        "messages": [
            {"role": "user", "content": [*media, text(question)]},
            {"role": "assistant", "content": [text(answer)]},
        ],
    }
    if references is not None:
        record["references"] = list(references)
    return record


def caption_records(
    item_id: str,
    task: str,
    media: Sequence[dict],
    prompt: str,
    captions: Sequence[tuple[str, str]],
    per_caption: bool,
) -> list[dict]:
    """The records of one captioned item: one answered by its first caption, or with
    ``per_caption`` one per ``(caption id, caption)``; every record lists all the captions
    as its references."""
    references = [caption for _, caption in captions]
    if not per_caption:
        return [qa_record(item_id, task, media, prompt, references[0], references)]
    return [
        qa_record(caption_id, task, media, prompt, caption, references)
        for caption_id, caption in captions
    ]


def required_text(value: object, field: str, empty_reason: str = EMPTY_ANSWER) -> str:
    """``value`` stripped; ``Bad`` when it is missing, not a string or empty."""
    if value is None:
        raise Bad(MISSING_FIELD, f"no {field!r}")
    if not isinstance(value, str):
        raise Bad(INVALID_VALUE, f"{field!r} must be a string, got {value!r}")
    value = value.strip()
    if not value:
        raise Bad(empty_reason, f"{field!r} is empty")
    return value


def source_id(value: object, field: str) -> str:
    """A source id (string or integer) as a record id string."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Bad(MISSING_FIELD, f"no {field!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Bad(INVALID_VALUE, f"{field!r} must be a string or an integer, got {value!r}")
    return str(value).strip()


def fill_pattern(pattern: str, fields: dict, option: str) -> str:
    """``pattern.format(**fields)``; a bad pattern is a ``Bad`` naming ``option``."""
    try:
        return pattern.format(**fields)
    except KeyError as err:
        raise Bad(MISSING_FIELD, f"{option} {pattern!r} uses {err}, which the row lacks") from err
    except (ValueError, IndexError) as err:
        raise Bad(INVALID_VALUE, f"{option} {pattern!r}: {err}") from err


# ----------------------------------------------------------------------------- readers


def read_json(path: Path) -> object:
    """A whole JSON file; an unreadable file is a ``ConversionError`` naming it."""
    if not path.is_file():
        raise ConversionError(path, "file", "not found")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise ConversionError(path, f"line {err.lineno}", "invalid JSON", err.msg) from err


def json_list(path: Path, data: object, key: str) -> list:
    """``data[key]`` when it is a list, else a ``ConversionError`` naming the file."""
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, list):
        raise ConversionError(path, "file", MISSING_FIELD, f"expected a top-level {key!r} list")
    return value


def read_csv(
    path: Path, required: Sequence[str], delimiter: str = ","
) -> Iterator[tuple[str, dict[str, str | None]]]:
    """Yields ``("line N", row)`` for each data row of a CSV file with a header.

    A header without a required column is a ``ConversionError`` whatever ``--on-bad`` says
    (every row would be bad). A row shorter than the header has ``None`` in the missing
    cells. ``N`` is the line the row ends on (quoted cells may span lines).
    """
    if not path.is_file():
        raise ConversionError(path, "file", "not found")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [name for name in required if name not in header]
        if missing:
            raise ConversionError(
                path,
                "header",
                "missing required column",
                f"{', '.join(map(repr, missing))} not in {header}",
            )
        for row in reader:
            yield f"line {reader.line_num}", row


def cell(row: dict[str, str | None], column: str, empty: str | None = MISSING_FIELD) -> str:
    """The stripped value of ``column``.

    Raises:
        Bad: ``missing field`` when the row has no cell there; ``empty`` (a reason) when the
            cell is blank, unless ``empty`` is None.
    """
    value = row.get(column)
    if value is None:
        raise Bad(MISSING_FIELD, f"no value in column {column!r}")
    value = value.strip()
    if not value and empty is not None:
        raise Bad(empty, f"column {column!r} is empty")
    return value
