"""``mmfuse-convert FORMAT INPUT OUTPUT_JSONL [options]``: public data formats -> conversation
JSONL (the schema in DESIGN.md), with no user code.

Formats: ``llava``, ``coco_captions``, ``vqav2``, ``audiocaps``, ``clotho``, ``clotho_aqa``,
``asr`` and ``csv``; ``mmfuse-convert FORMAT --help`` describes each one and its options.

- Media paths in the output are relative to the output file's directory. Media are not copied
  unless ``--copy-media DIR`` (their layout below the media root is kept); each must exist
  unless ``--no-check-media``.
- Input files are only read. The output is written to a temporary file beside it, then renamed.
- A bad row (missing field, empty answer, unknown role, ``<image>`` placeholder mismatch,
  duplicate id, missing media, ...) is an error naming the input file, the row and the reason;
  with ``--on-bad skip`` it is skipped and counted by reason.
- Records where a source holds several acceptable answers (captions, VQA answers) carry them
  in an optional top-level ``"references"`` list, the answer included.
- One summary line ends the run: records written, rows skipped by reason.

Example:
    mmfuse-convert coco_captions captions_val2017.json data/coco_val.jsonl \\
        --image-root coco/val2017 --on-bad skip
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_modules.converters import (
    asr,
    audiocaps,
    clotho,
    clotho_aqa,
    coco_captions,
    generic_csv,
    llava,
    vqav2,
)
from data_modules.converters.common import (
    DUPLICATE_ID,
    INVALID_VALUE,
    MISSING_MEDIA,
    Bad,
    ConversionError,
    Converted,
    Item,
    Media,
)

FORMATS = (llava, coco_captions, vqav2, audiocaps, clotho, clotho_aqa, asr, generic_csv)
ON_BAD = ("error", "skip")


@dataclass
class Summary:
    """What a conversion did."""

    output: Path
    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    copied: int = 0

    def line(self) -> str:
        """One line: records written, rows skipped by reason, media copied."""
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
        skipped = f"skipped {sum(self.skipped.values())}" + (f" ({reasons})" if reasons else "")
        noun = "record" if self.written == 1 else "records"
        text = f"wrote {self.written} {noun} to {self.output}; {skipped}"
        return text + (f"; copied {self.copied} media files" if self.copied else "")


def convert(
    items: Iterable[Item],
    output: str | Path,
    on_bad: str = "error",
    copy_media: str | Path | None = None,
    check_media: bool = True,
) -> Summary:
    """Writes converted records to ``output`` (JSONL) atomically.

    Args:
        items: a converter's ``Converted`` / ``BadRow`` items.
        output: the JSONL file; media paths in it are made relative to its directory.
        on_bad: ``error`` raises on the first bad row; ``skip`` counts it and goes on.
        copy_media: copy each media file under this directory (keeping its path below the
            media root) and point the records at the copies.
        check_media: a record whose media file does not exist is a bad row.

    Raises:
        ConversionError: naming the input file, the row and the reason.
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
    summary = Summary(Path(output))
    output = Path(os.path.abspath(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    copy_dir = Path(os.path.abspath(copy_media)) if copy_media is not None else None
    seen: dict[str, str] = {}  # record id -> where it came from
    copies: dict[Path, Path] = {}  # copy -> original
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            for item in items:
                if isinstance(item, Converted):
                    try:
                        record = _finish(item, output.parent, seen, copy_dir, copies, check_media)
                    except Bad as bad:
                        item = bad.row(item.source, item.where)
                    else:
                        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                        summary.written += 1
                        continue
                if on_bad == "error":
                    raise item.error()
                summary.skipped[item.reason] += 1
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    summary.copied = len(copies)
    return summary


def _finish(
    item: Converted,
    out_dir: Path,
    seen: dict[str, str],
    copy_dir: Path | None,
    copies: dict[Path, Path],
    check_media: bool,
) -> dict:
    """The record with media paths relative to ``out_dir`` (copying media if asked)."""
    record_id = item.record["id"]
    if record_id in seen:
        raise Bad(DUPLICATE_ID, f"id {record_id!r} was already written ({seen[record_id]})")
    pending: list[tuple[Path, Path]] = []
    messages = []
    for message in item.record["messages"]:
        content = []
        for part in message["content"]:
            media = part.get("path")
            if isinstance(media, Media):
                target = _media_target(media, copy_dir, copies, pending, check_media)
                part = {**part, "path": Path(os.path.relpath(target, out_dir)).as_posix()}
            content.append(part)
        messages.append({**message, "content": content})
    for original, copy in pending:
        if copies.get(copy) != original:  # first use in this run
            _copy(original, copy)
            copies[copy] = original
    seen[record_id] = f"{item.source}: {item.where}"
    return {**item.record, "messages": messages}


def _media_target(
    media: Media,
    copy_dir: Path | None,
    copies: dict[Path, Path],
    pending: list[tuple[Path, Path]],
    check_media: bool,
) -> Path:
    original = media.file
    if (check_media or copy_dir is not None) and not original.is_file():
        raise Bad(MISSING_MEDIA, f"{media.name!r} not found at {original}")
    if copy_dir is None:
        return original
    copy = copy_dir / media.copy_name
    if copies.get(copy, original) != original:
        raise Bad(INVALID_VALUE, f"--copy-media: {copies[copy]} and {original} both map to {copy}")
    pending.append((original, copy))
    return copy


def _copy(original: Path, copy: Path) -> None:
    """Copies unless an up-to-date copy (same size, not older) is already there."""
    if copy.is_file():
        old, new = original.stat(), copy.stat()
        if old.st_size == new.st_size and new.st_mtime >= old.st_mtime:
            return
    copy.parent.mkdir(parents=True, exist_ok=True)
    partial = copy.with_name(f".{copy.name}.{os.getpid()}.tmp")
    shutil.copy2(original, partial)
    os.replace(partial, copy)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmfuse-convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for module in FORMATS:
        sub = formats.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("input", type=Path, metavar="INPUT")
        sub.add_argument("output", type=Path, metavar="OUTPUT_JSONL")
        module.add_arguments(sub)
        common = sub.add_argument_group("common options")
        common.add_argument(
            "--on-bad",
            choices=ON_BAD,
            default="error",
            help="stop at the first bad row (default) or skip bad rows and count them",
        )
        common.add_argument(
            "--copy-media", type=Path, metavar="DIR", help="copy the media files under DIR"
        )
        common.add_argument(
            "--no-check-media",
            dest="check_media",
            action="store_false",
            help="do not require media files to exist",
        )
        common.add_argument("--task", help="the task of every record (default: per format)")
        sub.set_defaults(records=module.from_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mmfuse-convert`` entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    output = Path(os.path.abspath(args.output))
    inputs = [args.input, getattr(args, "annotations", None)]
    if any(p is not None and Path(os.path.abspath(p)) == output for p in inputs):
        print(f"mmfuse-convert: error: the output {args.output} is an input", file=sys.stderr)
        return 2
    try:
        items = args.records(args)
        summary = convert(items, args.output, args.on_bad, args.copy_media, args.check_media)
    except (ConversionError, OSError) as err:
        print(f"mmfuse-convert: error: {err}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
