"""Evaluation tasks as Lightning validation: the same task configs, passes and decoding
settings as ``mmfuse-eval``, run at the end of every validation, sharded over the DDP ranks
and gathered, logged as ``val/<task>/<value>`` (e.g. ``val/vqav2/vqa_accuracy``,
``val/coco_caption/CIDEr-D``), so ``ModelCheckpoint``/``EarlyStopping`` can monitor any of
them. Enable with ``callbacks=[default,eval_tasks]`` (``conf/callbacks/eval_tasks.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from mmfuse.evaluation.inference import Pass
from mmfuse.evaluation.runner import infer_rows, task_generation
from mmfuse.evaluation.scoring import score_rows
from mmfuse.evaluation.tasks import TaskConfig, TaskData, load_task, load_task_data
from mmfuse.generation import GenerationConfig


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """The record indices rank ``rank`` evaluates: every ``world_size``-th (no padding, so no
    record counts twice)."""
    return list(range(rank, n, world_size))


def gather_rows(indexed: list[tuple[int, dict]], world_size: int) -> list[dict]:
    """Every rank's ``(record index, row)`` pairs, gathered on all ranks, in record order."""
    if world_size > 1:
        parts: list[list[tuple[int, dict]]] = [[] for _ in range(world_size)]
        torch.distributed.all_gather_object(parts, indexed)
        indexed = [pair for part in parts for pair in part]
    return [row for _, row in sorted(indexed, key=lambda pair: pair[0])]


def logged_values(task: TaskConfig, metrics: Mapping) -> dict[str, float]:
    """``{"val/<task>/<value>": overall value}``; a single plain value is named by the
    task's first metric."""
    overall = metrics["overall"]
    if not isinstance(overall, Mapping):
        first = task.metrics[0] if isinstance(task.metrics[0], str) else "score"
        overall = {first: overall}
    return {f"val/{task.name}/{name}": float(value) for name, value in overall.items()}


class TaskValidation(Callback):
    """Runs evaluation tasks at the end of each validation (not in the sanity check).

    Args:
        tasks: task names (``conf/eval/task/``) or task YAML paths.
        overrides: per task name, config overrides (e.g. ``{"vqav2": {"data": {"path":
            "vqa_val.jsonl", "limit": 500}}}``).
        generation: the decoding defaults under the tasks' own settings (the training
            config's ``generation``, which mmfuse-eval's ``generation`` default equals).
        batch_size: records per batch on each rank.
        cache_dir: where converter inputs are converted (``data.convert``).
        seed: seeds sampled decoding (greedy does not sample).
    """

    def __init__(
        self,
        tasks: Sequence[str] = ("world",),
        overrides: Mapping[str, Mapping] | None = None,
        generation: GenerationConfig | Mapping | None = None,
        batch_size: int = 16,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        overrides = overrides or {}
        self.tasks = [load_task(name, overrides.get(Path(name).stem)) for name in tasks]
        if isinstance(generation, GenerationConfig):
            generation = asdict(generation)
        self.generation = {k: v for k, v in (generation or {}).items() if k != "_target_"}
        self.batch_size, self.cache_dir, self.seed = batch_size, cache_dir, seed
        self.data: dict[str, TaskData] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for task in self.tasks:
            if task.name not in self.data:
                self.data[task.name] = load_task_data(task, self.cache_dir)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        processor = getattr(trainer.datamodule, "processor", None)
        if processor is None:
            raise ValueError("TaskValidation needs a data module with a `processor`")
        for task in self.tasks:
            data = self.data[task.name]
            indices = shard(len(data.records), trainer.global_rank, trainer.world_size)
            run = Pass(
                pl_module.model,
                processor,
                data.path.parent,
                str(data.path),
                batch_size=self.batch_size,
            )
            generation = task_generation(self.generation, task, self.seed)
            records = [data.records[i] for i in indices]
            rows = infer_rows(task, records, run, generation) if records else []
            pairs = list(zip(indices, rows, strict=True))
            metrics = score_rows(task, gather_rows(pairs, trainer.world_size))
            for key, value in logged_values(task, metrics).items():
                pl_module.log(key, value, sync_dist=True, add_dataloader_idx=False)
