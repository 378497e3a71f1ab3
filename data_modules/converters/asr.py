"""NeMo-style ASR manifest (JSONL) -> transcription records.

Input: one JSON object per line with ``audio_filepath``, ``text`` and ``duration`` (seconds).
One record per line: the audio, the prompt (default ``Transcribe the audio.``) and ``text`` as
the answer. Relative ``audio_filepath`` values are resolved against ``--audio-root``
(default: the manifest's directory, as NeMo does); absolute ones are used as they are.

The id is the manifest's ``id`` (or ``utt_id``) when present, else ``audio_filepath`` as
written; task ``asr/transcribe``. Lines with a non-zero ``offset`` (a segment of a longer
file) are ``unsupported``: records point at whole files. The processor crops audio to
``processor.audio.max_seconds`` (10 s in the default config) while the transcript stays
whole, so ``--max-duration`` drops longer utterances (reason ``too long``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from data_modules.converters.common import (
    EMPTY_ANSWER,
    INVALID_VALUE,
    UNSUPPORTED,
    Bad,
    BadRow,
    ConversionError,
    Converted,
    Item,
    media_part,
    qa_record,
    required_text,
    source_id,
)

NAME = "asr"
HELP = "NeMo-style ASR manifest JSONL (audio_filepath, text, duration)"
PROMPT = "Transcribe the audio."
TASK = "asr/transcribe"
TOO_LONG = "too long"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--audio-root",
        type=Path,
        help="directory relative audio_filepath values are resolved against "
        "(default: the manifest's directory)",
    )
    parser.add_argument("--prompt", default=PROMPT, help=f"the question (default: {PROMPT!r})")
    parser.add_argument(
        "--max-duration", type=float, help="drop utterances longer than this many seconds"
    )


def from_args(args: argparse.Namespace) -> Iterator[Item]:
    return records(args.input, args.audio_root, args.prompt, args.max_duration, args.task)


def records(
    path: Path,
    audio_root: Path | None = None,
    prompt: str = PROMPT,
    max_duration: float | None = None,
    task: str | None = None,
) -> Iterator[Item]:
    """Converts a manifest; yields one item per non-blank line, in order."""
    if not path.is_file():
        raise ConversionError(path, "file", "not found")
    root = audio_root if audio_root is not None else path.parent
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                yield BadRow(path, where, INVALID_VALUE, f"invalid JSON: {err.msg}")
                continue
            try:
                record = _record(entry, root, prompt, max_duration, task)
            except Bad as bad:
                yield bad.row(path, where)
                continue
            yield Converted(path, where, record)


def _record(
    entry: object, root: Path, prompt: str, max_duration: float | None, task: str | None
) -> dict:
    if not isinstance(entry, dict):
        raise Bad(INVALID_VALUE, "a line must be a JSON object")
    audio = required_text(entry.get("audio_filepath"), "audio_filepath", INVALID_VALUE)
    transcript = required_text(entry.get("text"), "text", EMPTY_ANSWER)
    offset = entry.get("offset") or 0
    if offset:
        raise Bad(UNSUPPORTED, f"offset {offset!r}: records point at whole files")
    duration = entry.get("duration")
    if max_duration is not None and duration is not None:
        if not isinstance(duration, (int, float)) or isinstance(duration, bool):
            raise Bad(INVALID_VALUE, f"'duration' must be a number, got {duration!r}")
        if duration > max_duration:
            raise Bad(TOO_LONG, f"duration {duration} s > --max-duration {max_duration} s")
    key = next((k for k in ("id", "utt_id") if entry.get(k) is not None), None)
    record_id = source_id(entry[key], key) if key else audio
    return qa_record(
        record_id, task or TASK, [media_part("audio", root, audio)], prompt, transcript
    )
