"""A NaN or inf loss or gradient stops the run naming the step and records, or is skipped,
counted and bounded; the gradient norm is logged every step."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from data_modules.conversation import read_jsonl
from data_modules.sampler import ResumableSampler
from mmfuse.nonfinite import NonFiniteError, NonFiniteGuard
from mmfuse.train import train


def _overrides(world: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model=tiny",
        "data=jsonl",
        f"data.train_path={world / 'train.jsonl'}",
        "data.val_path=null",
        "data.batch_size=8",
        "data.num_workers=0",
        f"paths.output_dir={out}",
        "trainer.max_steps=5",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "threads=1",
        "callbacks.progress_bar=null",
        "callbacks.model_checkpoint=null",
        "callbacks.early_stopping=null",
        "callbacks.lr_monitor=null",
        *extra,
    ]


def _inject(steps: str, where: str = "loss") -> list[str]:
    return [
        "+callbacks.inject._target_=tests.faults.InjectNaN",
        f"+callbacks.inject.steps={steps}",
        f"+callbacks.inject.where={where}",
    ]


def _batch_ids(world: Path, step: int, batch_size: int = 8) -> list[str]:
    """The record ids of the batch at ``step`` (0-based) of epoch 0 with seed 0."""
    records = read_jsonl(world / "train.jsonl")
    order = list(ResumableSampler(records, seed=0))
    return [records[i]["id"] for i in order[step * batch_size : (step + 1) * batch_size]]


def _metrics(out: Path) -> list[dict]:
    with (out / "csv" / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_nan_loss_stops_naming_step_and_records(world_dir: Path, tmp_path: Path, compose_train):
    cfg = compose_train(_overrides(world_dir, tmp_path, *_inject("[3]")))
    with pytest.raises(NonFiniteError) as err:
        train(cfg)
    message = str(err.value)
    assert "non-finite loss" in message and "at step 3" in message
    assert str(_batch_ids(world_dir, 3)) in message


def test_nan_gradient_stops(world_dir: Path, tmp_path: Path, compose_train) -> None:
    cfg = compose_train(_overrides(world_dir, tmp_path, *_inject("[2]", "grad")))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(nan\) at step 2"):
        train(cfg)


def test_skip_drops_the_update_counts_and_logs_grad_norm(
    world_dir: Path, tmp_path: Path, compose_train
) -> None:
    extra = [
        *_inject("[1,3]"),
        "callbacks.nonfinite.action=skip",
        "callbacks.nonfinite.max_skipped=2",
        "+callbacks.trace._target_=tests.faults.ParamTrace",
        f"+callbacks.trace.path={tmp_path / 'trace.jsonl'}",
    ]
    train(compose_train(_overrides(world_dir, tmp_path, *extra)))
    trace = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [t["step"] for t in trace] == [1, 2, 3, 4, 5], "skipped steps still count as steps"
    changed = [t["before"] != t["after"] for t in trace]
    assert changed == [True, False, True, False, True], "no update on the skipped steps"
    assert all(math.isfinite(t["after"]) for t in trace)
    rows = [r for r in _metrics(tmp_path) if r.get("train/grad_norm")]
    assert len(rows) == 5, "gradient norm logged every step"
    assert [float(r["train/skipped_steps"]) for r in rows] == [0, 1, 1, 2, 2]


def test_skip_stops_after_max_skipped(world_dir: Path, tmp_path: Path, compose_train) -> None:
    extra = [
        *_inject("[0,1,2]"),
        "callbacks.nonfinite.action=skip",
        "callbacks.nonfinite.max_skipped=2",
    ]
    with pytest.raises(NonFiniteError, match="3 steps skipped, more than .*max_skipped=2"):
        train(compose_train(_overrides(world_dir, tmp_path, *extra)))


def test_bad_action_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="callbacks.nonfinite.action"):
        NonFiniteGuard(action="ignore")
