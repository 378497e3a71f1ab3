"""Modality ablation: each task with each modality removed, and the change it makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmfuse.evaluation.ablation import ablation_drops, ablation_table, drops
from mmfuse.evaluation.runner import evaluate
from tests.eval_helpers import eval_cfg, memorised_model, read_jsonl, write_eval_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ABLATIONS = ["none", "image", "audio", "all"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_eval_data(tmp_path_factory.mktemp("eval-data"))


@pytest.fixture(scope="module")
def model(data: Path, tmp_path_factory) -> Path:
    """The tiny model that has learnt the four world-sample answers."""
    records = read_jsonl(data / "world.jsonl")
    return memorised_model(tmp_path_factory.mktemp("memorised"), records, data)


def test_ablation_names() -> None:
    assert ablation_drops("none") == ()
    assert ablation_drops("image") == ("image",)
    assert ablation_drops("all") == ("image", "audio")
    assert ablation_drops("audio+image") == ("audio", "image")
    with pytest.raises(ValueError, match="video"):
        ablation_drops("video")


def _metrics(overall: float, subs: dict[str, float]) -> dict:
    return {"overall": overall, "tasks": subs, "n": dict.fromkeys(subs, 1)}


def test_table_of_fixed_metrics() -> None:
    per_ablation = {
        "none": {"world": _metrics(0.75, {"a/x": 1.0, "b/y": 0.5})},
        "image": {"world": _metrics(0.25, {"a/x": 0.5, "b/y": 0.0})},
        "all": {"world": _metrics(0.0, {"a/x": 0.0, "b/y": 0.0})},
    }
    table = ablation_table(per_ablation, {"world": "exact_match"})
    assert table.splitlines() == [
        "| task | sub-task | metric | all media | no image | no media |",
        "| --- | --- | --- | ---: | ---: | ---: |",
        "| world | overall | exact_match | 0.750 | 0.250 (-0.500) | 0.000 (-0.750) |",
        "| world | a/x | exact_match | 1.000 | 0.500 (-0.500) | 0.000 (-1.000) |",
        "| world | b/y | exact_match | 0.500 | 0.000 (-0.500) | 0.000 (-0.500) |",
    ]
    assert drops(per_ablation) == {
        "world": {
            "image": {"overall": -0.5, "a/x": -0.5, "b/y": -0.5},
            "all": {"overall": -0.75, "a/x": -1.0, "b/y": -0.5},
        }
    }


def test_ablation_end_to_end(model: Path, data: Path, tmp_path: Path, capsys) -> None:
    cfg = eval_cfg(
        f"ckpt={model}",
        f"data.path={data / 'world.jsonl'}",
        f"output_dir={tmp_path}",
        f"cache_dir={tmp_path / 'cache'}",
        f"ablate=[{','.join(ABLATIONS)}]",
        "generation.max_new_tokens=6",
    )
    results = evaluate(cfg)["model"]
    per = {a: results["world"][a] for a in ABLATIONS}
    assert per["none"]["overall"] == 1.0  # every answer learnt, with its media
    # a record without the removed modality answers as before
    for ablation in ("image", "all"):
        assert per[ablation]["tasks"]["image/color"] < 1.0  # red or blue: the image decides
    assert per["image"]["tasks"]["audio/pitch"] == 1.0  # audio only: removing images is moot
    assert per["audio"]["tasks"]["image/color"] == 1.0
    # the change from all media, per ablation and sub-task, is saved and tabled
    saved = json.loads((tmp_path / "results.json").read_text())["model"]
    assert saved["ablation"] == drops({a: {"world": per[a]} for a in ABLATIONS})
    for ablation in ABLATIONS[1:]:
        delta = per[ablation]["overall"] - per["none"]["overall"]
        assert saved["ablation"]["world"][ablation]["overall"] == pytest.approx(delta)
    printed = capsys.readouterr().out
    table = printed.split("modality ablation (change from none)\n\n")[1].strip().splitlines()
    assert table[0] == "| task | sub-task | metric | all media | no image | no audio | no media |"
    assert len(table) == 2 + 1 + 3  # header, rule, overall, three sub-tasks
    cells = table[2].strip("| ").split(" | ")
    assert cells[:4] == ["world", "overall", "exact_match", "1.000"]
    for cell, ablation in zip(cells[4:], ABLATIONS[1:], strict=True):
        value = per[ablation]["overall"]
        assert cell == f"{value:.3f} ({value - 1.0:+.3f})"
    # an ablation is the same run as dropping that media directly
    for ablation, drop in (("image", "[image]"), ("all", "[image,audio]")):
        run_dir = tmp_path / "model" / "world" / ablation
        direct = tmp_path / f"direct-{ablation}"
        metrics = evaluate(
            eval_cfg(
                f"ckpt={model}",
                f"data.path={data / 'world.jsonl'}",
                f"output_dir={direct}",
                "cache_dir=null",
                f"drop_modalities={drop}",
                "generation.max_new_tokens=6",
            )
        )
        assert metrics == per[ablation]
        predictions = [r["prediction"] for r in read_jsonl(direct / "predictions.jsonl")]
        assert predictions == [r["prediction"] for r in read_jsonl(run_dir / "predictions.jsonl")]
