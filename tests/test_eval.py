"""End to end: `evaluate(cfg)` on a trained tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mmfuse.config import CONFIG_DIR
from mmfuse.eval import evaluate, score


def _eval_cfg(model_dir: Path, data: Path, out: Path, *extra: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "eval",
            overrides=[
                f"ckpt={model_dir}",
                f"data.path={data}",
                f"output_dir={out}",
                "num_workers=0",
                "generation.max_new_tokens=8",
                *extra,
            ],
        )


def test_eval_writes_predictions_and_metrics(trained_run: Path, world_dir: Path, tmp_path: Path):
    test_file = world_dir / "test.jsonl"
    metrics = evaluate(_eval_cfg(trained_run / "model", test_file, tmp_path))
    records = [json.loads(line) for line in test_file.read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    for row, record in zip(rows, records, strict=False):
        assert row["reference"] == record["messages"][-1]["content"][0]["text"]
        assert row["task"] == record["task"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics
    assert set(saved) == {"overall", "tasks", "n"}
    assert sum(saved["n"].values()) == len(records)
    assert saved["n"]["image/color"] == 3
    hits = sum(r["score"] for r in rows)
    assert saved["overall"] == pytest.approx(hits / len(rows))


def test_blind_eval_drops_media(trained_run: Path, world_dir: Path, tmp_path: Path, capsys):
    evaluate(
        _eval_cfg(
            trained_run / "model",
            world_dir / "test.jsonl",
            tmp_path,
            "drop_modalities=[image,audio]",
        )
    )
    assert "media dropped: image, audio" in capsys.readouterr().out


def test_unknown_modality_to_drop(trained_run: Path, world_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="drop_modalities"):
        evaluate(
            _eval_cfg(
                trained_run / "model", world_dir / "test.jsonl", tmp_path, "drop_modalities=[video]"
            )
        )


@pytest.mark.parametrize("damage", ["missing", "bad_image", "bad_audio"])
def test_bad_media_names_file_record_and_reason(
    damage: str, trained_run: Path, world_dir: Path, tmp_path: Path
):
    lines = (world_dir / "test.jsonl").read_text().splitlines()
    kind = "audio" if damage == "bad_audio" else "image"
    record = next(json.loads(x) for x in lines if json.loads(x)["task"].startswith(kind))
    part = record["messages"][0]["content"][0]
    if damage == "missing":
        part["path"] = "nowhere.png"
        reason = "not found"
    else:
        broken = tmp_path / f"broken.{'wav' if kind == 'audio' else 'png'}"
        broken.write_bytes(b"this is not media" * 10)
        part["path"] = str(broken)
        reason = f"unreadable {kind}"
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError) as err:
        evaluate(_eval_cfg(trained_run / "model", data, tmp_path / "out"))
    assert str(data) in str(err.value) and record["id"] in str(err.value)
    assert reason in str(err.value)


def test_score_normalises_case_space_and_final_period() -> None:
    rows = [
        {"task": "a", "prediction": " Red. ", "reference": "red"},
        {"task": "a", "prediction": "blue", "reference": "red"},
        {"task": "b", "prediction": "top left", "reference": "Top left."},
    ]
    metrics = score(rows)
    assert metrics == {"overall": 2 / 3, "tasks": {"a": 0.5, "b": 1.0}, "n": {"a": 2, "b": 1}}
    assert [r["score"] for r in rows] == [1.0, 0.0, 1.0]
