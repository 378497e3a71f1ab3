"""``mmfuse-eval``: checkpoints x tasks x ablations -> predictions, metrics and tables.

For every checkpoint, task and ablation the model outputs come from the result cache when
the (model hash, task hash) key is there, else from the model (loaded on first need, so a
fully cached run never loads it). Outputs:

- one run (one checkpoint, one task, no ablation): ``predictions.jsonl`` and
  ``metrics.json`` (``{"overall", "tasks", "n"}``) in ``output_dir``;
- several: the same two files in ``output_dir/<checkpoint>/<task>/<ablation>/``;
- always ``results.json`` (``{checkpoint: {task: {ablation: metrics}}}``; with several
  ablations also ``{checkpoint: {"ablation": {task: {ablation: {sub-task: change}}}}}``, the
  change of each task's main value from the first ablation) and ``results.md``, the printed
  tables.

``predictions=<jsonl> task=<name>`` re-scores a predictions file without any model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mmfuse.evaluation.ablation import NONE, ablation_drops, ablation_table, drops
from mmfuse.evaluation.cache import ResultCache, code_hash
from mmfuse.evaluation.inference import (
    Pass,
    check_modalities,
    conversation_nll,
    generate_rows,
    option_logprobs,
)
from mmfuse.evaluation.scoring import GENERATE, NLL, OPTIONS, needs, postprocess, score_rows
from mmfuse.evaluation.table import comparison_table, task_table
from mmfuse.evaluation.tasks import (
    TaskConfig,
    TaskData,
    load_task,
    load_task_data,
    task_fingerprint,
)
from mmfuse.generation import GenerationConfig
from mmfuse.model import MMFuseModel
from mmfuse.model_dir import load_model_dir
from mmfuse.processing.processor import Processor, record_references
from mmfuse.processing.text import message_text
from mmfuse.types import MODALITIES


def task_generation(base: dict, task: TaskConfig, seed: int) -> GenerationConfig:
    """The run's generation settings with the task's on top; sampling gets ``seed``."""
    config = GenerationConfig(**{**base, **task.generation})
    if config.do_sample and config.seed is None:
        config.seed = seed
    return config


def _base_row(record: dict, default_task: str) -> dict:
    last = max(i for i, m in enumerate(record["messages"]) if m.get("role") == "assistant")
    reference = message_text(record["messages"][last])
    return {
        "id": str(record.get("id")),
        "task": str(record.get("task") or default_task),
        "prediction": None,
        "reference": reference,
        "references": record_references(record, reference),
    }


def infer_rows(
    task: TaskConfig, records: Sequence[dict], run: Pass, generation: GenerationConfig
) -> list[dict]:
    """Runs the passes the task's metrics need over ``records``: one row per record."""
    passes = needs(task)
    if GENERATE in passes:
        rows = generate_rows(records, run, generation, task.name)
    else:
        check_modalities(run.drop_modalities)
        rows = [_base_row(r, task.name) for r in records]
    for row, record in zip(rows, records, strict=True):
        if "choices" in record:
            row["choices"], row["answer_index"] = record["choices"], record["answer_index"]
    extra: list[list[dict]] = []
    if OPTIONS in passes:
        extra.append(option_logprobs(records, run, task.choices))
    if NLL in passes:
        extra.append(conversation_nll(records, run))
    for outputs in extra:
        for row, values in zip(rows, outputs, strict=True):
            row.update(values)
    return rows


def task_material(
    task: TaskConfig, data: TaskData, generation: GenerationConfig, drop: Sequence[str]
) -> dict:
    """What decides a task's model outputs: the task part of the cache key."""
    passes = needs(task)
    return {
        "code": code_hash(),
        "data": data.digest,
        "task": task_fingerprint(task),
        "passes": sorted(passes),
        "generation": asdict(generation) if GENERATE in passes else None,
        "drop": list(drop),
    }


# ----------------------------------------------------------------------------- config


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    return list(value)


def load_tasks(cfg: DictConfig) -> list[TaskConfig]:
    """The tasks of ``task=`` with ``tasks.<name>`` overrides and a legacy ``data.path``."""
    names = [str(n) for n in _as_list(cfg.get("task"))] or ["world"]
    overrides = cfg.get("tasks") or {}
    tasks = []
    for name in names:
        key = Path(name).stem
        extra = overrides.get(key)
        plain = OmegaConf.to_container(extra, resolve=True) if extra is not None else None
        task = load_task(name, plain)
        needs(task)  # an unknown metric fails here, before any work
        postprocess("", task.postprocess)
        tasks.append(task)
    if len({t.name for t in tasks}) != len(tasks):
        raise ValueError(f"task={names}: a task is named twice")
    data_path = (cfg.get("data") or {}).get("path")
    if data_path is not None:
        if len(tasks) > 1:
            raise ValueError(
                "data.path is for one task; give each task its data with "
                "+tasks.<name>.data.path=<file.jsonl>"
            )
        tasks[0].data.path, tasks[0].data.convert = str(data_path), None
    return tasks


def checkpoint_labels(paths: Sequence[str]) -> list[str]:
    """Shortest distinct path suffixes: ``[runs/a/model, runs/b/model]`` -> ``[a/model,
    b/model]``."""
    parts = [Path(p).resolve().parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def _output_dir(cfg: DictConfig, ckpts: Sequence[str]) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    if cfg.get("predictions"):
        return Path(cfg.predictions).parent / "rescored"
    if len(ckpts) == 1:
        return Path(ckpts[0]) / ".." / "eval"
    return Path("runs") / "eval"


def _write_rows(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_run(run_dir: Path, rows: Sequence[dict], metrics: dict) -> None:
    _write_rows(run_dir / "predictions.jsonl", rows)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _single_name(task: TaskConfig) -> str:
    first = task.metrics[0] if task.metrics else "score"
    return first if isinstance(first, str) else "score"


# ----------------------------------------------------------------------------- runs


class _LazyModel:
    """Loads a model directory on first use."""

    def __init__(self, path: str, device: str) -> None:
        self.path, self.device = path, device
        self.loaded: tuple[MMFuseModel, Processor] | None = None

    def __call__(self) -> tuple[MMFuseModel, Processor]:
        if self.loaded is None:
            self.loaded = load_model_dir(self.path, self.device)
        return self.loaded


def _task_rows(
    cfg: DictConfig,
    task: TaskConfig,
    data: TaskData,
    drop: Sequence[str],
    model: Callable[[], tuple[MMFuseModel, Processor]],
    model_hash: str,
    cache: ResultCache,
) -> list[dict]:
    base = {k: v for k, v in OmegaConf.to_container(cfg.generation).items() if k != "_target_"}
    generation = task_generation(base, task, cfg.seed)
    material = task_material(task, data, generation, drop)
    key = cache.key(model_hash, material)
    rows = cache.load(key)
    if rows is not None:
        return rows
    torch.manual_seed(cfg.seed)
    loaded_model, processor = model()
    run = Pass(
        loaded_model,
        processor,
        data.path.parent,
        str(data.path),
        drop,
        cfg.batch_size,
        cfg.num_workers,
    )
    rows = infer_rows(task, data.records, run, generation)
    cache.store(key, rows, material)
    return rows


def evaluate(cfg: DictConfig) -> dict:
    """Runs the evaluation ``cfg`` describes (see ``conf/eval.yaml``), writes its outputs and
    prints its tables. Returns the metrics of a single run, else ``results.json``'s content."""
    if cfg.get("predictions"):
        return rescore(cfg)
    ckpts = [str(c) for c in _as_list(cfg.get("ckpt"))]
    if not ckpts:
        raise ValueError("ckpt=<model dir> (or ckpt=[a,b]), or predictions=<file.jsonl>")
    check_modalities(list(cfg.drop_modalities))
    ablations = [str(a) for a in _as_list(cfg.get("ablate"))] or [NONE]
    for ablation in ablations:
        ablation_drops(ablation)
    tasks = load_tasks(cfg)
    datas = {task.name: load_task_data(task, cfg.get("cache_dir")) for task in tasks}
    cache = ResultCache(cfg.get("cache_dir"))
    labels = checkpoint_labels(ckpts)
    single = len(ckpts) == 1 and len(tasks) == 1 and len(ablations) == 1
    out = _output_dir(cfg, ckpts)
    results: dict = {}
    printed: list[str] = []
    for ckpt, label in zip(ckpts, labels, strict=True):
        model = _LazyModel(ckpt, cfg.device)
        model_hash = cache.model_hash(ckpt) if cache.root is not None else ""
        for task in tasks:
            data = datas[task.name]
            for ablation in ablations:
                drop = set(cfg.drop_modalities) | set(ablation_drops(ablation))
                drop_list = [m for m in MODALITIES if m in drop]
                rows = _task_rows(cfg, task, data, drop_list, model, model_hash, cache)
                metrics = score_rows(task, rows)
                run_dir = out if single else out / label.replace("/", "__") / task.name / ablation
                _write_run(run_dir, rows, metrics)
                dropped = ", ".join(drop_list) or "none"
                title = f"{label}: {task.name} on {data.path} (media dropped: {dropped})"
                printed.append(f"{title}\n\n{task_table(metrics, _single_name(task))}")
                print(printed[-1] + "\n")
                results.setdefault(label, {}).setdefault(task.name, {})[ablation] = metrics
    summary = _summaries(results, tasks, ablations)
    for text in summary:
        print(text + "\n")
    content = _write_results(out, results, ablations, printed + summary)
    if single:
        return results[labels[0]][tasks[0].name][ablations[0]]
    return content


def _summaries(results: dict, tasks: Sequence[TaskConfig], ablations: Sequence[str]) -> list:
    names = {t.name: _single_name(t) for t in tasks}
    out = []
    if len(results) > 1:
        for ablation in ablations:
            columns = {
                label: {t: r[ablation] for t, r in per.items()} for label, per in results.items()
            }
            table = comparison_table(columns, names)
            suffix = "" if ablation == NONE else f" (ablation: {ablation})"
            out.append(f"checkpoints compared{suffix}\n\n{table}")
    if len(ablations) > 1:
        for label, per in results.items():
            by_ablation = {a: {t: r[a] for t, r in per.items()} for a in ablations}
            table = ablation_table(by_ablation, names, ablations[0])
            out.append(f"{label}: modality ablation (change from {ablations[0]})\n\n{table}")
    return out


def _write_results(out: Path, results: dict, ablations: Sequence[str], texts: list) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    content = dict(results)
    if len(ablations) > 1:
        content = {
            label: {
                **per,
                "ablation": drops(
                    {a: {t: r[a] for t, r in per.items()} for a in ablations}, ablations[0]
                ),
            }
            for label, per in results.items()
        }
    (out / "results.json").write_text(json.dumps(content, indent=2) + "\n")
    (out / "results.md").write_text("\n\n".join(texts) + "\n")
    return content


def rescore(cfg: DictConfig) -> dict:
    """Scores an existing predictions file with one task's metrics (no model)."""
    tasks = load_tasks(cfg)
    if len(tasks) != 1:
        raise ValueError("predictions=<file> is re-scored with exactly one task=<name>")
    task = tasks[0]
    path = Path(cfg.predictions)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    metrics = score_rows(task, rows)
    out = _output_dir(cfg, [])
    _write_run(out, rows, metrics)
    text = f"{task.name}: re-scored {path}\n\n{task_table(metrics, _single_name(task))}"
    print(text + "\n")
    _write_results(out, {str(path): {task.name: {NONE: metrics}}}, [NONE], [text])
    return metrics
