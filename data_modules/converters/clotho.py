"""Clotho captions CSV -> audio-captioning records.

Input: ``clotho_captions_development.csv`` (or ``_validation``/``_evaluation``) with columns
``file_name, caption_1, ..., caption_5``. One record per row: the audio, the prompt (default
``Describe the sound.``, the built-in world's audio-captioning question) and ``caption_1`` as
the answer (the first non-empty caption if it is blank); the non-empty captions, in column
order, go into ``references``. ``--per-caption`` writes one record per caption instead (id
``<file_name>#<k>`` for ``caption_k``).

Files are ``file_name`` under ``--audio-root`` (default: the CSV's directory; in the Clotho
archives, the ``development/``, ``validation/`` or ``evaluation/`` folder). Record ids are the
file names; task ``clotho/caption``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from data_modules.converters.common import (
    EMPTY_ANSWER,
    Bad,
    Converted,
    Item,
    caption_records,
    cell,
    media_part,
    read_csv,
)

NAME = "clotho"
HELP = "Clotho captions CSV (file_name, caption_1..caption_5)"
PROMPT = "Describe the sound."
TASK = "clotho/caption"
CAPTIONS = tuple(f"caption_{k}" for k in range(1, 6))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--audio-root", type=Path, help="directory holding the clips (default: the CSV's directory)"
    )
    parser.add_argument("--prompt", default=PROMPT, help=f"the question (default: {PROMPT!r})")
    parser.add_argument(
        "--per-caption", action="store_true", help="one record per caption, not per clip"
    )


def from_args(args: argparse.Namespace) -> Iterator[Item]:
    return records(args.input, args.audio_root, args.prompt, args.per_caption, args.task)


def records(
    path: Path,
    audio_root: Path | None = None,
    prompt: str = PROMPT,
    per_caption: bool = False,
    task: str | None = None,
) -> Iterator[Item]:
    """Converts a Clotho captions CSV; yields items in row order."""
    root = audio_root if audio_root is not None else path.parent
    for where, row in read_csv(path, ("file_name", CAPTIONS[0])):
        try:
            file_name = cell(row, "file_name")
            captions = [
                (k, cell(row, c, empty=None)) for k, c in enumerate(CAPTIONS, 1) if c in row
            ]
            captions = [(k, caption) for k, caption in captions if caption]
            if not captions:
                raise Bad(EMPTY_ANSWER, "every caption is empty")
        except Bad as bad:
            yield bad.row(path, where)
            continue
        audio = [media_part("audio", root, file_name)]
        numbered = [(f"{file_name}#{k}", caption) for k, caption in captions]
        task_name = task or TASK
        for record in caption_records(file_name, task_name, audio, prompt, numbered, per_caption):
            yield Converted(path, where, record)
