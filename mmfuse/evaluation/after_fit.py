"""Evaluation at the end of ``mmfuse-train``: the ``eval_after_fit`` setting.

::

    eval_after_fit:
      task: world
      data: {path: data/world/test.jsonl}
      per_task_limit: 100        # the first 100 records of each task
      ablate: [none, all]        # with all media, and with every medium dropped
      output_dir: ${paths.output_dir}/eval

Every key but ``per_task_limit`` is an ``mmfuse-eval`` setting (``conf/eval.yaml``) and
overrides it; ``ckpt`` is the model directory the run just wrote. ``per_task_limit`` writes
the first N records of each sub-task (the records' ``task``) of the (one) task's data to
``<output_dir>/subset.jsonl``, with absolute media paths, and evaluates on that. The
outputs are ``mmfuse-eval``'s: ``results.json``, ``results.md`` and per ablation
``predictions.jsonl`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from data_modules.conversation import read_jsonl
from mmfuse.config import CONFIG_DIR
from mmfuse.evaluation.runner import evaluate, load_tasks

log = logging.getLogger(__name__)

LIMIT = "per_task_limit"
SUBSET = "subset.jsonl"


def eval_config(settings: Mapping, model_dir: str | Path) -> DictConfig:
    """``conf/eval.yaml`` with ``settings`` (less ``per_task_limit``) on top, for
    ``model_dir``.

    Raises:
        ValueError: a key that ``conf/eval.yaml`` does not have, naming it.
    """
    base = OmegaConf.load(Path(CONFIG_DIR) / "eval.yaml")
    for key in ("defaults", "hydra"):
        base.pop(key, None)
    extra = {k: v for k, v in settings.items() if k != LIMIT}
    unknown = sorted(set(extra) - set(base))
    if unknown:
        raise ValueError(f"eval_after_fit: unknown keys {unknown}; known: {sorted(base)}")
    cfg = OmegaConf.merge(base, extra, {"ckpt": str(model_dir)})
    if cfg.output_dir is None:
        cfg.output_dir = str(Path(model_dir).parent / "eval")
    return cfg


def per_task_subset(source: str | Path, limit: int, out: str | Path) -> Path:
    """Writes the first ``limit`` records of each task in ``source`` to ``out`` (file order
    kept, media paths made absolute) and returns ``out``."""
    source = Path(source)
    counts: dict[str, int] = {}
    kept = []
    for record in read_jsonl(source):
        task = str(record.get("task"))
        if counts.get(task, 0) >= limit:
            continue
        counts[task] = counts.get(task, 0) + 1
        kept.append(_absolute_media(record, source.parent))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for record in kept:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out


def _absolute_media(record: dict, base: Path) -> dict:
    messages = []
    for message in record.get("messages") or []:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {**p, "path": str((base / p["path"]).resolve())} if "path" in p else p
                for p in content
            ]
        messages.append({**message, "content": content})
    return {**record, "messages": messages}


def evaluate_after_fit(settings: Mapping, model_dir: str | Path) -> dict:
    """Evaluates ``model_dir`` as ``settings`` say (see the module docstring).

    Returns:
        What ``mmfuse.evaluation.runner.evaluate`` returns.
    """
    if isinstance(settings, DictConfig):
        settings = OmegaConf.to_container(settings, resolve=True)
    cfg = eval_config(settings, model_dir)
    limit = settings.get(LIMIT)
    if limit:
        tasks = load_tasks(cfg)
        if len(tasks) != 1:
            raise ValueError(f"eval_after_fit.{LIMIT} is for one task, not {cfg.task}")
        task = tasks[0]
        if task.data.path is None:
            raise ValueError(f"eval_after_fit.{LIMIT} needs a task with data.path (a JSONL)")
        subset = per_task_subset(task.data.path, int(limit), Path(cfg.output_dir) / SUBSET)
        cfg.data.path = str(subset)
    log.info("evaluating %s (task %s, ablate %s)", model_dir, cfg.task, list(cfg.ablate))
    return evaluate(cfg)
