"""Tests of mmfuse.metrics.asr: hand-computed values, and agreement with jiwer where installed."""

from __future__ import annotations

import random

import pytest

from mmfuse.metrics.asr import cer, normalize_asr_text, wer

REFS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world!",
    "It's a beautiful day in the neighbourhood",
    "one two three four five",
    "Speech   recognition\tis hard",
    "Don't stop — believing",
]
HYPS = [
    "the quick brown fox jumped over a lazy dog",
    "hello world",
    "its a beautiful day in the neighborhood today",
    "one too three five",
    "speech recognition is hard",
    "dont stop believing!",
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello,  World!", "hello world"),
        ("It's", "its"),  # the apostrophe is punctuation (Unicode category Po)
        ("state-of-the-art", "stateoftheart"),  # so are hyphens (Pd): deleted, not spaced
        ("  a\tb\nc  ", "a b c"),
        ("\u00bfQu\u00e9?", "qu\u00e9"),
        ("Don't stop \u2014 believing", "dont stop believing"),
        ("$5 + 3%", "$5 + 3"),  # "$" and "+" are symbols (Sc, Sm), "%" is punctuation (Po)
    ],
)
def test_normalize_asr_text(text, expected):
    assert normalize_asr_text(text) == expected


def test_normalize_options():
    assert normalize_asr_text("Hello, World!", lowercase=False) == "Hello World"
    assert normalize_asr_text("Hello, World!", remove_punctuation=False) == "hello, world!"


def test_wer_hand_computed():
    # After normalisation, edits per pair (reference words):
    # 1: "jumps"->"jumped", "the"->"a": 2 substitutions (9 words)
    # 2: identical (2)
    # 3: "its" = "its" (apostrophe gone), "neighbourhood"->"neighborhood" 1 sub, "today" 1 ins (7)
    # 4: "two"->"too" 1 sub, "four" deleted (5)
    # 5: identical after whitespace collapsing (4)
    # 6: identical: "dont stop believing" (3)
    # WER = (2 + 0 + 2 + 2 + 0 + 0) / (9 + 2 + 7 + 5 + 4 + 3) = 6 / 30
    assert wer(REFS, HYPS) == pytest.approx(6 / 30, abs=1e-12)
    # corpus-level, not the mean of per-utterance rates (2/9, 0, 2/7, 2/5, 0, 0)
    assert wer(REFS, HYPS) != pytest.approx((2 / 9 + 2 / 7 + 2 / 5) / 6)
    assert wer("a b c", "a b c") == 0.0
    assert wer("a b", "") == 1.0
    assert wer("a", "x y z") == 3.0  # insertions can push WER above 1
    assert wer("Hello, World", "hello world", normalizer=None) == 1.0  # "Hello," != "hello"


def test_cer_hand_computed():
    # "abc d" vs "abd": delete "c" and " " (or equivalent): 2 edits / 5 reference characters
    assert cer("abc d", "abd") == pytest.approx(2 / 5, abs=1e-12)
    # normalised: "hello world" (11 chars) vs "helo world" -> 1 deletion
    assert cer(["Hello, World!"], ["helo world"]) == pytest.approx(1 / 11, abs=1e-12)
    # two utterances: "ab" vs "ab" (0 of 2) and "cd" vs "xd" (1 of 2) -> 1 / 4
    assert cer(["ab", "cd"], ["ab", "xd"]) == pytest.approx(0.25, abs=1e-12)


def test_errors():
    with pytest.raises(ValueError):
        wer(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        wer(["", "!!"], ["a", "b"])  # no reference words at all
    assert wer(["", "a b"], ["x", "a b"]) == pytest.approx(0.5)  # one empty reference is fine


def _jiwer_transforms():
    jiwer = pytest.importorskip("jiwer")
    steps = [
        jiwer.ToLowerCase(),
        jiwer.RemovePunctuation(),
        jiwer.RemoveWhiteSpace(replace_by_space=True),
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
    ]
    words = jiwer.Compose([*steps, jiwer.ReduceToListOfListOfWords()])
    chars = jiwer.Compose([*steps, jiwer.ReduceToListOfListOfChars()])
    return jiwer, words, chars


def test_matches_jiwer():
    jiwer, words, chars = _jiwer_transforms()
    kw_w = {"reference_transform": words, "hypothesis_transform": words}
    kw_c = {"reference_transform": chars, "hypothesis_transform": chars}
    assert wer(REFS, HYPS) == pytest.approx(jiwer.wer(REFS, HYPS, **kw_w), abs=1e-9)
    assert cer(REFS, HYPS) == pytest.approx(jiwer.cer(REFS, HYPS, **kw_c), abs=1e-9)
    # no normalisation on either side: jiwer's defaults
    refs = [" ".join(r.split()) for r in REFS]
    assert wer(refs, HYPS, normalizer=None) == pytest.approx(jiwer.wer(refs, HYPS), abs=1e-9)
    assert cer(REFS, HYPS, normalizer=None) == pytest.approx(jiwer.cer(REFS, HYPS), abs=1e-9)
    # random corpora over a small vocabulary (many repeated words, so alignments are ambiguous)
    rng = random.Random(0)
    vocab = ["a", "b", "c", "ab", "Ba", "c!", "d,", "e"]
    for _ in range(30):
        n = rng.randint(1, 8)
        r = [" ".join(rng.choices(vocab, k=rng.randint(1, 12))) for _ in range(n)]
        h = [" ".join(rng.choices(vocab, k=rng.randint(0, 12))) for _ in range(n)]
        assert wer(r, h) == pytest.approx(jiwer.wer(r, h, **kw_w), abs=1e-9)
        assert cer(r, h) == pytest.approx(jiwer.cer(r, h, **kw_c), abs=1e-9)
