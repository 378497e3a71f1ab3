"""Tests of mmfuse.processing.text: tokenizer, chat template, assistant-only labels."""

from __future__ import annotations

import pytest
from helpers import fresh_tokenizer, supervised_text, tokenizer

from mmfuse.processing.text import (
    AUDIO_TOKEN,
    EOS,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    PAD,
    encode_conversation,
    load_tokenizer,
    message_text,
    user_text,
)

QUESTION = [
    {"type": "image", "path": "a.png"},
    {"type": "text", "text": "What color is the circle?"},
]
ONE_TURN = [
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
]
MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    *ONE_TURN,
    {"role": "user", "content": "What shape is it?"},
    {"role": "assistant", "content": "circle"},
]


def test_tokenizer_is_deterministic():
    first, second = fresh_tokenizer(), fresh_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert len(first) == len(second) <= 512
    text = "How many shapes and beeps are there together?"
    assert first(text)["input_ids"] == second(text)["input_ids"]


def test_special_tokens_are_single_ids():
    tok = tokenizer()
    assert tok.pad_token == PAD and tok.eos_token == EOS
    assert tok.pad_token_id != tok.eos_token_id
    for special in (PAD, EOS, IMAGE_TOKEN, AUDIO_TOKEN, "<|im_start|>"):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert ids == [tok.convert_tokens_to_ids(special)]


def test_byte_level_encodes_any_text():
    tok = tokenizer()
    text = "Zebra über 東京 🎵!"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_chat_template_renders_placeholders_and_roles():
    rendered = tokenizer().apply_chat_template(ONE_TURN, tokenize=False)
    # Checks the order of the pieces only (the newline layout is tested separately).
    pieces = [
        "<|im_start|>",
        "user",
        IMAGE_TOKEN,
        "What color is the circle?",
        EOS,
        "<|im_start|>",
        "assistant",
        "red",
        EOS,
    ]
    position = 0
    for piece in pieces:
        found = rendered.find(piece, position)
        assert found >= 0, (piece, rendered)
        position = found + len(piece)
    assert rendered.count(IMAGE_TOKEN) == 1 and "a.png" not in rendered


def test_chat_template_is_chatml():
    rendered = tokenizer().apply_chat_template(ONE_TURN, tokenize=False)
    assert rendered == (
        "<|im_start|>user\n<|image|>What color is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )


def test_supervises_exactly_the_assistant_tokens():
    tok = tokenizer()
    ids, labels = encode_conversation(tok, ONE_TURN)
    assert len(ids) == len(labels)
    assert supervised_text(tok, labels) == "red<|im_end|>"
    # labels are either the id itself or ignored; the supervised ids are one contiguous run
    # ending with the end-of-turn token, followed only by the turn's trailing newline
    assert all(label in (tok_id, IGNORE_INDEX) for tok_id, label in zip(ids, labels, strict=True))
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert supervised == list(range(supervised[0], supervised[-1] + 1))
    assert ids[supervised[-1]] == tok.eos_token_id
    assert tok.decode(ids[supervised[-1] + 1 :]) == "\n"


def test_multi_turn_supervises_both_answers_only():
    tok = tokenizer()
    ids, labels = encode_conversation(tok, MULTI_TURN)
    assert supervised_text(tok, labels) == "red<|im_end|>circle<|im_end|>"
    pairs = zip(ids, labels, strict=True)
    unsupervised = tok.decode([i for i, label in pairs if label == IGNORE_INDEX])
    for text in ("You are a helpful assistant.", "What color is the circle?", "What shape is it?"):
        assert text in unsupervised
    assert "red" not in unsupervised and "circle<|im_end|>" not in unsupervised
    # two runs of supervised tokens, each ending with the end-of-turn token
    runs, previous = [], IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX and previous == IGNORE_INDEX:
            runs.append([])
        if label != IGNORE_INDEX:
            runs[-1].append(label)
        previous = label
    assert len(runs) == 2 and all(run[-1] == tok.eos_token_id for run in runs)


@pytest.mark.parametrize("answer", ["one", "two", "top left", "yes", "sawtooth"])
def test_supervised_answer_does_not_merge_with_role(answer):
    tok = tokenizer()
    ids, labels = encode_conversation(tok, [ONE_TURN[0], {"role": "assistant", "content": answer}])
    assert supervised_text(tok, labels) == answer + "<|im_end|>"


def test_generation_prompt_ends_with_assistant_header_and_has_no_labels():
    tok = tokenizer()
    ids, labels = encode_conversation(tok, ONE_TURN[:1], add_generation_prompt=True)
    assert labels == [IGNORE_INDEX] * len(ids)
    assert tok.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert ids[-len(header) :] == header
    # the prompt is the training sequence up to the answer
    train_ids, train_labels = encode_conversation(tok, ONE_TURN)
    first_supervised = next(i for i, label in enumerate(train_labels) if label != IGNORE_INDEX)
    assert train_ids[:first_supervised] == ids


def test_save_and_load_round_trip(tmp_path):
    tok = tokenizer()
    tok.save_pretrained(str(tmp_path / "tok"))
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.pad_token_id == tok.pad_token_id and loaded.eos_token_id == tok.eos_token_id
    for conversation in (ONE_TURN, MULTI_TURN):
        assert encode_conversation(loaded, conversation) == encode_conversation(tok, conversation)
    assert encode_conversation(loaded, ONE_TURN[:1], True) == encode_conversation(
        tok, ONE_TURN[:1], True
    )


def test_load_tokenizer_without_template_raises(tmp_path):
    tok = fresh_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(tmp_path / "tok")


def test_user_text_and_message_text():
    assert user_text(MULTI_TURN) == "What color is the circle?\nWhat shape is it?"
    assert message_text(ONE_TURN[1]) == "red"
    assert message_text({"role": "assistant", "content": "plain"}) == "plain"
    assert (
        message_text(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "image"},
                    {"type": "text", "text": "b"},
                ],
            }
        )
        == "ab"
    )
