"""Tests of data_modules.turns (one sample per answer) and of the data sets built on it."""

from __future__ import annotations

import json

import pytest
from helpers import processor, record, supervised_text, tokenizer, write_media

from data_modules.conversation import ConversationDataset
from data_modules.turns import split_at_answers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _three_turns() -> dict:
    rec = record("w7", "What color is the circle?", "red", image="a.png", task="image/color")
    for question, answer in (("What shape is it?", "circle"), ("How many shapes?", "one")):
        rec["messages"] += [
            {"role": "user", "content": [{"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    rec["turn_tasks"] = ["image/color", "image/shape", "image/count"]
    return rec


def test_a_record_is_cut_after_each_answer():
    rec = _three_turns()
    cuts = split_at_answers([rec])
    assert [c["id"] for c in cuts] == ["w7#turn1", "w7#turn2", "w7#turn3"]
    assert [c["task"] for c in cuts] == ["image/color", "image/shape", "image/count"]
    assert [len(c["messages"]) for c in cuts] == [2, 4, 6]
    assert cuts[2]["messages"] == rec["messages"] and cuts[1]["turn_tasks"] == rec["turn_tasks"][:2]
    assert rec["id"] == "w7" and len(rec["messages"]) == 6  # the record itself is untouched


def test_a_record_is_cut_into_single_questions_with_the_media():
    rec = _three_turns()
    rec["messages"].insert(0, {"role": "system", "content": "Answer briefly."})
    cuts = split_at_answers([rec], "each_alone")
    assert [c["turn_tasks"] for c in cuts] == [["image/color"], ["image/shape"], ["image/count"]]
    for cut, question, answer in zip(
        cuts,
        ("What color is the circle?", "What shape is it?", "How many shapes?"),
        ("red", "circle", "one"),
        strict=True,
    ):
        system, user, reply = cut["messages"]
        assert system == {"role": "system", "content": "Answer briefly."}
        assert user["content"] == [
            {"type": "image", "path": "a.png"},
            {"type": "text", "text": question},
        ]
        assert reply["content"] == [{"type": "text", "text": answer}]


def test_both_gives_every_answer_alone_and_the_later_ones_in_context():
    cuts = split_at_answers([_three_turns()], "each_both")
    assert [c["id"] for c in cuts] == [
        "w7#turn1",
        "w7#turn2",
        "w7#turn2-context",
        "w7#turn3",
        "w7#turn3-context",
    ]
    assert [len(c["messages"]) for c in cuts] == [2, 2, 4, 2, 6]
    assert [c["task"] for c in cuts] == [
        "image/color",
        "image/shape",
        "image/shape",
        "image/count",
        "image/count",
    ]
    with pytest.raises(ValueError, match="turns must be one of"):
        split_at_answers([_three_turns()], "whole")


def test_single_answer_and_malformed_records_pass_through():
    single = record("s1", "What color?", "red")
    broken = {"id": "b1", "messages": "not a list"}
    assert split_at_answers([single, broken]) == [single, broken]
    answer = {"role": "assistant", "content": "red"}
    no_question = {"id": "b2", "messages": [answer, {"role": "user", "content": "Hi?"}, answer]}
    first = split_at_answers([no_question], "each_alone")[0]
    assert first["id"] == "b2#turn1" and first["messages"] == [answer]


def test_a_cut_without_turn_tasks_keeps_the_record_task():
    rec = _three_turns()
    del rec["turn_tasks"]
    assert {c["task"] for c in split_at_answers([rec])} == {"image/color"}


def test_each_sample_supervises_its_own_answer_after_its_own_question(tmp_path):
    write_media(tmp_path)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(_three_turns()) + "\n" + json.dumps(record("s1", "Hi?", "yes")))
    proc = processor()
    proc.prompt_turns = "last"
    data = ConversationDataset(path, proc, turns="each")
    assert len(data) == 4
    tok = tokenizer()
    answers = [supervised_text(tok, data[i].labels.tolist()) for i in range(4)]
    assert answers == ["red<|im_end|>", "circle<|im_end|>", "one<|im_end|>", "yes<|im_end|>"]
    prompts = [tok.decode(data[i].prompt_ids) for i in range(3)]
    assert prompts == ["What color is the circle?", "What shape is it?", "How many shapes?"]
    # the conversation before the answer stays as context
    assert "What color is the circle?" in tok.decode(data[2].input_ids)
    whole = ConversationDataset(path, processor())
    assert len(whole) == 2
    assert supervised_text(tok, whole[0].labels.tolist()) == (
        "red<|im_end|>circle<|im_end|>one<|im_end|>"
    )
    assert tok.decode(whole[0].prompt_ids) == (
        "What color is the circle?\nWhat shape is it?\nHow many shapes?"
    )


def test_alone_samples_hold_one_question_each(tmp_path):
    write_media(tmp_path)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(_three_turns()) + "\n")
    data = ConversationDataset(path, processor(), turns="each_alone")
    tok = tokenizer()
    assert [tok.decode(data[i].prompt_ids) for i in range(3)] == [
        "What color is the circle?",
        "What shape is it?",
        "How many shapes?",
    ]
    assert "What color" not in tok.decode(data[1].input_ids)
    assert all(data[i].image is not None for i in range(3))
    assert supervised_text(tok, data[2].labels.tolist()) == "one<|im_end|>"
    with pytest.raises(ValueError, match="data.turns must be one of"):
        ConversationDataset(path, processor(), turns="some")
