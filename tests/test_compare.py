"""Evaluation after training (``eval_after_fit``), run summaries and ``mmfuse-compare``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from mmfuse.compare import compare, find_runs, load_config, read_results
from mmfuse.evaluation.after_fit import eval_config, per_task_subset
from mmfuse.train import train
from tests.conftest import tiny_train_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VARIANTS = {"0": "cross_attention", "1": "perceiver"}


@pytest.fixture(scope="module")
def sweep(world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny runs (cross-attention and Perceiver fusion) laid out as a Hydra sweep, each
    evaluated after training on 2 test records per task, with media and without."""
    from hydra import compose, initialize_config_dir

    from mmfuse.config import CONFIG_DIR

    root = tmp_path_factory.mktemp("sweep")
    for job, fusion in VARIANTS.items():
        run = root / job
        overrides = [
            *(o for o in tiny_train_overrides(world_dir, run) if "max_steps" not in o),
            "trainer.max_steps=3",
            f"model/fusion={fusion}",
            "callbacks=[default,run_summary]",
            "+eval_after_fit.task=world",
            f"+eval_after_fit.data.path={world_dir / 'test.jsonl'}",
            "+eval_after_fit.per_task_limit=2",
            "+eval_after_fit.ablate=[none,all]",
            "+eval_after_fit.cache_dir=null",
            "+eval_after_fit.num_workers=0",
            "+eval_after_fit.generation.max_new_tokens=6",
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            train(compose("train", overrides=overrides))
        # what a multirun leaves beside each job
        (run / ".hydra").mkdir()
        OmegaConf.save(
            OmegaConf.create(["experiment=world_sweep", f"model/fusion={fusion}", "seed=0"]),
            run / ".hydra" / "overrides.yaml",
        )
    return root


def test_each_run_is_evaluated_after_training(sweep: Path) -> None:
    for job in VARIANTS:
        run = sweep / job
        summary = json.loads((run / "run_summary.json").read_text())
        assert summary["steps"] == 3 and summary["fit_seconds"] > 0
        total, trainable = summary["parameters"]["total"]
        assert total == trainable > 0
        subset = [json.loads(x) for x in (run / "eval" / "subset.jsonl").read_text().splitlines()]
        tasks = [r["task"] for r in subset]
        assert len(set(tasks)) == 11 and all(tasks.count(t) == 2 for t in set(tasks))
        image = next(p for p in subset[0]["messages"][0]["content"] if "path" in p)["path"]
        assert Path(image).is_absolute() and Path(image).is_file()
        results = read_results(run)
        assert set(results["world"]) == {"none", "all"}
        assert sum(results["world"]["none"]["n"].values()) == 22


def test_compare_writes_table_and_plots(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    out = compare(load_config([str(sweep)]))
    assert out == sweep / "compare"
    printed = capsys.readouterr().out
    assert f"comparison written to {out}" in printed
    text = (out / "compare.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert "parameters" in header and "fit time" in header
    for fusion, cls in (("cross_attention", "CrossAttentionFusion"), ("perceiver", "Perceiver")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {fusion} |"))
        assert cls in row and "PrefixConditioning" in row
    assert "all media / no media" in text
    overall = next(line for line in text.splitlines() if line.startswith("| overall |"))
    assert overall.count(" / ") == 2, "with and without media, for each run"
    assert any(line.startswith("| image/color |") for line in text.splitlines())
    for name in ("accuracy.png", "loss.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300
    content = json.loads((out / "compare.json").read_text())
    assert set(content) == {"cross_attention", "perceiver"}
    assert content["perceiver"]["fit_seconds"] > 0


def test_run_directories_are_found_and_labelled(sweep: Path, tmp_path: Path) -> None:
    runs = find_runs([sweep])
    assert [r.name for r in runs] == ["0", "1"], "model/ (with a config.yaml) is no run"
    out = compare(load_config([str(sweep / "0"), str(sweep / "1"), f"output_dir={tmp_path}"]))
    assert out == tmp_path and (tmp_path / "accuracy.png").is_file()
    # without Hydra's overrides: the directory names
    for job in VARIANTS:
        (sweep / job / ".hydra" / "overrides.yaml").rename(sweep / job / "overrides.bak")
    try:
        compare(load_config([str(sweep), f"output_dir={tmp_path / 'b'}", "plots=false"]))
        text = (tmp_path / "b" / "compare.md").read_text()
        assert "| 0 |" in text and "| 1 |" in text
        assert not (tmp_path / "b" / "loss.png").exists()
    finally:
        for job in VARIANTS:
            (sweep / job / "overrides.bak").rename(sweep / job / ".hydra" / "overrides.yaml")


def test_demo_layout_and_estimates(sweep: Path, tmp_path: Path) -> None:
    """A run evaluated by hand (eval/ and eval-blind/ metrics.json), without a summary."""
    run = tmp_path / "demo"
    (run / "csv").mkdir(parents=True)
    for name in ("config.yaml", "csv/metrics.csv"):
        (run / name).write_bytes((sweep / "0" / name).read_bytes())
    (run / "model").mkdir()
    weights = sweep / "0" / "model" / "model.safetensors"
    (run / "model" / "model.safetensors").write_bytes(weights.read_bytes())
    metrics = {"overall": 0.5, "tasks": {"image/color": 0.5}, "n": {"image/color": 2}}
    for folder in ("eval", "eval-blind"):
        (run / folder).mkdir()
        (run / folder / "metrics.json").write_text(json.dumps(metrics))
    assert set(read_results(run)["world"]) == {"none", "all"}
    out = compare(load_config([str(run), f"output_dir={tmp_path / 'c'}"]))
    row = next(x for x in (out / "compare.md").read_text().splitlines() if x.startswith("| demo"))
    expected = json.loads((sweep / "0" / "run_summary.json").read_text())["parameters"]["total"]
    assert f"{expected[0]:,}" in row, "parameters counted in model.safetensors"
    assert "| ~" in row, "the training time is an estimate"


def test_eval_after_fit_settings(world_dir: Path, tmp_path: Path) -> None:
    cfg = eval_config({"task": "world", "ablate": ["none", "all"]}, tmp_path / "model")
    assert cfg.ckpt == str(tmp_path / "model") and cfg.output_dir == str(tmp_path / "eval")
    with pytest.raises(ValueError, match="unknown keys \\['ablations'\\]"):
        eval_config({"ablations": ["all"]}, tmp_path)
    subset = per_task_subset(world_dir / "test.jsonl", 1, tmp_path / "s.jsonl")
    assert len(subset.read_text().splitlines()) == 11
