"""mmfuse-convert: each format's sample (tests/data/convert) converts to exact records, bad rows
stop or are counted, and every output loads through the real data module and trains the tiny
model."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_modules.conversation import ConversationDataModule, read_jsonl
from data_modules.convert import main
from data_modules.converters.generic_csv import parse_columns
from mmfuse.loss import next_token_loss
from tests.helpers import build_tiny, write_png, write_wav

DATA = Path(__file__).parent / "data" / "convert"

IMAGES = {
    "images/coco/train2017/000000033471.jpg": (255, 0, 0),
    "images/coco/train2017/000000052846.jpg": (0, 0, 255),
    "images/val2017/000000000139.jpg": (0, 255, 0),
    "images/val2017/000000000285.jpg": (255, 255, 0),
    "images/val2014/COCO_val2014_000000000042.jpg": (255, 0, 0),
    "images/val2014/COCO_val2014_000000000073.jpg": (0, 0, 255),
    "images/generic/red.png": (255, 0, 0),
}
AUDIO = {
    "audio/audiocaps/r1nicOVtvkQ_130.wav": 220.0,
    "audio/audiocaps/---1_cCGK4M_0.wav": 440.0,
    "audio/clotho/Distorted AM Radio noise.wav": 880.0,
    "audio/clotho/birds_chirping.wav": 440.0,
    "audio/clotho_aqa/rain.wav": 220.0,
    "audio/clotho_aqa/dog.wav": 880.0,
    "audio/asr/1089-134686-0000.wav": 440.0,
    "audio/asr/1089-134686-0001.wav": 220.0,
    "audio/generic/beep.wav": 880.0,
}

# FORMAT, INPUT, options (paths under the source folder, written "{src}/...")
ARGS = {
    "llava": ["llava", "llava.json", "--image-root", "{src}/images"],
    "coco_captions": [
        "coco_captions",
        "coco_captions.json",
        "--image-root",
        "{src}/images/val2017",
    ],
    "vqav2": [
        "vqav2",
        "vqav2_questions.json",
        "--annotations",
        "{src}/vqav2_annotations.json",
        "--image-root",
        "{src}/images/val2014",
    ],
    "audiocaps": ["audiocaps", "audiocaps.csv", "--audio-root", "{src}/audio/audiocaps"],
    "clotho": ["clotho", "clotho.csv", "--audio-root", "{src}/audio/clotho"],
    "clotho_aqa": ["clotho_aqa", "clotho_aqa.csv", "--audio-root", "{src}/audio/clotho_aqa"],
    "asr": ["asr", "asr_manifest.json"],
    "csv": [
        "csv",
        "generic.csv",
        "--column",
        "id=uid,question=prompt,answer=response,image=img",
        "--column",
        "audio=snd",
        "--column",
        "references=alts",
        "--prompt",
        "Say yes.",
    ],
}
FORMATS = list(ARGS)


def _text(value: str) -> dict:
    return {"type": "text", "text": value}


def _qa(rid, task, media, question, answer, references=None) -> dict:
    """The expected one-turn record; ``media`` is [(kind, path relative to the output)]."""
    user = [{"type": kind, "path": path} for kind, path in media] + [_text(question)]
    record = {
        "id": rid,
        "task": task,
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [_text(answer)]},
        ],
    }
    if references is not None:
        record["references"] = references
    return record


IMG, AUD = "../src/images", "../src/audio"
RADIO = [
    "A radio dial is being turned through static.",
    "Static noise comes from a radio being tuned.",
    "Someone tunes an old radio with lots of static.",
    "A radio crackles while the dial moves.",
    "Loud static, then a radio station, then static again.",
]
BIRDS = [
    "Birds chirp in the trees.",
    "Several birds are singing outside.",
    "Small birds tweet near each other.",
    "Birds call back and forth in a forest.",
]
EXPECTED = {
    "llava": [
        {
            "id": "000000033471",
            "task": "llava/image",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "path": f"{IMG}/coco/train2017/000000033471.jpg"},
                        _text("What are the colors of the bus in the image?"),
                    ],
                },
                {"role": "assistant", "content": [_text("The bus in the image is white and red.")]},
                {
                    "role": "user",
                    "content": [_text("What feature can be seen on the back of the bus?")],
                },
                {
                    "role": "assistant",
                    "content": [_text("The back of the bus features an advertisement.")],
                },
            ],
        },
        {
            "id": "sharegpt-7",
            "task": "llava/text",
            "messages": [
                {"role": "system", "content": [_text("Answer in one word.")]},
                {"role": "user", "content": [_text("Is the sky blue on a clear day?")]},
                {"role": "assistant", "content": [_text("yes")]},
            ],
        },
        {
            "id": "52846",
            "task": "llava/image",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        _text("Describe this picture in a few words."),
                        {"type": "image", "path": f"{IMG}/coco/train2017/000000052846.jpg"},
                    ],
                },
                {"role": "assistant", "content": [_text("A blue circle on a grey background.")]},
            ],
        },
    ],
    "coco_captions": [
        _qa(
            "139",
            "coco/caption",
            [("image", f"{IMG}/val2017/000000000139.jpg")],
            "Describe the image.",
            "A woman stands in the dining area at the table.",
            [
                "A woman stands in the dining area at the table.",
                "A room with chairs, a table, and a woman in it.",
            ],
        ),
        _qa(
            "285",
            "coco/caption",
            [("image", f"{IMG}/val2017/000000000285.jpg")],
            "Describe the image.",
            "A big brown bear sitting in the grass.",
            ["A big brown bear sitting in the grass.", "A large bear sits on the grass."],
        ),
    ],
    "vqav2": [
        _qa(
            "42000",
            "vqav2/other",
            [("image", f"{IMG}/val2014/COCO_val2014_000000000042.jpg")],
            "What is this photo taken looking through?",
            "net",
            ["net"] * 6 + ["netting", "net", "mesh", "fence"],
        ),
        _qa(
            "42001",
            "vqav2/yes-no",
            [("image", f"{IMG}/val2014/COCO_val2014_000000000042.jpg")],
            "Is the sky blue?",
            "yes",
            ["yes"] * 9 + ["no"],
        ),
        _qa(
            "73000",
            "vqav2/number",
            [("image", f"{IMG}/val2014/COCO_val2014_000000000073.jpg")],
            "How many giraffes are there?",
            "2",
            ["2"] * 8 + ["3", "two"],
        ),
    ],
    "audiocaps": [
        _qa(
            "91139",
            "audiocaps/caption",
            [("audio", f"{AUD}/audiocaps/r1nicOVtvkQ_130.wav")],
            "Describe the sound.",
            "A woman talks nearby as water pours",
            ["A woman talks nearby as water pours"],
        ),
        _qa(
            "97151",
            "audiocaps/caption",
            [("audio", f"{AUD}/audiocaps/---1_cCGK4M_0.wav")],
            "Describe the sound.",
            "Idling car, train blows horn and passes",
            ["Idling car, train blows horn and passes", "A train horn sounds as a train passes by"],
        ),
    ],
    "clotho": [
        _qa(
            "Distorted AM Radio noise.wav",
            "clotho/caption",
            [("audio", f"{AUD}/clotho/Distorted AM Radio noise.wav")],
            "Describe the sound.",
            RADIO[0],
            RADIO,
        ),
        _qa(
            "birds_chirping.wav",
            "clotho/caption",
            [("audio", f"{AUD}/clotho/birds_chirping.wav")],
            "Describe the sound.",
            BIRDS[0],
            BIRDS,
        ),
    ],
    "clotho_aqa": [
        _qa(
            "rain.wav#q1",
            "clotho_aqa/yes-no",
            [("audio", f"{AUD}/clotho_aqa/rain.wav")],
            "Is it raining?",
            "yes",
            ["yes", "yes", "no"],
        ),
        _qa(
            "rain.wav#q2",
            "clotho_aqa/single",
            [("audio", f"{AUD}/clotho_aqa/rain.wav")],
            "What is falling?",
            "rain",
            ["water", "rain", "Rain"],
        ),
        _qa(
            "dog.wav#q1",
            "clotho_aqa/yes-no",
            [("audio", f"{AUD}/clotho_aqa/dog.wav")],
            "Is a dog barking?",
            "no",
            ["yes", "no", "no"],
        ),
        _qa(  # a tie: the answer given with confidence "yes" wins
            "dog.wav#q2",
            "clotho_aqa/single",
            [("audio", f"{AUD}/clotho_aqa/dog.wav")],
            "How many dogs are there?",
            "two",
            ["one", "two"],
        ),
    ],
    "asr": [
        _qa(
            "audio/asr/1089-134686-0000.wav",
            "asr/transcribe",
            [("audio", f"{AUD}/asr/1089-134686-0000.wav")],
            "Transcribe the audio.",
            "he hoped there would be stew for dinner",
        ),
        _qa(
            "utt-2",
            "asr/transcribe",
            [("audio", f"{AUD}/asr/1089-134686-0001.wav")],
            "Transcribe the audio.",
            "stuff it into you his belly counselled him",
        ),
    ],
    "csv": [
        _qa(
            "g1",
            "csv",
            [("image", f"{IMG}/generic/red.png")],
            "What color is the circle?",
            "red",
            ["red", "crimson"],
        ),
        _qa(
            "g2",
            "csv",
            [("audio", f"{AUD}/generic/beep.wav")],
            "Is the sound low or high?",
            "high",
            ["high"],
        ),
        _qa("g3", "csv", [], "Say yes.", "yes", ["yes"]),
        _qa(
            "g4",
            "csv",
            [("image", f"{IMG}/generic/red.png"), ("audio", f"{AUD}/generic/beep.wav")],
            "How many shapes and beeps are there together?",
            "two",
            ["2", "two"],
        ),
    ],
}


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _argv(fmt: str, src: Path, out: Path, *extra: str) -> list[str]:
    name, source, *options = ARGS[fmt]
    options = [o.format(src=src) for o in options]
    return [name, str(src / source), str(out), *options, *extra]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``src/``: the sample inputs plus tiny media; ``out/``: where outputs go."""
    root = tmp_path_factory.mktemp("convert")
    src = root / "src"
    shutil.copytree(DATA, src)
    for path, color in IMAGES.items():
        write_png(src / path, color, size=16)
    for path, freq in AUDIO.items():
        write_wav(src / path, freq, seconds=0.25)
    (root / "out").mkdir()
    return root


@pytest.fixture(scope="module")
def converted(base: Path) -> dict[str, tuple[Path, str]]:
    """Every sample converted with the CLI: format -> (output JSONL, summary line)."""
    before = _digests(base / "src")
    results = {}
    for fmt in FORMATS:
        out = base / "out" / f"{fmt}.jsonl"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert main(_argv(fmt, base / "src", out)) == 0
        results[fmt] = (out, stdout.getvalue().strip())
    assert _digests(base / "src") == before, "an input file changed"
    return results


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, one_torch_thread):
    proc, model, _ = build_tiny(tmp_path_factory.mktemp("run"), seed=0)
    return proc, model


# ----------------------------------------------------------------------------- records


@pytest.mark.parametrize("fmt", FORMATS)
def test_sample_converts_to_exact_records(fmt: str, converted) -> None:
    out, summary = converted[fmt]
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records == EXPECTED[fmt]
    assert summary == f"wrote {len(records)} records to {out}; skipped 0"
    for record in records:  # every media path resolves from the output's directory
        for message in record["messages"]:
            for part in message["content"]:
                if "path" in part:
                    assert (out.parent / part["path"]).is_file(), part["path"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_per_caption_records(base: Path, capsys) -> None:
    src, out = base / "src", base / "out"
    expected_ids = {
        "coco_captions": ["370509", "370584", "2001", "2002"],
        "audiocaps": ["91139", "97151", "97152"],
        "clotho": [f"Distorted AM Radio noise.wav#{k}" for k in range(1, 6)]
        + [f"birds_chirping.wav#{k}" for k in (1, 2, 4, 5)],  # caption_3 is blank
    }
    for fmt, ids in expected_ids.items():
        target = out / f"{fmt}-per-caption.jsonl"
        assert _run(_argv(fmt, src, target, "--per-caption"), capsys)[0] == 0
        records = read_jsonl(target)
        assert [r["id"] for r in records] == ids
        answers = [r["messages"][1]["content"][0]["text"] for r in records]
        per_item = {r["references"][0]: r["references"] for r in EXPECTED[fmt]}
        assert all(a in r["references"] for a, r in zip(answers, records, strict=True))
        assert {tuple(r["references"]) for r in records} == {tuple(v) for v in per_item.values()}


def test_copy_media_and_absolute_paths(base: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "data" / "generic.jsonl"
    code, stdout, _ = _run(
        _argv("csv", base / "src", out, "--copy-media", str(tmp_path / "m")), capsys
    )
    assert code == 0 and stdout.strip().endswith("; copied 2 media files")
    records = read_jsonl(out)
    assert records[3]["messages"][0]["content"][:2] == [
        {"type": "image", "path": "../m/images/generic/red.png"},
        {"type": "audio", "path": "../m/audio/generic/beep.wav"},
    ]
    copied = tmp_path / "m" / "audio" / "generic" / "beep.wav"
    assert copied.read_bytes() == (base / "src" / "audio" / "generic" / "beep.wav").read_bytes()

    wav = base / "src" / "audio" / "asr" / "1089-134686-0000.wav"
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"audio_filepath": str(wav), "text": "hi", "duration": 0.25}))
    target = tmp_path / "nested" / "asr.jsonl"
    assert _run(["asr", str(manifest), str(target), "--prompt", "Say it."], capsys)[0] == 0
    (record,) = read_jsonl(target)
    audio, prompt = record["messages"][0]["content"]
    assert record["id"] == str(wav) and prompt == _text("Say it.")
    assert audio["type"] == "audio" and not Path(audio["path"]).is_absolute()
    assert os.path.normpath(target.parent / audio["path"]) == str(wav)


def test_python_dash_m_runs_the_cli(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "clotho.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "data_modules.convert", *_argv("clotho", base / "src", out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote 2 records to {out}; skipped 0\n"
    assert [r["id"] for r in read_jsonl(out)] == [r["id"] for r in EXPECTED["clotho"]]


# ----------------------------------------------------------------------------- bad rows


def test_skip_counts_bad_rows_by_reason(base: Path, capsys) -> None:
    src, out = base / "src", base / "out" / "llava_bad.jsonl"
    argv = ["llava", str(src / "llava_bad.json"), str(out), "--image-root", str(src / "images")]
    code, stdout, _ = _run([*argv, "--on-bad", "skip"], capsys)
    assert code == 0
    assert stdout == (
        f"wrote 1 record to {out}; skipped 7 (duplicate id: 1, empty answer: 1, "
        "image placeholder mismatch: 3, missing media: 1, unknown role: 1)\n"
    )
    assert [r["id"] for r in read_jsonl(out)] == ["ok-1"]

    out.write_text("previous output\n")
    code, stdout, stderr = _run(argv, capsys)  # --on-bad error (the default)
    assert code == 1 and stdout == ""
    assert stderr == (
        f"mmfuse-convert: error: {src / 'llava_bad.json'}: record 2 (id 'bad-role'): "
        "unknown role: turn 1: 'from' is 'bot', not one of ['human', 'gpt', 'system']\n"
    )
    assert out.read_text() == "previous output\n", "a failed run must leave the output alone"
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _llava(conversations, image=None) -> str:
    record = {"id": "r1", "conversations": conversations}
    if image:
        record["image"] = image
    return json.dumps([record])


BAD_CASES = {
    "llava-placeholder": (
        "llava",
        "in.json",
        _llava([{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}], "a.png"),
        [],
        "record 1 (id 'r1'): image placeholder mismatch: the record has an image and 0",
    ),
    "llava-gpt-placeholder": (
        "llava",
        "in.json",
        _llava(
            [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image> x"}], "a.png"
        ),
        [],
        "record 1 (id 'r1'): image placeholder mismatch: turn 2 (gpt) holds '<image>'",
    ),
    "coco-no-caption": (
        "coco_captions",
        "in.json",
        json.dumps({"images": [{"id": 5, "file_name": "a.png"}], "annotations": []}),
        [],
        "image 1 (id 5): empty answer: image 5 has no non-empty caption",
    ),
    "coco-empty-caption": (
        "coco_captions",
        "in.json",
        json.dumps(
            {
                "images": [{"id": 5, "file_name": "a.png"}],
                "annotations": [{"id": 1, "image_id": 5, "caption": " "}],
            }
        ),
        [],
        "image 1 (id 5): empty answer: image 5 has no non-empty caption",
    ),
    "vqav2-no-annotation": (
        "vqav2",
        "in.json",
        json.dumps(
            {
                "data_subtype": "val2014",
                "questions": [{"image_id": 1, "question": "Why?", "question_id": 10}],
            }
        ),
        ["--annotations", "{tmp}/ann.json"],
        "question 1 (question_id 10): missing field: no annotation for question_id 10",
    ),
    "audiocaps-missing-column": (
        "audiocaps",
        "in.csv",
        "audiocap_id,youtube_id,start_time\n1,abc,0\n",
        [],
        "header: missing required column: 'caption' not in",
    ),
    "audiocaps-empty-caption": (
        "audiocaps",
        "in.csv",
        "audiocap_id,youtube_id,start_time,caption\n1,abc,0,a dog\n2,abd,0,  \n",
        [],
        "line 3: empty answer: column 'caption' is empty",
    ),
    "clotho-no-caption": (
        "clotho",
        "in.csv",
        "file_name,caption_1,caption_2\nx.wav,,\n",
        [],
        "line 2: empty answer: every caption is empty",
    ),
    "clotho_aqa-empty-answer": (
        "clotho_aqa",
        "in.csv",
        "file_name,QuestionText,answer,confidence\n"
        "x.wav,Is it loud?,yes,yes\nx.wav,Is it loud?,,no\n",
        [],
        "line 3: empty answer: column 'answer' is empty",
    ),
    "asr-invalid-json": (
        "asr",
        "in.json",
        '{"audio_filepath": "a.wav", "text": "hi"}\n{"audio_filepath": \n',
        [],
        "line 2: invalid value: invalid JSON",
    ),
    "asr-offset": (
        "asr",
        "in.json",
        '{"audio_filepath": "a.wav", "text": "hi", "duration": 1.0, "offset": 2.5}\n',
        [],
        "line 1: unsupported: offset 2.5",
    ),
    "csv-missing-column": (
        "csv",
        "in.csv",
        "q,a\nWhy?,because\n",
        ["--column", "question=q,answer=answer"],
        "header: missing required column: 'answer' not in ['q', 'a']",
    ),
    "csv-empty-answer": (
        "csv",
        "in.csv",
        "q,a\nWhy?,because\nHow?,\n",
        ["--column", "question=q,answer=a"],
        "line 3: empty answer: column 'a' is empty",
    ),
    "duplicate-id": (
        "csv",
        "in.csv",
        "id,q,a\n1,Why?,because\n1,How?,so\n",
        ["--column", "id=id,question=q,answer=a"],
        "line 3: duplicate id: id '1' was already written",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_row_is_an_error_naming_file_row_and_reason(case: str, tmp_path: Path, capsys) -> None:
    fmt, name, content, options, expected = BAD_CASES[case]
    source = _write(tmp_path / name, content)
    _write(tmp_path / "ann.json", json.dumps({"annotations": []}))
    out = tmp_path / "out" / "x.jsonl"
    argv = [fmt, str(source), str(out), *(o.format(tmp=tmp_path) for o in options)]
    code, _, stderr = _run([*argv, "--no-check-media"], capsys)
    assert code == 1
    assert f"mmfuse-convert: error: {source}: {expected}" in stderr
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == []  # no temporary file left behind
    if not expected.startswith("header"):  # a bad header stops whatever --on-bad says
        code, stdout, _ = _run([*argv, "--no-check-media", "--on-bad", "skip"], capsys)
        reason = expected.split(": ")[1]
        assert code == 0 and f"skipped 1 ({reason}: 1)" in stdout


def test_vqav2_bad_annotation_names_the_annotations_file(tmp_path: Path, capsys) -> None:
    questions = _write(
        tmp_path / "q.json",
        json.dumps(
            {
                "data_subtype": "val2014",
                "questions": [{"image_id": 1, "question": "Why?", "question_id": 10}],
            }
        ),
    )
    annotation = {"question_id": 10, "multiple_choice_answer": "", "answers": []}
    annotations = _write(tmp_path / "a.json", json.dumps({"annotations": [annotation]}))
    argv = ["vqav2", str(questions), str(tmp_path / "o.jsonl"), "--annotations", str(annotations)]
    code, _, stderr = _run([*argv, "--no-check-media"], capsys)
    assert code == 1
    assert (
        f"{annotations}: annotation for question_id 10: empty answer: "
        "'multiple_choice_answer' is empty" in stderr
    )


def test_output_may_not_be_an_input(base: Path, capsys) -> None:
    source = base / "src" / "clotho.csv"
    before = source.read_bytes()
    code, _, stderr = _run(["clotho", str(source), str(source)], capsys)
    assert code == 2 and "is an input" in stderr
    assert source.read_bytes() == before


def test_column_mapping_errors() -> None:
    assert parse_columns(["question=q, answer=a", "image=img"]) == {
        "question": "q",
        "answer": "a",
        "image": "img",
    }
    for specs, message in [
        (["question=q"], "answer=COLUMN is required"),
        (["answer=a", "colour=c"], "unknown key 'colour'"),
        (["answer=a,answer=b"], "mapped twice"),
        (["answer"], "expected KEY=COLUMN"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_columns(specs)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_loads_and_trains_the_tiny_model(fmt: str, converted, tiny) -> None:
    proc, model = tiny
    path = str(converted[fmt][0])
    data = ConversationDataModule(proc, path, path, batch_size=8, eval_batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    expected = EXPECTED[fmt]
    assert sorted(batch.ids) == sorted(r["id"] for r in expected)
    by_id = {r["id"]: r for r in expected}
    kinds = {
        rid: {p["type"] for m in by_id[rid]["messages"] for p in m["content"]} for rid in batch.ids
    }
    assert batch.has_image.tolist() == ["image" in kinds[rid] for rid in batch.ids]
    assert batch.has_audio.tolist() == ["audio" in kinds[rid] for rid in batch.ids]

    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss, _ = next_token_loss(*model(batch))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses

    generate = next(iter(data.val_dataloader()[1]))  # the reference is the last answer
    last = {r["id"]: r["messages"][-1]["content"][0]["text"] for r in expected}
    assert generate.references == [last[rid] for rid in generate.ids]


def test_train_cli_config_trains_on_all_converted_outputs(converted, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from mmfuse.config import CONFIG_DIR
    from mmfuse.train import train

    out_dir = next(iter(converted.values()))[0].parent
    merged = out_dir / "all.jsonl"
    merged.write_text("".join(converted[fmt][0].read_text() for fmt in FORMATS))
    overrides = [
        "model=tiny",
        "data=jsonl",
        f"data.train_path={merged}",
        f"data.val_path={out_dir / 'coco_captions.jsonl'}",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.num_workers=0",
        f"paths.output_dir={tmp_path}",
        "trainer.max_steps=2",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "trainer.enable_model_summary=false",
        "callbacks.progress_bar=null",
        "logger=none",
        "generation.max_new_tokens=4",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert (tmp_path / "model" / "model.safetensors").is_file()
