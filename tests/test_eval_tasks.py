"""Evaluation task configs: every built-in task end to end on its sample, scores of fixed
predictions against hand-computed values, and the passes behind them."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from mmfuse.evaluation import runner
from mmfuse.evaluation.inference import Pass, _Records, conversation_nll, option_logprobs
from mmfuse.evaluation.runner import evaluate
from mmfuse.evaluation.scoring import extract_choice
from mmfuse.evaluation.tasks import (
    ChoiceConfig,
    apply_prompt,
    builtin_tasks,
    load_task,
    load_task_data,
)
from mmfuse.loss import next_token_loss
from mmfuse.model_dir import load_model_dir
from mmfuse.processing.collate import Collator
from tests.eval_helpers import eval_cfg, read_jsonl, save_tiny_model, write_eval_data
from tests.helpers import write_png

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONVERT = Path(__file__).resolve().parent / "data" / "convert"
CAPTION = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}
VALUES = {  # value names per task; None: one plain number
    "world": None,
    "vqav2": None,
    "coco_caption": CAPTION,
    "audiocaps": CAPTION,
    "clotho": CAPTION,
    "clotho_aqa": {"exact_match", "exact_match_any"},
    "asr": {"wer", "cer"},
    "multiple_choice": {"accuracy_loglik", "accuracy_generate"},
    "classification": {"accuracy", "macro_f1"},
    "perplexity": None,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_eval_data(tmp_path_factory.mktemp("eval-data"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("eval-model"))


@pytest.fixture(scope="module")
def loaded(model_dir: Path):
    return load_model_dir(model_dir)


def test_builtin_tasks_are_all_sampled() -> None:
    assert set(builtin_tasks()) == set(VALUES)
    for name in builtin_tasks():
        task = load_task(name)
        assert task.name == name and task.metrics


@pytest.mark.parametrize("name", sorted(VALUES))
def test_builtin_task_end_to_end(name: str, data: Path, model_dir: Path, tmp_path: Path) -> None:
    sample = data / f"{name}.jsonl"
    metrics = evaluate(
        eval_cfg(
            f"ckpt={model_dir}",
            f"task={name}",
            f"data.path={sample}",
            f"output_dir={tmp_path}",
            f"cache_dir={tmp_path / 'cache'}",
            "batch_size=3",
            f"+tasks.{name}.generation.max_new_tokens=5",
        )
    )
    records = read_jsonl(sample)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert set(metrics) == {"overall", "tasks", "n"}
    assert sum(metrics["n"].values()) == len(records)
    assert metrics["n"].keys() == {r["task"] for r in records}
    overall = metrics["overall"]
    if VALUES[name] is None:
        assert isinstance(overall, float) and math.isfinite(overall)
    else:
        assert set(overall) == VALUES[name]
        assert all(math.isfinite(v) for v in overall.values())
    rows = read_jsonl(tmp_path / "predictions.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    for row, record in zip(rows, records, strict=True):
        answer = record["messages"][-1]["content"][0]["text"]
        assert row["reference"] == answer
        assert row["references"] == record.get("references", [answer])
        assert set(row) >= {"id", "task", "prediction", "references", "scores"}
    if name == "multiple_choice":
        for row, record in zip(rows, records, strict=True):
            assert len(row["option_logprobs"]) == len(record["choices"])
            assert all(v < 0 for v in row["option_logprobs"])
            best = max(range(len(record["choices"])), key=row["option_logprobs"].__getitem__)
            assert row["scores"]["accuracy_loglik"] == float(best == record["answer_index"])
    if name == "perplexity":
        nll, tokens = sum(r["nll"] for r in rows), sum(r["tokens"] for r in rows)
        assert overall == pytest.approx(math.exp(nll / tokens))
        assert rows[2]["tokens"] == 2 * rows[1]["tokens"]  # two turns "yes", "no" vs "high"


# ----------------------------------------------------------------------------- fixed predictions


def _row(rid: str, task: str, prediction, reference: str | None = None, **extra) -> dict:
    row = {"id": rid, "task": task, "prediction": prediction, **extra}
    if reference is not None:
        row["reference"] = reference
    return row


CAPTIONS = ["a red circle on a grey background", "a blue circle on a grey background"]
RESCORE = {
    # exact match after lower-casing, stripping and dropping one final period: 2 of 4
    "world": (
        [
            _row("1", "image/color", "Red.", "red"),
            _row("2", "image/color", "red", "blue"),
            _row("3", "audio/pitch", "low ", "low"),
            _row("4", "both/total", "three", "two"),
        ],
        {
            "overall": 0.5,
            "tasks": {"audio/pitch": 1.0, "both/total": 0.0, "image/color": 0.5},
            "n": {"audio/pitch": 1, "both/total": 1, "image/color": 2},
        },
    ),
    # VQA: "Red." -> "red" given by 8 of 10 annotators: 1.0; "no" given by 1 of 10: each of
    # the 9 subsets keeping it has 1/3, the one without it 0: 0.3; "two" -> "2" likewise 0.3
    "vqav2": (
        [
            _row("1", "vqav2/other", "Red.\nit is red", references=["red"] * 8 + ["pink", "x"]),
            _row("2", "vqav2/yes-no", "no", references=["yes"] * 9 + ["no"]),
            _row("3", "vqav2/number", "two", references=["1"] * 5 + ["one"] * 4 + ["2"]),
        ],
        {
            "overall": pytest.approx((1.0 + 0.3 + 0.3) / 3),
            "tasks": {
                "vqav2/number": pytest.approx(0.3),
                "vqav2/other": 1.0,
                "vqav2/yes-no": pytest.approx(0.3),
            },
            "n": {"vqav2/number": 1, "vqav2/other": 1, "vqav2/yes-no": 1},
        },
    ),
    # perfect captions of two images: every BLEU and ROUGE-L 1; CIDEr-D: the shared n-grams
    # have idf 0, the others give identical tf-idf vectors: cosine 1 per n, times 10
    "coco_caption": (
        [_row(str(i), "coco/caption", c, references=[c]) for i, c in enumerate(CAPTIONS)],
        {
            "overall": {
                **{f"BLEU-{n}": pytest.approx(1.0) for n in range(1, 5)},
                "ROUGE-L": pytest.approx(1.0),
                "CIDEr-D": pytest.approx(10.0),
            },
        },
    ),
    # WER: 1 substitution / 8 reference words; CER: "low" -> "loud" is 2 edits / 31 chars
    "asr": (
        [
            _row("1", "asr/transcribe", "the tone is loud", "the tone is low"),
            _row("2", "asr/transcribe", "The tone is high.", "the tone is high"),
        ],
        {"overall": {"wer": pytest.approx(1 / 8), "cer": pytest.approx(2 / 31)}},
    ),
    # accuracy 2/4; F1 per label: positive 2/3, negative 0, tone 1, circle 0, square 0
    "classification": (
        [
            _row("1", "sentiment", "Positive.", "positive"),
            _row("2", "sentiment", "positive", "negative"),
            _row("3", "sound", "tone", "tone"),
            _row("4", "image", "square", "circle"),
        ],
        {
            "overall": {"accuracy": 0.5, "macro_f1": pytest.approx(1 / 3)},
            "tasks": {
                "image": {"accuracy": 0.0, "macro_f1": 0.0},
                "sentiment": {"accuracy": 0.5, "macro_f1": pytest.approx(1 / 3)},
                "sound": {"accuracy": 1.0, "macro_f1": 1.0},
            },
        },
    ),
    # majority answer vs any annotator's answer
    "clotho_aqa": (
        [
            _row("1", "clotho_aqa/yes-no", "Yes", "no", references=["no", "no", "yes"]),
            _row("2", "clotho_aqa/single", "beep", "beep", references=["beep", "whistle"]),
        ],
        {"overall": {"exact_match": 0.5, "exact_match_any": 1.0}},
    ),
    # letters and option texts read from the answers: B (right), A (wrong), "a circle"
    # (right); log-likelihood sums pick red (right), low (wrong), beep (wrong)
    "multiple_choice": (
        [
            _row("1", "mc", "B", choices=["blue", "red", "green"], answer_index=1,
                 option_logprobs=[-3.0, -1.0, -2.0], option_tokens=[1, 1, 1]),
            _row("2", "mc", "The answer is (A).", choices=["low", "high"], answer_index=1,
                 option_logprobs=[-2.0, -4.0], option_tokens=[1, 4]),
            _row("3", "mc", "a circle", choices=["circle", "beep", "red", "two"], answer_index=0,
                 option_logprobs=[-5.0, -1.0, -6.0, -7.0], option_tokens=[2, 1, 1, 1]),
        ],
        {"overall": {"accuracy_loglik": pytest.approx(1 / 3),
                     "accuracy_generate": pytest.approx(2 / 3)}},
    ),
    # token-weighted: exp((2 + 4 + 0) / (4 + 4 + 2)), not the mean of per-record values
    "perplexity": (
        [
            _row("1", "a", None, nll=2.0, tokens=4),
            _row("2", "a", None, nll=4.0, tokens=4),
            _row("3", "b", None, nll=0.0, tokens=2),
        ],
        {
            "overall": pytest.approx(math.exp(0.6)),
            "tasks": {"a": pytest.approx(math.exp(0.75)), "b": 1.0},
        },
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RESCORE))
def test_rescoring_fixed_predictions(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner, "load_model_dir", _no_model)
    rows, expected = RESCORE[name]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = evaluate(eval_cfg(f"predictions={path}", f"task={name}"))
    for key, value in expected.items():
        assert metrics[key] == value, key
    out = tmp_path / "rescored"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    scored = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in scored] == [r["id"] for r in rows]


def test_length_normalised_option_scores(tmp_path: Path) -> None:
    rows, _ = RESCORE["multiple_choice"]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = evaluate(
        eval_cfg(
            f"predictions={path}",
            "task=multiple_choice",
            "+tasks.multiple_choice.choices.length_normalize=true",
        )
    )
    # per token: -1 (red, right), -1 (high, right), -1 (beep, wrong)
    assert metrics["overall"]["accuracy_loglik"] == pytest.approx(2 / 3)


def longest_answer(rows: list[dict]) -> dict[str, float]:
    """A custom corpus metric (``{_target_: ...}`` in a task's metrics)."""
    return {"longest": float(max(len(r["prediction"]) for r in rows))}


def test_custom_metric_by_target(tmp_path: Path) -> None:
    rows, _ = RESCORE["world"]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = "tests.test_eval_tasks.longest_answer"
    metrics = evaluate(
        eval_cfg(
            f"predictions={path}",
            "task=world",
            f"+tasks.world.metrics=[exact_match,{{_target_:{target}}}]",
        )
    )
    # predictions are post-processed (stripped) before the metric sees them: "three"
    assert metrics["overall"] == {"exact_match": 0.5, "longest": 5.0}
    with pytest.raises(ValueError, match="has no reference"):
        evaluate(eval_cfg(f"predictions={_no_reference(tmp_path)}", "task=world"))


def _no_reference(tmp_path: Path) -> Path:
    path = tmp_path / "bare.jsonl"
    path.write_text(json.dumps({"id": "x", "task": "t", "prediction": "red"}) + "\n")
    return path


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.mark.parametrize(
    ("text", "index"),
    [
        ("B", 1),
        ("(C) green", 2),
        ("c.", None),  # a lower-case letter alone is not read as a letter, nor an option
        ("Answer: A", 0),
        ("the answer is C", 2),
        ("the answer is a red one", 1),  # "a" is an article, not the letter A
        ("A red circle", 1),
        ("C because of the colour", 2),
        ("Red.", 1),
        ("It is a green one", 2),
        ("red or blue", None),
        ("purple", None),
    ],
)
def test_extract_choice(text: str, index: int | None) -> None:
    assert extract_choice(text, ["blue", "red", "green"]) == index


# ----------------------------------------------------------------------------- prompts, data


def test_prompt_template_keeps_media_and_lists_choices(data: Path) -> None:
    task = load_task("multiple_choice")
    record = read_jsonl(data / "multiple_choice.jsonl")[0]
    prompted = apply_prompt(record, task)
    content = prompted["messages"][0]["content"]
    assert content[0] == {"type": "image", "path": "media/red.png"}
    assert content[1]["text"] == (
        "What color is the circle?\nA. blue\nB. red\nC. green\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert record["messages"][0]["content"][1]["text"] == "What color is the circle?"
    bad = {**record, "answer_index": 3}
    with pytest.raises(ValueError, match="answer_index"):
        apply_prompt(bad, task)


def test_unknown_task_key_and_metric_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no_such_key"):
        load_task("world", {"no_such_key": 1})
    with pytest.raises(ValueError, match="no such task"):
        load_task("no_such_task")
    path = tmp_path / "mine.yaml"
    path.write_text("metrics: [bleu_7]\ndata: {path: x.jsonl}\n")
    with pytest.raises(ValueError, match="bleu_7"):
        evaluate(eval_cfg("predictions=x.jsonl", f"task={path}"))


def test_vqav2_converted_on_the_fly(tmp_path: Path) -> None:
    images = tmp_path / "val2014"
    for image_id in (42, 73):
        write_png(images / f"COCO_val2014_{image_id:012d}.jpg")
    convert = (
        f"{{format:vqav2,input:{CONVERT / 'vqav2_questions.json'},"
        f"args:{{annotations:{CONVERT / 'vqav2_annotations.json'},image_root:{images}}}}}"
    )
    cfg = eval_cfg("task=vqav2", f"+tasks.vqav2.data.convert={convert}")
    task = runner.load_tasks(cfg)[0]
    first = load_task_data(task, tmp_path / "cache")
    assert first.path.parent == tmp_path / "cache" / "converted"
    assert [r["id"] for r in first.records] == ["42000", "42001", "73000"]
    assert all(len(r["references"]) == 10 for r in first.records)
    assert first.records[0]["messages"][0]["content"][1]["text"].endswith("single word or phrase.")
    stamp = first.path.stat().st_mtime_ns
    again = load_task_data(task, tmp_path / "cache")
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------- passes


def _run(loaded, data: Path, batch_size: int) -> Pass:
    model, processor = loaded
    return Pass(model, processor, data, "test", batch_size=batch_size)


def test_option_scores_do_not_depend_on_batching(loaded, data: Path) -> None:
    records = read_jsonl(data / "multiple_choice.jsonl")
    settings = ChoiceConfig()
    one = option_logprobs(records, _run(loaded, data, 1), settings)
    many = option_logprobs(records, _run(loaded, data, 9), settings)
    for a, b in zip(one, many, strict=True):
        assert a["option_tokens"] == b["option_tokens"]
        assert a["option_logprobs"] == pytest.approx(b["option_logprobs"], abs=1e-4)
    # by hand: the option's own tokens, with the template's end-of-turn token excluded
    model, processor = loaded
    record = {**records[2], "messages": [records[2]["messages"][0], _answer("beep")]}
    sample = processor(record, data)
    batch = Collator(processor.tokenizer.pad_token_id)([sample])
    with torch.no_grad():
        logits, labels = model(batch)
    logprobs = logits[0, :-1].log_softmax(-1)
    targets = labels[0, 1:]
    picked = [float(logprobs[t, targets[t]]) for t in range(len(targets)) if targets[t] >= 0]
    n_option = len(processor.tokenizer("beep", add_special_tokens=False)["input_ids"])
    assert one[2]["option_tokens"][1] == n_option == len(picked) - 1
    assert one[2]["option_logprobs"][1] == pytest.approx(sum(picked[:-1]), abs=1e-4)
    with_end = option_logprobs(records, _run(loaded, data, 4), ChoiceConfig(include_end_token=True))
    assert with_end[2]["option_logprobs"][1] == pytest.approx(sum(picked), abs=1e-4)


def _answer(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_perplexity_pass_matches_the_training_loss(loaded, data: Path) -> None:
    records = read_jsonl(data / "perplexity.jsonl")
    values = conversation_nll(records, _run(loaded, data, 2))
    model, processor = loaded
    batch = Collator(processor.tokenizer.pad_token_id)([processor(r, data) for r in records])
    with torch.no_grad():
        loss, count = next_token_loss(*model(batch))
    assert sum(v["tokens"] for v in values) == int(count)
    total = sum(v["nll"] for v in values)
    assert total / int(count) == pytest.approx(float(loss), rel=1e-5)


def test_the_records_of_a_pass_pickle_without_the_model(loaded, data: Path) -> None:
    # loader workers started by spawn or forkserver get a pickled copy of the data set; the
    # model (wav2vec2's weight-normed convolution) does not pickle and must not travel
    records = read_jsonl(data / "perplexity.jsonl")
    dataset = _Records(records, _run(loaded, data, 2), for_generation=False)
    copy = pickle.loads(pickle.dumps(dataset))
    assert not any(isinstance(v, torch.nn.Module) for v in vars(copy).values())
    for i in range(len(records)):
        assert torch.equal(copy[i].input_ids, dataset[i].input_ids)
        assert torch.equal(copy[i].labels, dataset[i].labels)
