"""The mmfuse-eval runner: result cache, several checkpoints and tasks, batching, and the
same tasks as Lightning validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from mmfuse.config import CONFIG_DIR
from mmfuse.evaluation import runner
from mmfuse.evaluation.runner import checkpoint_labels, evaluate
from mmfuse.evaluation.tasks import load_task
from mmfuse.evaluation.validation import gather_rows, logged_values, shard
from mmfuse.train import train
from tests.eval_helpers import eval_cfg, read_jsonl, save_tiny_model, write_eval_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_eval_data(tmp_path_factory.mktemp("eval-data"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("eval-models")
    return [save_tiny_model(out / name, seed) for seed, name in enumerate(["a", "b"])]


class _Loads:
    """Counts model loads; with ``allowed = False`` a load fails the test."""

    def __init__(self) -> None:
        self.count, self.allowed = 0, True


@pytest.fixture
def loads(monkeypatch) -> _Loads:
    counter, original = _Loads(), runner.load_model_dir

    def load(*args, **kwargs):
        counter.count += 1
        if not counter.allowed:
            raise AssertionError("the model was loaded")
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "load_model_dir", load)
    return counter


def _world(model: Path, data: Path, out: Path, *extra: str):
    return eval_cfg(
        f"ckpt={model}",
        f"data.path={data / 'world.jsonl'}",
        f"output_dir={out}",
        f"cache_dir={out.parent / 'cache'}",
        "generation.max_new_tokens=6",
        *extra,
    )


def test_second_run_comes_from_the_cache(models, data: Path, tmp_path: Path, loads) -> None:
    first = evaluate(_world(models[0], data, tmp_path / "one"))
    assert loads.count == 1
    loads.allowed = False
    again = evaluate(_world(models[0], data, tmp_path / "two"))
    assert again == first
    assert read_jsonl(tmp_path / "two" / "predictions.jsonl") == read_jsonl(
        tmp_path / "one" / "predictions.jsonl"
    )
    # new metrics re-score the cached outputs; other decoding needs the model
    rescored = evaluate(
        _world(models[0], data, tmp_path / "three", "+tasks.world.metrics=[exact_match_any]")
    )
    assert rescored == first  # one reference per record: any = the answer
    with pytest.raises(AssertionError, match="loaded"):
        evaluate(_world(models[0], data, tmp_path / "four", "generation.max_new_tokens=5"))
    with pytest.raises(AssertionError, match="loaded"):
        evaluate(_world(models[1], data, tmp_path / "five"))  # other weights


def test_no_cache_runs_the_model_each_time(models, data: Path, tmp_path: Path, loads) -> None:
    for name in ("one", "two"):
        evaluate(_world(models[0], data, tmp_path / name, "cache_dir=null"))
    assert loads.count == 2


def test_batching_does_not_change_greedy_answers(models, data: Path, tmp_path: Path) -> None:
    outputs = []
    for size in (1, 4):
        out = tmp_path / f"b{size}"
        evaluate(_world(models[0], data, out, f"batch_size={size}", "cache_dir=null"))
        outputs.append([r["prediction"] for r in read_jsonl(out / "predictions.jsonl")])
    assert outputs[0] == outputs[1]


def test_checkpoints_and_tasks_compared(models, data: Path, tmp_path: Path, capsys) -> None:
    results = evaluate(
        eval_cfg(
            f"ckpt=[{models[0]},{models[1]}]",
            "task=[world,classification]",
            f"+tasks.world.data.path={data / 'world.jsonl'}",
            f"+tasks.classification.data.path={data / 'classification.jsonl'}",
            "+tasks.classification.generation.max_new_tokens=4",
            "generation.max_new_tokens=6",
            f"output_dir={tmp_path}",
            f"cache_dir={tmp_path / 'cache'}",
        )
    )
    labels = checkpoint_labels([str(m) for m in models])
    assert labels == ["a/model", "b/model"]
    assert list(results) == labels
    for label in labels:
        assert set(results[label]) == {"world", "classification"}
        for task, per in results[label].items():
            run_dir = tmp_path / label.replace("/", "__") / task / "none"
            assert json.loads((run_dir / "metrics.json").read_text()) == per["none"]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    printed = capsys.readouterr().out
    table = printed.split("checkpoints compared\n\n")[1].strip().splitlines()
    assert table[0] == "| task | sub-task | metric | a/model | b/model |"
    world = results[labels[1]]["world"]["none"]
    assert table[2].startswith("| world | overall | exact_match | ")
    assert table[2].endswith(f" | {world['overall']:.3f} |")
    rows = {tuple(line.split(" | ")[:3]) for line in table[2:]}
    assert ("| classification", "overall", "macro_f1") in rows
    assert (tmp_path / "results.md").read_text().count("| task |") == 5  # 4 runs + compared


def test_data_path_is_for_one_task() -> None:
    with pytest.raises(ValueError, match="data.path is for one task"):
        runner.load_tasks(eval_cfg("task=[world,asr]", "data.path=x.jsonl"))


def test_checkpoint_labels_are_short_and_distinct() -> None:
    assert checkpoint_labels(["/r/x/model"]) == ["model"]
    assert checkpoint_labels(["/r/x/model", "/r/y/model"]) == ["x/model", "y/model"]


# ----------------------------------------------------------------------------- validation


def test_shards_cover_every_record_once() -> None:
    parts = [shard(7, rank, 3) for rank in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(7))
    rows = gather_rows([(2, {"id": "c"}), (0, {"id": "a"}), (1, {"id": "b"})], 1)
    assert [r["id"] for r in rows] == ["a", "b", "c"]


def test_logged_keys() -> None:
    world = load_task("world")
    assert logged_values(world, {"overall": 0.5}) == {"val/world/exact_match": 0.5}
    asr = load_task("asr")
    assert logged_values(asr, {"overall": {"wer": 0.25, "cer": 0.125}}) == {
        "val/asr/wer": 0.25,
        "val/asr/cer": 0.125,
    }


def test_validation_tasks_choose_the_checkpoint(data: Path, tmp_path: Path) -> None:
    world = data / "world.jsonl"
    overrides = [
        "model=tiny",
        "data=jsonl",
        f"data.train_path={world}",
        f"data.val_path={world}",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.num_workers=0",
        f"paths.output_dir={tmp_path / 'run'}",
        "trainer.max_steps=40",
        "trainer.max_epochs=40",
        "trainer.check_val_every_n_epoch=20",
        "optimizer.lr=3e-3",
        "trainer.enable_model_summary=false",
        "logger=csv",
        "callbacks=[default,eval_tasks]",
        "callbacks.progress_bar=null",
        "callbacks.early_stopping=null",
        "callbacks.eval_tasks.tasks=[world,perplexity]",
        f"+callbacks.eval_tasks.overrides.perplexity.data.path={data / 'perplexity.jsonl'}",
        "callbacks.model_checkpoint.monitor=val/world/exact_match",
        "callbacks.model_checkpoint.mode=max",
        f"callbacks.eval_tasks.cache_dir={tmp_path / 'cache'}",
        "generation.max_new_tokens=6",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    logged = train(cfg)
    value = logged["val/world/exact_match"]
    # the final evaluation of the saved model decodes and scores the same way
    model = tmp_path / "run" / "model"
    metrics = evaluate(_world(model, data, tmp_path / "eval"))
    assert metrics["overall"] == value > 0  # some answers are learnt
    perplexity = evaluate(
        eval_cfg(
            f"ckpt={model}",
            "task=perplexity",
            f"data.path={data / 'perplexity.jsonl'}",
            f"output_dir={tmp_path / 'ppl'}",
            "cache_dir=null",
        )
    )
    assert perplexity["overall"] == pytest.approx(logged["val/perplexity/perplexity"], rel=1e-5)
    best = [p for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(best) == 1
    state = torch.load(best[0], weights_only=False)["callbacks"]
    checkpoint = next(v for k, v in state.items() if k.startswith("ModelCheckpoint"))
    assert "val/world/exact_match" in next(k for k in state if k.startswith("ModelCheckpoint"))
    assert float(checkpoint["best_model_score"]) == pytest.approx(value)


@pytest.mark.slow
def test_validation_tasks_sharded_over_ddp_ranks(data: Path, tmp_path: Path) -> None:
    """Two gloo processes each evaluate half the records; the gathered metrics equal a
    single-process evaluation of the saved model."""
    import csv
    import os
    import subprocess
    import sys

    world, ppl = data / "world.jsonl", data / "perplexity.jsonl"
    command = [
        str(Path(sys.executable).parent / "mmfuse-train"),
        "trainer=ddp_cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
        "model=tiny",
        "data=jsonl",
        f"data.train_path={world}",
        f"data.val_path={world}",
        "data.batch_size=2",
        "data.num_workers=0",
        "trainer.max_steps=2",
        "callbacks=[default,eval_tasks]",
        "callbacks.progress_bar=null",
        "callbacks.eval_tasks.tasks=[world,perplexity]",
        f"+callbacks.eval_tasks.overrides.perplexity.data.path={ppl}",
        f"callbacks.eval_tasks.cache_dir={tmp_path / 'cache'}",
        "generation.max_new_tokens=6",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "run" / "csv" / "metrics.csv").open() as handle:
        logged = [r for r in csv.DictReader(handle) if r.get("val/perplexity/perplexity")][-1]
    model = tmp_path / "run" / "model"
    single = evaluate(_world(model, data, tmp_path / "eval"))
    assert single["overall"] == pytest.approx(float(logged["val/world/exact_match"]))
    perplexity = evaluate(
        eval_cfg(
            f"ckpt={model}",
            "task=perplexity",
            f"data.path={ppl}",
            f"output_dir={tmp_path}",
            "cache_dir=null",
        )
    )
    assert perplexity["overall"] == pytest.approx(float(logged["val/perplexity/perplexity"]))
