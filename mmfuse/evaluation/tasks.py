"""Task configs (``conf/eval/task/<name>.yaml``) and the records they evaluate.

A task names its data (a conversation JSONL, or a converter input turned into one on the fly
with ``data_modules.convert`` and kept in the cache directory), an optional prompt template
that replaces the question, generation settings, post-processing steps and metrics. The YAML
is merged onto :class:`TaskConfig`, so an unknown key is an error that names it.

Records may carry a top-level ``"references"`` list (every acceptable answer); without it the
last assistant turn is the only reference. Multiple-choice records carry ``"choices"`` (the
option texts) and ``"answer_index"`` (0-based index of the right one).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_modules.conversation import read_jsonl
from mmfuse.config import CONFIG_DIR

TASK_DIR = Path(CONFIG_DIR) / "eval" / "task"
LETTERS = string.ascii_uppercase


@dataclass
class ConvertSource:
    """A converter input, converted with ``mmfuse-convert FORMAT INPUT OUT [--key value...]``.

    Attributes:
        format: the converter (``vqav2``, ``coco_captions``, ``audiocaps``, ``clotho``,
            ``clotho_aqa``, ``asr``, ``llava``, ``csv``).
        input: the input file.
        args: the format's options, ``{annotations: x, image_root: y}`` for
            ``--annotations x --image-root y``; ``true`` for a bare flag.
        on_bad: ``error`` or ``skip`` bad rows.
        check_media: require every media file to exist.
    """

    format: str = MISSING
    input: str = MISSING
    args: dict[str, Any] = field(default_factory=dict)
    on_bad: str = "error"
    check_media: bool = True


@dataclass
class DataConfig:
    """Where a task's records come from: ``path`` (conversation JSONL) or ``convert``.

    Attributes:
        path: a conversation JSONL; media paths are relative to it.
        convert: a converter input, converted into the cache directory on first use.
        limit: evaluate only the first ``limit`` records.
    """

    path: str | None = None
    convert: ConvertSource | None = None
    limit: int | None = None


@dataclass
class ChoiceConfig:
    """How multiple-choice options are scored by log-likelihood.

    Attributes:
        target: the assistant answer whose tokens are scored: the option ``text`` or its
            ``letter``.
        length_normalize: divide each option's summed log-probability by its token count.
        include_end_token: also count the end-of-turn token(s) after the option.
        format: how each option is written into ``{choices}`` of the prompt.
    """

    target: str = "text"
    length_normalize: bool = False
    include_end_token: bool = False
    format: str = "{letter}. {text}"


@dataclass
class TaskConfig:
    """One benchmark task.

    Attributes:
        name: the task's name in tables and logged keys (``val/<name>/<metric>``).
        data: its records.
        prompt: replaces the text of the last user turn; ``{question}`` is that text and
            ``{choices}`` the options of a multiple-choice record, one per line. None keeps
            the record's question.
        generation: ``GenerationConfig`` fields over the run's defaults.
        postprocess: steps applied to a generated answer before scoring (see
            ``scoring.POSTPROCESS``).
        metrics: metric names (see ``scoring.METRICS``), or ``{_target_: fn}`` for
            ``fn(rows) -> {name: value}``.
        choices: multiple-choice log-likelihood settings.
    """

    name: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    prompt: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    postprocess: list[str] = field(default_factory=lambda: ["strip"])
    metrics: list[Any] = field(default_factory=lambda: ["exact_match"])
    choices: ChoiceConfig = field(default_factory=ChoiceConfig)


def builtin_tasks() -> list[str]:
    """Names of the task configs in ``conf/eval/task/``."""
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def load_task(name_or_path: str, overrides: dict | DictConfig | None = None) -> TaskConfig:
    """The task config ``conf/eval/task/<name>.yaml`` (or a YAML file's path), with
    ``overrides`` (a nested dict, e.g. ``{"data": {"path": "val.jsonl"}}``) merged on top.

    Raises:
        ValueError: an unknown task or key, naming it.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = TASK_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(builtin_tasks())
            raise ValueError(f"task={name_or_path}: no such task (built in: {known})")
    elif not path.is_file():
        raise ValueError(f"task={name_or_path}: file not found")
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(TaskConfig),
            {"name": path.stem},
            OmegaConf.load(path),
            overrides if overrides is not None else {},
        )
        task: TaskConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"task {name_or_path} ({path}): {err}") from err
    if task.choices.target not in ("text", "letter"):
        raise ValueError(f"task {task.name}: choices.target must be 'text' or 'letter'")
    return task


def task_fingerprint(task: TaskConfig) -> dict:
    """The parts of a task that decide the model's outputs (not metrics or post-processing)."""
    return {
        "prompt": task.prompt,
        "limit": task.data.limit,
        "choices": asdict(task.choices),
    }


# ----------------------------------------------------------------------------- data


@dataclass
class TaskData:
    """A task's records, ready for the processor.

    Attributes:
        path: the conversation JSONL they come from (media paths are relative to it).
        records: the records, prompt template applied.
        digest: sha256 of the JSONL's bytes (the data part of the cache key).
    """

    path: Path
    records: list[dict]
    digest: str


def load_task_data(task: TaskConfig, cache_dir: str | Path | None) -> TaskData:
    """Reads (converting first if needed) the task's records and applies its prompt.

    Raises:
        ValueError: the task has no data, or a record is unfit for the task's metrics.
    """
    if task.data.path is not None:
        path = Path(task.data.path)
    elif task.data.convert is not None:
        path = converted_jsonl(task.data.convert, cache_dir, task.name)
    else:
        raise ValueError(
            f"task {task.name} has no data: set data.path=<file.jsonl> (one task) or "
            f"+tasks.{task.name}.data.path=<file.jsonl>"
        )
    records = read_jsonl(path)
    if task.data.limit is not None:
        records = records[: task.data.limit]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return TaskData(path, [apply_prompt(r, task) for r in records], digest)


def converted_jsonl(spec: ConvertSource, cache_dir: str | Path | None, name: str) -> Path:
    """Converts ``spec`` into ``<cache_dir>/converted/`` once; later calls reuse the file
    while the spec and the bytes of its input files are unchanged."""
    from data_modules.convert import build_parser, convert

    if cache_dir is None:
        raise ValueError(f"task {name}: data.convert needs a cache_dir to write into")
    argv = [spec.format, spec.input, "OUT"]
    for key, value in spec.args.items():
        if value is None or value is False:
            continue
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    digest = hashlib.sha256(json.dumps([argv, spec.on_bad, spec.check_media]).encode())
    for arg in argv:
        if os.path.isfile(arg):
            digest.update(os.path.abspath(arg).encode())
            digest.update(Path(arg).read_bytes())
    out = Path(cache_dir) / "converted" / f"{name}-{digest.hexdigest()[:16]}.jsonl"
    if out.is_file():
        return out
    try:
        args = build_parser().parse_args([*argv[:2], str(out), *argv[3:]])
    except SystemExit as err:
        raise ValueError(f"task {name}: data.convert: bad format or args {argv}") from err
    convert(args.records(args), out, spec.on_bad, None, spec.check_media)
    return out


# ----------------------------------------------------------------------------- prompts


def question_text(record: dict) -> str:
    """The text of the last user turn before the last assistant turn."""
    user = _last_user(record)
    content = user["content"]
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")


def format_choices(choices: list[str], fmt: str = "{letter}. {text}") -> str:
    """``["cat", "dog"]`` -> ``"A. cat\\nB. dog"``."""
    return "\n".join(fmt.format(letter=LETTERS[i], text=c) for i, c in enumerate(choices))


def apply_prompt(record: dict, task: TaskConfig) -> dict:
    """The record with its last question replaced by the task's prompt template (a copy;
    the record itself when there is no template)."""
    choices = record.get("choices")
    if choices is not None:
        _check_choices(record)
    if task.prompt is None:
        return record
    values = {"question": question_text(record)}
    values["choices"] = format_choices(choices, task.choices.format) if choices else ""
    text = task.prompt.format(**values)
    out = copy.deepcopy(record)
    user = _last_user(out)
    content = user["content"]
    media = [] if isinstance(content, str) else [p for p in content if p.get("type") != "text"]
    user["content"] = [*media, {"type": "text", "text": text}]
    return out


def _last_user(record: dict) -> dict:
    messages = record.get("messages") or []
    last_assistant = max(
        (i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages)
    )
    users = [m for m in messages[:last_assistant] if m.get("role") == "user"]
    if not users:
        raise ValueError(f"record {record.get('id')!r}: no user turn to put the prompt in")
    return users[-1]


def _check_choices(record: dict) -> None:
    choices, index = record.get("choices"), record.get("answer_index")
    where = f"record {record.get('id')!r}"
    if not isinstance(choices, list) or not choices or len(choices) > len(LETTERS):
        raise ValueError(f"{where}: 'choices' must be a list of 1 to {len(LETTERS)} strings")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"{where}: every choice must be a non-empty string")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(choices):
        raise ValueError(f"{where}: 'answer_index' must be an index into 'choices'")
