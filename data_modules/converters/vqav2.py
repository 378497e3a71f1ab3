"""VQAv2 questions + annotations JSON -> visual question answering records.

Inputs: the questions file (``v2_OpenEnded_mscoco_val2014_questions.json``: ``questions`` with
``question_id``, ``image_id``, ``question``, and ``data_subtype`` such as ``val2014``) as
``INPUT`` and the annotations file (``v2_mscoco_val2014_annotations.json``: ``annotations``
with ``question_id``, ``multiple_choice_answer``, ``answers`` (ten ``{"answer"}``) and
``answer_type``) as ``--annotations``. One record per question, in question order: the image,
the question, ``multiple_choice_answer`` as the answer and the ten human answers (repeats
kept, as VQA accuracy counts them) as ``references``.

Image files are ``--image-pattern`` (default ``COCO_{data_subtype}_{image_id:012d}.jpg``, the
2014 COCO names; use ``{image_id:012d}.jpg`` for 2017 names) under ``--image-root`` (default:
the questions file's directory). Record ids are the question ids; the task is
``vqav2/<answer_type>`` (``vqav2/yes-no``, ``vqav2/number``, ``vqav2/other``), so evaluation
reports the usual per-type breakdown.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from data_modules.converters.common import (
    DUPLICATE_ID,
    EMPTY_QUESTION,
    INVALID_VALUE,
    MISSING_FIELD,
    Bad,
    BadRow,
    Converted,
    Item,
    fill_pattern,
    json_list,
    media_part,
    qa_record,
    read_json,
    required_text,
    source_id,
)

NAME = "vqav2"
HELP = "VQAv2 questions JSON (INPUT) + annotations JSON (--annotations)"
IMAGE_PATTERN = "COCO_{data_subtype}_{image_id:012d}.jpg"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--annotations", type=Path, required=True, help="the VQAv2 annotations JSON file"
    )
    parser.add_argument(
        "--image-root",
        type=Path,
        help="directory holding the COCO images (default: the questions file's directory)",
    )
    parser.add_argument(
        "--image-pattern",
        default=IMAGE_PATTERN,
        help=f"image file name from the question's fields (default: {IMAGE_PATTERN!r})",
    )


def from_args(args: argparse.Namespace) -> Iterator[Item]:
    return records(args.input, args.annotations, args.image_root, args.image_pattern, args.task)


def records(
    questions_path: Path,
    annotations_path: Path,
    image_root: Path | None = None,
    image_pattern: str = IMAGE_PATTERN,
    task: str | None = None,
) -> Iterator[Item]:
    """Converts a VQAv2 split; bad annotations come first, then the questions in order."""
    questions_data = read_json(questions_path)
    questions = json_list(questions_path, questions_data, "questions")
    annotations = json_list(annotations_path, read_json(annotations_path), "annotations")
    subtype = questions_data.get("data_subtype")
    root = image_root if image_root is not None else questions_path.parent
    by_question: dict[str, dict] = {}
    for index, annotation in enumerate(annotations, start=1):
        where = f"annotation {index}"
        try:
            if not isinstance(annotation, dict):
                raise Bad(INVALID_VALUE, "an annotation must be a JSON object")
            question_id = source_id(annotation.get("question_id"), "question_id")
            if question_id in by_question:
                raise Bad(DUPLICATE_ID, f"a second annotation for question_id {question_id}")
        except Bad as bad:
            yield bad.row(annotations_path, where)
            continue
        by_question[question_id] = annotation
    for index, question in enumerate(questions, start=1):
        where = f"question {index}"
        if isinstance(question, dict) and "question_id" in question:
            where += f" (question_id {question['question_id']!r})"
        try:
            record = _record(question, by_question, subtype, root, image_pattern, task)
        except _BadAnnotation as bad:  # before Bad: it is one
            yield BadRow(annotations_path, bad.where, bad.reason, bad.detail)
            continue
        except Bad as bad:
            yield bad.row(questions_path, where)
            continue
        yield Converted(questions_path, where, record)


class _BadAnnotation(Bad):
    """A bad annotation met while converting its question: reported against the annotations."""

    def __init__(self, where: str, bad: Bad) -> None:
        super().__init__(bad.reason, bad.detail)
        self.where = where


def _record(
    question: object,
    by_question: dict[str, dict],
    subtype: object,
    root: Path,
    image_pattern: str,
    task: str | None,
) -> dict:
    if not isinstance(question, dict):
        raise Bad(INVALID_VALUE, "a question must be a JSON object")
    question_id = source_id(question.get("question_id"), "question_id")
    image_id = question.get("image_id")
    source_id(image_id, "image_id")
    text = required_text(question.get("question"), "question", EMPTY_QUESTION)
    annotation = by_question.get(question_id)
    if annotation is None:
        raise Bad(MISSING_FIELD, f"no annotation for question_id {question_id}")
    try:
        answer, references, answer_type = _answers(annotation)
    except Bad as bad:
        raise _BadAnnotation(f"annotation for question_id {question_id}", bad) from bad
    fields = {**question, "data_subtype": subtype} if subtype is not None else dict(question)
    image = fill_pattern(image_pattern, fields, "--image-pattern")
    default_task = f"vqav2/{answer_type.replace('/', '-')}" if answer_type else "vqav2"
    return qa_record(
        question_id,
        task or default_task,
        [media_part("image", root, image)],
        text,
        answer,
        references,
    )


def _answers(annotation: dict) -> tuple[str, list[str], str]:
    answer = required_text(annotation.get("multiple_choice_answer"), "multiple_choice_answer")
    answers = annotation.get("answers")
    if not isinstance(answers, list):
        raise Bad(MISSING_FIELD, "no 'answers' list")
    references = []
    for entry in answers:
        if not isinstance(entry, dict) or not isinstance(entry.get("answer"), str):
            raise Bad(INVALID_VALUE, f"an answer must be an object with an 'answer': {entry!r}")
        if entry["answer"].strip():
            references.append(entry["answer"].strip())
    answer_type = annotation.get("answer_type")
    return answer, references, answer_type if isinstance(answer_type, str) else ""
