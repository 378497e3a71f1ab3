"""AudioCaps CSV -> audio-captioning records.

Input: ``train.csv``/``val.csv``/``test.csv`` with columns ``audiocap_id, youtube_id,
start_time, caption``. A clip (``youtube_id`` + ``start_time``) has one caption in the train
split and five in val and test. By default one record per clip, in order of first appearance:
the audio, the prompt (default ``Describe the sound.``, the built-in world's audio-captioning
question) and the clip's first caption as the answer; all the clip's captions go into
``references``; the id is the clip's first ``audiocap_id``. ``--per-caption`` writes one
record per row instead (id = its ``audiocap_id``, references = all the clip's captions).

AudioCaps ships no audio: each downloader names the clips its own way, so the file name is a
pattern over the row's columns, ``--audio-pattern``, under ``--audio-root`` (default: the
CSV's directory). The default, ``{youtube_id}_{start_time}.wav``, is the naming of
aac-datasets (which stores FLAC: pass ``{youtube_id}_{start_time}.flac`` for its
``audio/<split>/`` folders); scripts that save one file per caption row use
``{audiocap_id}.wav``. Task ``audiocaps/caption``.
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
    cell,
    fill_pattern,
    media_part,
    qa_record,
    read_csv,
)

NAME = "audiocaps"
HELP = "AudioCaps CSV (audiocap_id, youtube_id, start_time, caption)"
PROMPT = "Describe the sound."
AUDIO_PATTERN = "{youtube_id}_{start_time}.wav"
TASK = "audiocaps/caption"
COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--audio-root", type=Path, help="directory holding the clips (default: the CSV's directory)"
    )
    parser.add_argument(
        "--audio-pattern",
        default=AUDIO_PATTERN,
        help=f"clip file name from the row's columns (default: {AUDIO_PATTERN!r})",
    )
    parser.add_argument("--prompt", default=PROMPT, help=f"the question (default: {PROMPT!r})")
    parser.add_argument(
        "--per-caption", action="store_true", help="one record per CSV row, not per clip"
    )


def from_args(args: argparse.Namespace) -> Iterator[Item]:
    return records(
        args.input, args.audio_root, args.audio_pattern, args.prompt, args.per_caption, args.task
    )


def records(
    path: Path,
    audio_root: Path | None = None,
    audio_pattern: str = AUDIO_PATTERN,
    prompt: str = PROMPT,
    per_caption: bool = False,
    task: str | None = None,
) -> Iterator[Item]:
    """Converts an AudioCaps CSV; bad rows come first, then the records in clip order."""
    root = audio_root if audio_root is not None else path.parent
    clips: dict[tuple[str, str], list[tuple[str, str, str]]] = {}  # -> (where, id, caption)
    files: dict[tuple[str, str], str] = {}
    for where, row in read_csv(path, COLUMNS):
        try:
            clip = cell(row, "youtube_id"), cell(row, "start_time")
            caption_id = cell(row, "audiocap_id")
            caption = cell(row, "caption", empty=EMPTY_ANSWER)
            name = fill_pattern(
                audio_pattern,
                {k: (v or "").strip() for k, v in row.items() if k is not None},
                "--audio-pattern",
            )
        except Bad as bad:
            yield bad.row(path, where)
            continue
        clips.setdefault(clip, []).append((where, caption_id, caption))
        files.setdefault(clip, name)
    for clip, rows in clips.items():
        references = [caption for _, _, caption in rows]
        audio = [media_part("audio", root, files[clip])]
        chosen = rows if per_caption else rows[:1]
        for where, caption_id, caption in chosen:
            record = qa_record(caption_id, task or TASK, audio, prompt, caption, references)
            yield Converted(path, where, record)
