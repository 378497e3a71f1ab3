"""LLaVA instruction-tuning JSON -> conversation records.

Input: a JSON list of ``{"id", "image"?, "conversations": [{"from", "value"}, ...]}``, as in
LLaVA's ``llava_instruct_150k.json`` or ``llava_v1_5_mix665k.json``. ``from`` is ``human``,
``gpt`` or ``system``. The ``<image>`` placeholder in a human turn marks where the image goes
(``"<image>\\nWhat is this?"`` -> an image part, then the text); a record with an ``image``
needs exactly one placeholder, a record without one (text-only) none. ``image`` is relative
to ``--image-root`` (default: the JSON file's directory), e.g. ``coco/train2017/x.jpg``.

Record ids are the source ids; tasks are ``llava/image`` and ``llava/text`` (``--task``
replaces both). Records that need more than one image or a video are ``unsupported``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from data_modules.converters.common import (
    EMPTY_ANSWER,
    EMPTY_QUESTION,
    INVALID_VALUE,
    MISSING_FIELD,
    NO_ASSISTANT_TURN,
    PLACEHOLDER_MISMATCH,
    UNKNOWN_ROLE,
    UNSUPPORTED,
    Bad,
    ConversionError,
    Converted,
    Item,
    media_part,
    read_json,
    source_id,
    text,
)

NAME = "llava"
HELP = "LLaVA instruction JSON (id, image, conversations with from=human/gpt)"
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
PLACEHOLDER = "<image>"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image-root",
        type=Path,
        help="directory the 'image' paths are relative to (default: the input file's directory)",
    )


def from_args(args: argparse.Namespace) -> Iterator[Item]:
    return records(args.input, args.image_root, args.task)


def records(path: Path, image_root: Path | None = None, task: str | None = None) -> Iterator[Item]:
    """Converts a LLaVA JSON file; yields one item per input record, in input order."""
    data = read_json(path)
    if not isinstance(data, list):
        raise ConversionError(path, "file", INVALID_VALUE, "expected a JSON list of records")
    root = image_root if image_root is not None else path.parent
    for index, entry in enumerate(data, start=1):
        where = f"record {index}"
        if isinstance(entry, dict) and "id" in entry:
            where += f" (id {entry['id']!r})"
        try:
            yield Converted(path, where, _record(entry, root, task))
        except Bad as bad:
            yield bad.row(path, where)


def _record(entry: object, root: Path, task: str | None) -> dict:
    if not isinstance(entry, dict):
        raise Bad(INVALID_VALUE, "a record must be a JSON object")
    record_id = source_id(entry.get("id"), "id")
    if entry.get("video") is not None:
        raise Bad(UNSUPPORTED, "video records are not supported")
    image = _image_name(entry.get("image"))
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise Bad(MISSING_FIELD, "'conversations' must be a non-empty list")
    messages, placeholders = [], 0
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise Bad(INVALID_VALUE, f"turn {number} is not an object")
        speaker = turn.get("from")
        role = ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise Bad(
                UNKNOWN_ROLE, f"turn {number}: 'from' is {speaker!r}, not one of {list(ROLES)}"
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise Bad(MISSING_FIELD, f"turn {number} has no string 'value'")
        count = value.count(PLACEHOLDER)
        if count and role != "user":
            raise Bad(PLACEHOLDER_MISMATCH, f"turn {number} ({speaker}) holds {PLACEHOLDER!r}")
        placeholders += count
        content = _user_content(value, root, image) if role == "user" else _plain(value)
        if not content:
            if role == "system":
                continue
            reason = EMPTY_QUESTION if role == "user" else EMPTY_ANSWER
            raise Bad(reason, f"turn {number} ({speaker}) is empty")
        messages.append({"role": role, "content": content})
    if image is not None and placeholders != 1:
        raise Bad(
            PLACEHOLDER_MISMATCH,
            f"the record has an image and {placeholders} {PLACEHOLDER!r} placeholders; "
            "exactly one is needed",
        )
    if image is None and placeholders:
        raise Bad(PLACEHOLDER_MISMATCH, f"{placeholders} {PLACEHOLDER!r} placeholder(s), no image")
    if not any(m["role"] == "assistant" for m in messages):
        raise Bad(NO_ASSISTANT_TURN, "no gpt turn")
    default_task = "llava/image" if image is not None else "llava/text"
    return {"id": record_id, "task": task or default_task, "messages": messages}


def _image_name(value: object) -> str | None:
    if isinstance(value, list):
        if len(value) > 1:
            raise Bad(UNSUPPORTED, f"{len(value)} images; one per record is supported")
        value = value[0] if value else None
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise Bad(INVALID_VALUE, f"'image' must be a non-empty path, got {value!r}")
    return value.strip()


def _plain(value: str) -> list[dict]:
    value = value.strip()
    return [text(value)] if value else []


def _user_content(value: str, root: Path, image: str | None) -> list[dict]:
    """Text pieces around each placeholder, stripped, with the image part in its place."""
    content: list[dict] = []
    for index, piece in enumerate(value.split(PLACEHOLDER)):
        if index and image is not None:
            content.append(media_part("image", root, image))
        content += _plain(piece)
    return content
