"""COCO captions JSON -> image-captioning records.

Input: ``captions_train2017.json``-style JSON with ``images`` (``id``, ``file_name``) and
``annotations`` (``id``, ``image_id``, ``caption``). One record per image, in the order of
``images``: the image, the prompt (default ``Describe the image.``, the built-in world's
captioning question) and the image's first caption (in file order) as the answer; all its
captions go into ``references``. ``--per-caption`` writes one record per caption instead (id =
the annotation id), each with all the image's captions as references.

File names are relative to ``--image-root`` (default: the JSON file's directory; for COCO
usually ``train2017/`` or ``val2017/``). Record ids are the image ids; task ``coco/caption``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from data_modules.converters.common import (
    EMPTY_ANSWER,
    INVALID_VALUE,
    UNKNOWN_IMAGE,
    Bad,
    Converted,
    Item,
    caption_records,
    json_list,
    media_part,
    read_json,
    required_text,
    source_id,
)

NAME = "coco_captions"
HELP = "COCO captions JSON (images + annotations); one record per image"
PROMPT = "Describe the image."
TASK = "coco/caption"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image-root",
        type=Path,
        help="directory the images' file_name is relative to (default: the input file's directory)",
    )
    parser.add_argument("--prompt", default=PROMPT, help=f"the question (default: {PROMPT!r})")
    parser.add_argument(
        "--per-caption", action="store_true", help="one record per caption, not per image"
    )


def from_args(args: argparse.Namespace) -> Iterator[Item]:
    return records(args.input, args.image_root, args.prompt, args.per_caption, args.task)


def records(
    path: Path,
    image_root: Path | None = None,
    prompt: str = PROMPT,
    per_caption: bool = False,
    task: str | None = None,
) -> Iterator[Item]:
    """Converts a COCO captions file; bad annotations come first, then the images in order.

    Blank captions are left out; an image without any other caption is bad (``empty answer``).
    """
    data = read_json(path)
    images = json_list(path, data, "images")
    annotations = json_list(path, data, "annotations")
    root = image_root if image_root is not None else path.parent
    known = {
        entry.get("id")
        for entry in images
        if isinstance(entry, dict) and isinstance(entry.get("id"), (int, str))
    }
    captions: dict[object, list[tuple[str, str]]] = {}
    for index, annotation in enumerate(annotations, start=1):
        try:
            image_id, caption_id, caption = _annotation(annotation, known)
        except Bad as bad:
            yield bad.row(path, f"annotation {index}")
            continue
        captions.setdefault(image_id, []).append((caption_id, caption))
    for index, entry in enumerate(images, start=1):
        where = f"image {index}"
        if isinstance(entry, dict) and "id" in entry:
            where += f" (id {entry['id']!r})"
        try:
            for record in _image_records(entry, captions, root, prompt, per_caption, task):
                yield Converted(path, where, record)
        except Bad as bad:
            yield bad.row(path, where)


def _annotation(annotation: object, known: set) -> tuple[object, str, str]:
    if not isinstance(annotation, dict):
        raise Bad(INVALID_VALUE, "an annotation must be a JSON object")
    image_id = annotation.get("image_id")
    source_id(image_id, "image_id")
    if image_id not in known:
        raise Bad(UNKNOWN_IMAGE, f"image_id {image_id!r} is not in 'images'")
    caption_id = source_id(annotation.get("id"), "id")
    caption = annotation.get("caption")
    if not isinstance(caption, str):
        raise Bad(INVALID_VALUE, f"'caption' must be a string, got {caption!r}")
    return image_id, caption_id, caption.strip()


def _image_records(
    entry: object,
    captions: dict[object, list[tuple[str, str]]],
    root: Path,
    prompt: str,
    per_caption: bool,
    task: str | None,
) -> list[dict]:
    if not isinstance(entry, dict):
        raise Bad(INVALID_VALUE, "an image must be a JSON object")
    image_id = source_id(entry.get("id"), "id")
    file_name = required_text(entry.get("file_name"), "file_name", INVALID_VALUE)
    found = [
        (caption_id, caption) for caption_id, caption in captions.get(entry["id"], []) if caption
    ]
    if not found:
        raise Bad(EMPTY_ANSWER, f"image {image_id} has no non-empty caption")
    image = [media_part("image", root, file_name)]
    return caption_records(image_id, task or TASK, image, prompt, found, per_caption)
