"""End to end: `train(cfg)` from the real configs on the tiny world."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmfuse.model_dir import load_model_dir
from mmfuse.train import train
from tests.conftest import tiny_train_overrides


def _metrics_rows(run: Path) -> list[dict]:
    with (run / "csv" / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_run_writes_model_dir_checkpoint_and_logs(trained_run: Path) -> None:
    model_dir = trained_run / "model"
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "tokenizer" / "tokenizer.json").is_file()
    assert (model_dir / "config.yaml").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert (trained_run / "config.yaml").is_file()
    rows = _metrics_rows(trained_run)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    val = [r for r in rows if r.get("val/loss")]
    assert val, "validation ran at the end of the (limited) epoch"
    assert 0.0 <= float(val[-1]["val/exact_match"]) <= 1.0
    assert any(key.startswith("val/exact_match/image/") for key in val[-1])


def test_saved_weights_equal_trained_weights(trained_run: Path) -> None:
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    saved = load_file(trained_run / "model" / "model.safetensors")
    model, _ = load_model_dir(trained_run / "model")
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][f"model.{name}"]), name
    assert set(saved) <= set(model.state_dict())


def test_same_seed_same_losses(world_dir: Path, tmp_path: Path, compose_train) -> None:
    losses = []
    for name in ("a", "b"):
        overrides = tiny_train_overrides(world_dir, tmp_path / name)
        overrides = [o for o in overrides if "limit_val" not in o]
        cfg = compose_train(
            [*overrides, "trainer.max_steps=3", "+trainer.limit_val_batches=0", "logger=none"]
        )
        losses.append(train(cfg)["train/loss"])
    assert losses[0] == losses[1]


def test_jsonl_data_without_validation(world_dir: Path, tmp_path: Path, compose_train) -> None:
    overrides = tiny_train_overrides(world_dir, tmp_path)
    overrides = [o for o in overrides if not o.startswith("data.val_path")]
    metrics = train(compose_train(overrides + ["trainer.max_steps=2"]))
    assert "val/loss" not in metrics and metrics["train/loss"] > 0
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_missing_media_stops_training_naming_record(tmp_path: Path, world_dir: Path, compose_train):
    record = json.loads((world_dir / "train.jsonl").read_text().splitlines()[0])
    record["messages"][0]["content"][0]["path"] = "images/does-not-exist.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record) + "\n")
    overrides = tiny_train_overrides(world_dir, tmp_path / "run")
    overrides = [o for o in overrides if not o.startswith(("data.train_path", "data.val_path"))]
    cfg = compose_train(overrides + [f"data.train_path={bad}", "data.batch_size=1"])
    with pytest.raises(ValueError) as err:
        train(cfg)
    message = str(err.value)
    assert str(bad) in message and record["id"] in message and "not found" in message


def test_resume_from_last_checkpoint(
    trained_run: Path, world_dir: Path, tmp_path: Path, compose_train
) -> None:
    dropped = ("trainer.max_steps", "trainer.max_epochs", "+trainer.limit_val_batches")
    overrides = [o for o in tiny_train_overrides(world_dir, tmp_path) if not o.startswith(dropped)]
    last = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_train(
        [
            *overrides,
            "trainer.max_steps=8",
            "trainer.max_epochs=2",
            "+trainer.limit_val_batches=0",
            f"ckpt_path={last}",
        ]
    )
    train(cfg)
    start = torch.load(last, weights_only=False)["global_step"]
    end = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert start == 6 and end > start, "resumed at the saved step and trained on"


@pytest.mark.slow  # compiling takes minutes on CPU
def test_compiled_training_saves_the_same_model_layout(
    world_dir: Path, tmp_path: Path, compose_train
) -> None:
    """`compile=true` compiles in place: same parameter names in the model directory, which
    loads and generates like any other."""
    runs = {}
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        overrides = [
            o for o in tiny_train_overrides(world_dir, tmp_path / name) if "limit_val" not in o
        ]
        cfg = compose_train(
            [
                *overrides,
                "trainer.max_steps=2",
                "+trainer.limit_val_batches=0",
                f"compile={compiled}",
            ]
        )
        runs[name] = train(cfg)
    eager = load_file(tmp_path / "eager" / "model" / "model.safetensors")
    compiled = load_file(tmp_path / "compiled" / "model" / "model.safetensors")
    assert set(eager) == set(compiled)
    assert runs["compiled"]["train/loss"] == pytest.approx(runs["eager"]["train/loss"], rel=1e-3)
    load_model_dir(tmp_path / "compiled" / "model")
