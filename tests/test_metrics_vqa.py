"""Tests of mmfuse.metrics.vqa against the official VQA evaluation (GT-Vision-Lab/VQA vqaEval.py).

Expected values are derived by hand from the official rules (derivations in the comments) and, in
``test_matches_official_transcription``, compared with an independent, line-by-line transcription
of the official ``VQAEval.evaluate`` loop (dict answers with ids, the official regexes verbatim).
"""

from __future__ import annotations

import random
import re

import pytest

from mmfuse.metrics.vqa import (
    normalize_vqa_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_corpus_accuracy,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # punctuation next to a space anywhere in the text is deleted ...
        ("yes !", "yes"),  # " !" occurs -> "!" deleted -> "yes " -> "yes"
        ("red, blue", "red blue"),  # ", " occurs -> "," deleted
        ("(left)", "left"),  # "(" and ")" not next to a space -> spaces -> " left " -> "left"
        # ... otherwise it becomes a space, which splits words
        ("red,blue", "red blue"),
        ("t-shirt", "t shirt"),
        ("black/white", "black white"),
        ("black / white", "black white"),  # deleted: "black  white", split/join -> one space
        ("yes!", "yes"),
        ("hot_dog", "hot dog"),
        ("@home", "home"),
        # a comma between digits anywhere deletes *every* listed punctuation mark
        ("1,000", "1000"),
        ("1,000-2,000", "10002000"),  # "-" deleted too, not spaced
        ("t-shirt 1,000", "tshirt 1000"),
        # ":" and "'" are not in the official list and survive
        ("10:30", "10:30"),
        ("don't", "don't"),
        # periods go unless a digit follows
        ("yes.", "yes"),
        ("3.5", "3.5"),
        ("5.0.", "5.0"),
        ("a.m.", "am"),
        ("st. louis", "st louis"),
        # number words to digits (whole words only), before article removal
        ("Two", "2"),
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("twenty one", "twenty 1"),
        ("one.", "1"),
        # articles a / an / the removed
        ("a dog", "dog"),
        ("An Apple", "apple"),
        ("the man", "man"),
        ("a a the", ""),
        ("another", "another"),
        # contractions: missing apostrophe restored ...
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("cant", "can't"),
        ("oclock", "o'clock"),
        ("yall", "y'all"),
        ("twas", "'twas"),
        # ... double contractions, both spellings
        ("hed've", "he'd've"),
        ("he'dve", "he'd've"),
        ("y'allll", "y'all'll"),
        # ... and the table's oddities: an entry mapping to itself, one that *removes* the
        # apostrophe, and capitalised keys that never match the lower-cased text
        ("let's", "let's"),
        ("somebody'd", "somebodyd"),
        ("Im", "im"),
        ("Ive", "ive"),
        # newline / tab to space and surrounding whitespace
        ("\tyes\n", "yes"),
        ("two\ndogs", "2 dogs"),
        ("  The  Two   Dogs.  ", "2 dogs"),
        ("", ""),
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert normalize_vqa_answer(text) == expected


def test_period_strip_count_quirk():
    # The script passes re.UNICODE (32) as ``count``: only the first 32 periods go.
    assert process_punctuation("x" + "." * 40) == "x" + "." * 8
    assert process_punctuation("." * 32) == ""


def test_steps_separately():
    assert process_punctuation("A dog, two cats.") == "A dog two cats"
    assert process_digit_article("A dog two cats") == "dog 2 cats"


def _answers(k: int, match: str = "2", other: str = "3") -> list[str]:
    return [match] * k + [other] * (10 - k)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        # With k of 10 annotators giving the predicted answer, the 10 leave-one-out subsets are:
        # k subsets without a matching annotator (k-1 matches left) and 10-k with k matches left,
        # so acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10.
        (0, 0.0),
        (1, 0.3),  # (1*0 + 9*(1/3)) / 10
        (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = 6/10
        (3, 0.9),  # (3*(2/3) + 7*1) / 10 = 9/10
        (4, 1.0),  # (4*1 + 6*1) / 10
        (9, 1.0),
    ],
)
def test_leave_one_out(k, expected):
    assert vqa_accuracy("2", _answers(k)) == pytest.approx(expected, abs=1e-6)


def test_normalisation_applies_to_answers_and_prediction():
    answers = ["two", "Two.", "2", "the 2"] + ["3"] * 6  # all normalise to "2" -> k = 4
    assert vqa_accuracy("Two!", answers) == pytest.approx(1.0, abs=1e-6)
    assert vqa_accuracy("2 ", answers) == pytest.approx(1.0, abs=1e-6)
    answers = ["Yes"] * 2 + ["no"] * 8  # "yes" after lower-casing: k = 2
    assert vqa_accuracy("YES.", answers) == pytest.approx(0.6, abs=1e-6)


def test_unanimous_answers_are_not_normalised():
    # When all ten answers are the same string the official script skips normalisation of both
    # sides: only the newline/tab replacement and strip() apply.
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy(" 2\n", ["2"] * 10) == 1.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("2.", ["2"] * 10) == 0.0
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10, normalize_unanimous=True) == 1.0
    # a stray space is enough to break unanimity, and then normalisation applies
    assert vqa_accuracy("two", ["2"] * 9 + ["2 "]) == 0.0  # strip() makes them equal again
    assert vqa_accuracy("two", ["2"] * 9 + ["2."]) == pytest.approx(1.0, abs=1e-6)


def test_other_answer_counts():
    assert vqa_accuracy("2", ["2", "3", "4"]) == pytest.approx((0 + 1 / 3 + 1 / 3) / 3)
    with pytest.raises(ValueError):
        vqa_accuracy("2", [])


def test_corpus_accuracy():
    preds = ["2", "yes", "red"]
    answers = [_answers(1), _answers(3, "yes", "no"), _answers(0, "blue", "green")]
    assert vqa_corpus_accuracy(preds, answers) == pytest.approx((0.3 + 0.9 + 0.0) / 3, abs=1e-6)
    with pytest.raises(ValueError):
        vqa_corpus_accuracy(["2"], [])


# --- independent transcription of the official algorithm ------------------------------------


class _OfficialVQAEval:
    """The official VQAEval.evaluate / processPunctuation / processDigitArticle, transcribed."""

    manual_map = {
        "none": "0",
        "zero": "0",
        "one": "1",
        "two": "2",
        "three": "3",
        "four": "4",
        "five": "5",
        "six": "6",
        "seven": "7",
        "eight": "8",
        "nine": "9",
        "ten": "10",
    }
    articles = ["a", "an", "the"]
    # a few entries of the official table, enough for the generated answers below
    contractions = {
        "dont": "don't",
        "isnt": "isn't",
        "yall": "y'all",
        "Im": "I'm",
        "somebody'd": "somebodyd",
        "oclock": "o'clock",
    }
    period_strip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    comma_strip = re.compile(r"(\d)(\,)(\d)")
    punct = [
        ";",
        r"/",
        "[",
        "]",
        '"',
        "{",
        "}",
        "(",
        ")",
        "=",
        "+",
        "\\",
        "_",
        "-",
        ">",
        "<",
        "@",
        "`",
        ",",
        "?",
        "!",
    ]

    def process_punctuation(self, in_text):
        out_text = in_text
        for p in self.punct:
            if (p + " " in in_text or " " + p in in_text) or (
                re.search(self.comma_strip, in_text) is not None
            ):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        return self.period_strip.sub("", out_text, count=re.UNICODE)

    def process_digit_article(self, in_text):
        out_text = []
        for word in in_text.lower().split():
            word = self.manual_map.setdefault(word, word)
            if word not in self.articles:
                out_text.append(word)
        for word_id, word in enumerate(out_text):
            if word in self.contractions:
                out_text[word_id] = self.contractions[word]
        return " ".join(out_text)

    def accuracy(self, res_ans, gt_answers):
        answers = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(gt_answers)]
        for ans_dic in answers:
            ans_dic["answer"] = ans_dic["answer"].replace("\n", " ").replace("\t", " ").strip()
        res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
        if len({a["answer"] for a in answers}) > 1:
            for ans_dic in answers:
                ans_dic["answer"] = self.process_punctuation(ans_dic["answer"])
                ans_dic["answer"] = self.process_digit_article(ans_dic["answer"])
            res_ans = self.process_punctuation(res_ans)
            res_ans = self.process_digit_article(res_ans)
        gt_acc = []
        for gt_ans_datum in answers:
            other_gt_ans = [item for item in answers if item != gt_ans_datum]
            matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
            gt_acc.append(min(1, float(len(matching_ans)) / 3))
        return float(sum(gt_acc)) / len(gt_acc)


_POOL = [
    "2",
    "two",
    "Two.",
    "the 2",
    "3",
    "1,000",
    "1000",
    "yes",
    "Yes",
    "yes!",
    "no",
    "dont",
    "don't",
    "a dog",
    "dog",
    "t-shirt",
    "t shirt",
    "red, blue",
    "red,blue",
    "3.5",
    "3.5.",
    "Im",
    "im",
    "y'all",
    "yall",
    "oclock",
    " 2\n",
    "2\t",
    "(left)",
    "left",
    "none",
    "0",
    "a.m.",
    "am",
    "black/white",
    "black white",
    "x" + "." * 40,
]


def test_matches_official_transcription():
    official = _OfficialVQAEval()
    rng = random.Random(0)
    for _ in range(400):
        if rng.random() < 0.2:
            answers = [rng.choice(_POOL)] * 10  # unanimous
        else:
            answers = [rng.choice(_POOL[: rng.randint(2, len(_POOL))]) for _ in range(10)]
        pred = rng.choice(_POOL)
        assert vqa_accuracy(pred, answers) == pytest.approx(
            official.accuracy(pred, answers), abs=1e-12
        ), (pred, answers)
    for text in _POOL:
        expected = official.process_digit_article(official.process_punctuation(text.strip()))
        assert normalize_vqa_answer(text) == expected
