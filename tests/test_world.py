"""Tests of the shapes-and-sounds world generator (data_modules.world)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from data_modules import world
from data_modules.world import ANSWERS, TASKS, WorldSize, generate_world

SMALL = WorldSize(n_train=330, n_val_per_task=3, n_test_per_task=12)
SPLITS = ("train", "val", "test")
QUADRANT_BOUNDS = {  # inclusive x0, y0, x1, y1 of each quadrant
    "top left": (0, 0, 31, 31),
    "top right": (32, 0, 63, 31),
    "bottom left": (0, 32, 31, 63),
    "bottom right": (32, 32, 63, 63),
}
NOMINAL = {"low": 220.0, "middle": 440.0, "high": 880.0}
NUMBER = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _media_files(root: Path) -> dict[str, bytes]:
    files = sorted((root / "images").iterdir()) + sorted((root / "audio").iterdir())
    return {f"{f.parent.name}/{f.name}": f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, seed=0, size=SMALL, workers=2)
    return out


@pytest.fixture(scope="module")
def records(small_world: Path) -> dict[str, list[dict]]:
    return {split: _read_jsonl(small_world / f"{split}.jsonl") for split in SPLITS}


@pytest.fixture(scope="module")
def metas(small_world: Path) -> dict[str, list[dict]]:
    return {split: _read_jsonl(small_world / "meta" / f"{split}.jsonl") for split in SPLITS}


def test_task_and_answer_sets() -> None:
    assert len(TASKS) == 11
    assert set(ANSWERS) == set(TASKS) - {"image/caption", "audio/caption"}
    assert ANSWERS["both/total"] == ("two", "three", "four", "five", "six")
    assert ANSWERS["image/where"] == ("top left", "top right", "bottom left", "bottom right")


def test_same_seed_is_byte_identical_for_any_worker_count(
    small_world: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    generate_world(again, seed=0, size=SMALL, workers=1)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "meta/train.jsonl", "world.json"):
        assert (again / name).read_text() == (small_world / name).read_text(), name
    assert _media_files(again) == _media_files(small_world)


def test_different_seed_differs(small_world: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate_world(other, seed=1, size=SMALL, workers=2)
    for split in SPLITS:
        ours = (small_world / f"{split}.jsonl").read_text()
        assert (other / f"{split}.jsonl").read_text() != ours
    ours, theirs = _media_files(small_world), _media_files(other)
    assert not set(ours.values()) & set(theirs.values())


def test_manifest_counts(small_world: Path, records: dict[str, list[dict]]) -> None:
    manifest = json.loads((small_world / "world.json").read_text())
    assert manifest["seed"] == 0
    assert manifest["size"] == {
        "n_train": 330,
        "n_val_per_task": 3,
        "n_test_per_task": 12,
        "multi_turn_fraction": 0.5,
    }
    expected = {"train": 330, "val": 33, "test": 132}
    for split, recs in records.items():
        info = manifest["splits"][split]
        assert info["records"] == len(recs) == expected[split]
        images = {p["path"] for r in recs for p in r["messages"][0]["content"] if "path" in p}
        assert info["images"] == len({p for p in images if p.startswith("images/")})
        assert info["audio"] == len({p for p in images if p.startswith("audio/")})
        counts = Counter(r["task"] for r in recs)
        assert set(counts) == set(TASKS)
        assert max(counts.values()) - min(counts.values()) <= 1
        turns = Counter(
            (task, msg["content"][0]["text"])
            for r in recs
            for task, msg in zip(r["turn_tasks"], r["messages"][1::2], strict=True)
            if task in ANSWERS
        )
        for task, answers in info["answer_counts"].items():
            assert answers == {a: turns[(task, a)] for a in ANSWERS[task]}
    assert manifest["splits"]["train"]["multi_turn_records"] == 165
    assert manifest["splits"]["test"]["turns"] == 132


def test_record_schema(records: dict[str, list[dict]]) -> None:
    for split, recs in records.items():
        for i, record in enumerate(recs):
            assert set(record) == {"id", "task", "turn_tasks", "messages"}
            assert record["id"] == f"{split}-{i:06d}"
            assert record["turn_tasks"][0] == record["task"]
            assert len(set(record["turn_tasks"])) == len(record["turn_tasks"])
            if split != "train":
                assert len(record["turn_tasks"]) == 1
            messages = record["messages"]
            assert [m["role"] for m in messages] == ["user", "assistant"] * len(
                record["turn_tasks"]
            )
            first = messages[0]["content"]
            types = [part["type"] for part in first]
            family = record["task"].split("/")[0]
            expected = {"image": ["image"], "audio": ["audio"], "both": ["image", "audio"]}
            assert types == [*expected[family], "text"]
            for part in first[:-1]:
                folder = "images" if part["type"] == "image" else "audio"
                ext = "png" if part["type"] == "image" else "wav"
                assert re.fullmatch(rf"{folder}/{split}-\d{{6}}\.{ext}", part["path"])
            for message in messages[1:]:
                assert [part["type"] for part in message["content"]] == ["text"]
            for task in record["turn_tasks"][1:]:
                media = set(types[:-1])
                assert task.split("/")[0] in media or (
                    task.startswith("both/") and family == "both"
                )


def test_train_turns_and_media_reuse(records: dict[str, list[dict]]) -> None:
    train = records["train"]
    lengths = Counter(len(r["turn_tasks"]) for r in train)
    assert set(lengths) == {1, 2, 3}
    assert lengths[2] + lengths[3] == 165
    uses = Counter(p["path"] for r in train for p in r["messages"][0]["content"] if "path" in p)
    assert max(uses.values()) >= 2  # media are shared between train records
    needing_image = sum(not r["task"].startswith("audio/") for r in train)
    images = [p for p in uses if p.startswith("images/")]
    assert 1.3 < needing_image / len(images) < 1.7
    for split in ("val", "test"):
        paths = [
            p["path"] for r in records[split] for p in r["messages"][0]["content"] if "path" in p
        ]
        assert len(paths) == len(set(paths))  # fresh media for every val/test record


def test_every_media_file_reads(small_world: Path, records: dict[str, list[dict]]) -> None:
    paths = {
        p["path"]
        for recs in records.values()
        for r in recs
        for p in r["messages"][0]["content"]
        if "path" in p
    }
    on_disk = {f"images/{f.name}" for f in (small_world / "images").iterdir()}
    on_disk |= {f"audio/{f.name}" for f in (small_world / "audio").iterdir()}
    assert paths == on_disk
    for path in sorted(paths):
        if path.startswith("images/"):
            with Image.open(small_world / path) as image:
                assert image.size == (64, 64)
                assert image.mode == "RGB"
                assert image.format == "PNG"
        else:
            info = sf.info(str(small_world / path))
            assert (info.frames, info.samplerate, info.channels) == (16000, 16000, 1)
            assert info.subtype == "PCM_16"
            assert info.format == "WAV"


def test_questions_and_answers_come_from_templates(records: dict[str, list[dict]]) -> None:
    templates = world.question_templates()
    corpus = set(world.vocabulary_corpus())
    corpus_words = {w for text in corpus for w in text.replace(",", " ").split()}
    for recs in records.values():
        for record in recs:
            texts = [m["content"][-1]["text"] for m in record["messages"]]
            for task, question, answer in zip(
                record["turn_tasks"], texts[0::2], texts[1::2], strict=True
            ):
                assert question in templates[task]
                assert question in corpus
                if task in ANSWERS:
                    assert answer in ANSWERS[task]
                    assert answer in corpus
                else:
                    assert set(answer.replace(",", " ").split()) <= corpus_words


def _expected_answer(task: str, question: str, meta: dict) -> str:
    """Recomputes an answer from the hidden metadata, independently of the generator."""
    shapes = meta.get("image", {}).get("shapes", [])
    beeps = meta.get("audio", {}).get("beeps", [])
    positions = list(QUADRANT_BOUNDS)
    names = list(NUMBER)
    if task == "image/color":
        kind = re.fullmatch(r"What color is the (\w+)\?", question).group(1)
        (match,) = [s for s in shapes if s["kind"] == kind]
        return match["color"]
    if task == "image/shape":
        color = re.fullmatch(r"What shape is the (\w+) one\?", question).group(1)
        (match,) = [s for s in shapes if s["color"] == color]
        return match["kind"]
    if task == "image/where":
        color, kind = re.fullmatch(r"Where is the (\w+) (\w+)\?", question).groups()
        (match,) = [s for s in shapes if (s["color"], s["kind"]) == (color, kind)]
        return positions[match["quadrant"]]
    if task == "image/caption":
        parts = [f"a {s['color']} {s['kind']} at the {positions[s['quadrant']]}" for s in shapes]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    audio = meta.get("audio", {})
    answers = {
        "image/count": lambda: names[len(shapes) - 1],
        "audio/count": lambda: names[len(beeps) - 1],
        "audio/pitch": lambda: audio["pitch"],
        "audio/wave": lambda: audio["wave"],
        "audio/caption": lambda: (
            f"{names[len(beeps) - 1]} {audio['pitch']} {audio['wave']} "
            + ("beep" if len(beeps) == 1 else "beeps")
        ),
        "both/match": lambda: "yes" if len(shapes) == len(beeps) else "no",
        "both/total": lambda: names[len(shapes) + len(beeps) - 1],
    }
    return answers[task]()


def test_answers_are_correct_for_the_media(
    records: dict[str, list[dict]], metas: dict[str, list[dict]]
) -> None:
    for split in SPLITS:
        for record, meta in zip(records[split], metas[split], strict=True):
            assert meta["id"] == record["id"]
            texts = [m["content"][-1]["text"] for m in record["messages"]]
            assert [t["question"] for t in meta["turns"]] == texts[0::2]
            assert [t["answer"] for t in meta["turns"]] == texts[1::2]
            for task, question, answer in zip(
                record["turn_tasks"], texts[0::2], texts[1::2], strict=True
            ):
                assert answer == _expected_answer(task, question, meta), (record["id"], task)
            for part in record["messages"][0]["content"][:-1]:
                assert meta[part["type"]]["path"] == part["path"]


def test_balance(records: dict[str, list[dict]]) -> None:
    for split in ("val", "test"):
        for task, answers in ANSWERS.items():
            got = Counter(
                r["messages"][1]["content"][0]["text"] for r in records[split] if r["task"] == task
            )
            counts = [got[a] for a in answers]
            assert sum(counts) == len([r for r in records[split] if r["task"] == task])
            assert max(counts) - min(counts) <= 1, (split, task, got)
    first = Counter((r["task"], r["messages"][1]["content"][0]["text"]) for r in records["train"])
    every = Counter(
        (task, msg["content"][0]["text"])
        for r in records["train"]
        for task, msg in zip(r["turn_tasks"], r["messages"][1::2], strict=True)
    )
    for task, answers in ANSWERS.items():
        firsts = [first[(task, a)] for a in answers]
        assert max(firsts) - min(firsts) <= 1, (task, firsts)
        alls = [every[(task, a)] for a in answers]
        assert max(alls) - min(alls) <= max(3, 0.03 * max(alls)), (task, alls)


def test_balance_full_size_plan() -> None:
    # Planning only (no rendering) of the default-size train split: within 3% over all turns.
    planner = world._SplitPlanner("train", 0, WorldSize())
    plan = planner.plan()
    assert len(plan) == 20000
    assert sum(len(r.turns) > 1 for r in plan) == 10000
    for task, counts in planner.counts.items():
        values = list(counts.values())
        assert max(values) - min(values) <= 0.03 * max(values), (task, counts)
    images = {id(r.image) for r in plan if r.image is not None}
    audios = {id(r.audio) for r in plan if r.audio is not None}
    assert 8000 <= len(images) <= 9000
    assert 8000 <= len(audios) <= 9000


def test_question_parameters_are_independent_of_answers() -> None:
    # Planning only: the kind/colour asked about must carry no information on the answer.
    planner = world._SplitPlanner("test", 3, WorldSize(n_test_per_task=600))
    plan = planner.plan()
    for task in ("image/color", "image/shape", "image/where"):
        table = Counter((r.turns[0][1], r.turns[0][2]) for r in plan if r.task == task)
        questions = world.question_templates()[task]
        assert {q for q, _ in table} == set(questions)
        n = sum(table.values())
        by_question = Counter(q for q, _ in table.elements())
        by_answer = Counter(a for _, a in table.elements())
        chi2 = sum(
            (table[(q, a)] - by_question[q] * by_answer[a] / n) ** 2
            / (by_question[q] * by_answer[a] / n)
            for q in questions
            for a in ANSWERS[task]
        )
        dof = (len(questions) - 1) * (len(ANSWERS[task]) - 1)
        assert chi2 < dof + 5 * (2 * dof) ** 0.5, (task, chi2, dof)


def test_pixels_match_captions(small_world: Path, metas: dict[str, list[dict]]) -> None:
    palette = {
        "red": (220, 50, 50),
        "green": (50, 170, 70),
        "blue": (50, 90, 220),
        "yellow": (230, 200, 50),
    }
    checked = 0
    for meta in metas["test"] + metas["train"][:60]:
        if "image" not in meta:
            continue
        caption = next((t["answer"] for t in meta["turns"] if t["task"] == "image/caption"), None)
        image = np.asarray(Image.open(small_world / meta["image"]["path"]).convert("RGB"))
        gray = meta["image"]["background"]
        assert 190 <= gray <= 235
        assert tuple(image[0, 0]) == (gray,) * 3 or tuple(image[63, 63]) == (gray,) * 3
        shapes = meta["image"]["shapes"]
        assert 1 <= len(shapes) <= 3
        assert len({s["quadrant"] for s in shapes}) == len(shapes)
        for shape in shapes:
            x0, y0, x1, y1 = shape["box"]
            position = list(QUADRANT_BOUNDS)[shape["quadrant"]]
            qx0, qy0, qx1, qy1 = QUADRANT_BOUNDS[position]
            assert qx0 <= x0 and qy0 <= y0 and x1 <= qx1 and y1 <= qy1
            assert 14 <= x1 - x0 + 1 <= 24 and x1 - x0 == y1 - y0
            pixel = image[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
            nearest = min(palette, key=lambda c: np.abs(pixel - palette[c]).sum())
            assert nearest == shape["color"]
            assert np.abs(pixel - palette[shape["color"]]).max() <= 12
            if caption is not None:
                assert f"a {nearest} {shape['kind']} at the {position}" in caption
                checked += 1
    assert checked >= 20


def _beep_count(signal: np.ndarray) -> int:
    frames = np.abs(signal[: len(signal) // 160 * 160]).reshape(-1, 160).max(axis=1)
    loud = np.concatenate([[False], frames > 0.1])
    return int(np.sum(loud[1:] & ~loud[:-1]))


def test_audio_matches_metadata(small_world: Path, metas: dict[str, list[dict]]) -> None:
    sines = 0
    for meta in metas["test"] + metas["val"]:
        if "audio" not in meta:
            continue
        audio = meta["audio"]
        signal, rate = sf.read(small_world / audio["path"])
        assert rate == 16000 and signal.shape == (16000,)
        assert np.abs(signal).max() <= 1.0
        assert _beep_count(signal) == len(audio["beeps"]), audio["path"]
        assert abs(audio["frequency"] / NOMINAL[audio["pitch"]] - 1) <= 0.03 + 1e-9
        ends = [b["start"] + b["length"] for b in audio["beeps"]]
        starts = [b["start"] for b in audio["beeps"]]
        assert all(1920 <= b["length"] <= 3200 for b in audio["beeps"])
        assert all(s - e >= 1600 for s, e in zip(starts[1:], ends[:-1], strict=False))
        assert starts[0] >= 0 and ends[-1] <= 16000
        if audio["wave"] == "sine":
            spectrum = np.abs(np.fft.rfft(signal))
            peak = np.fft.rfftfreq(len(signal), 1 / rate)[np.argmax(spectrum)]
            assert abs(peak / audio["frequency"] - 1) < 0.03
            assert min(NOMINAL, key=lambda p: abs(np.log(peak / NOMINAL[p]))) == audio["pitch"]
            sines += 1
    assert sines >= 5


def test_regeneration_is_skipped_when_manifest_matches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size = WorldSize(n_train=22, n_val_per_task=1, n_test_per_task=2)
    out = tmp_path / "w"
    manifest = generate_world(out, seed=5, size=size, workers=1)
    capsys.readouterr()
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    (out / "images" / "marker.txt").write_text("kept")
    assert generate_world(out, seed=5, size=size, workers=1) == manifest
    assert "reusing" in capsys.readouterr().out
    assert (out / "train.jsonl").stat().st_mtime_ns == stamp
    assert (out / "images" / "marker.txt").exists()
    bigger = generate_world(out, seed=5, size=WorldSize(33, 1, 2), workers=1)
    assert bigger["splits"]["train"]["records"] == 33
    assert not (out / "images" / "marker.txt").exists()  # old media were replaced
    assert not (out / ".world-tmp").exists()
    assert json.loads((out / "world.json").read_text()) == bigger


def test_half_written_world_is_regenerated(tmp_path: Path) -> None:
    size = WorldSize(n_train=11, n_val_per_task=1, n_test_per_task=1)
    out = tmp_path / "w"
    manifest = generate_world(out, seed=2, size=size, workers=1)
    (out / "world.json").unlink()
    (out / "train.jsonl").write_text("")
    assert generate_world(out, seed=2, size=size, workers=1) == manifest
    assert len(_read_jsonl(out / "train.jsonl")) == 11


def test_vocabulary_corpus_covers_all_words() -> None:
    corpus = world.vocabulary_corpus()
    assert len(corpus) == len(set(corpus))
    for questions in world.question_templates().values():
        assert set(questions) <= set(corpus)
    for answers in ANSWERS.values():
        assert set(answers) <= set(corpus)
    words = {w for text in corpus for w in text.replace(",", " ").replace("?", " ").split()}
    for word in ["red", "yellow", "triangle", "bottom", "right", "sawtooth", "beeps", "and"]:
        assert word in words
    assert "one low sine beep" in corpus and "three high square beeps" in corpus
    assert any(", " in text and " and " in text for text in corpus)


def test_cli_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--seed", "4", "--n-train", "22", "--n-val-per-task", "1"]
    world.main([*argv, "--n-test-per-task", "2", "--workers", "1"])
    printed = capsys.readouterr().out
    assert "train: 22 records" in printed and "test: 22 records" in printed
    manifest = json.loads((out / "world.json").read_text())
    assert manifest["seed"] == 4
    assert manifest["size"]["n_test_per_task"] == 2
