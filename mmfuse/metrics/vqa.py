"""VQAv2 accuracy exactly as the official evaluation script computes it.

Reference: ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of GT-Vision-Lab/VQA (master),
``VQAEval.evaluate``, ``processPunctuation`` and ``processDigitArticle``. Per question:

1. the prediction and every annotator answer have ``\\n`` and ``\\t`` replaced by spaces and are
   stripped;
2. *only if the ten answers are not all identical* (``len(set(gtAnswers)) > 1``), the answers and
   the prediction are normalised: ``processPunctuation`` then ``processDigitArticle``. When all
   annotators agree, the official script compares the stripped strings as they are, so "Two" does
   not match ten answers "2". ``normalize_unanimous=True`` normalises in that case too (as several
   re-implementations, e.g. lmms-eval's, do); the default follows the official script;
3. accuracy = mean over the leave-one-annotator-out subsets of
   min(#matches among the other annotators / 3, 1).
   (The script drops one answer *dict* per subset; answer dicts differ by ``answer_id``, so exactly
   one annotator is left out each time, as here.)

The official script reports ``round(100 * mean, 2)``; these functions return unrounded fractions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# processDigitArticle tables. Keys with capitals ("Im", "Ive", "Id've", "I'dve") are in the
# official table but never match, because the text is lower-cased before the lookup.
# fmt: off
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
# fmt: on

_ARTICLES = ("a", "an", "the")

# processPunctuation tables. Note: "." ":" "'" are not in the list; periods have their own rule.
# fmt: off
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
# fmt: on

_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a negative look-*ahead* for the
# text "<=digit" (a typo for a look-behind) and always succeeds before a ".", so every period not
# followed by a digit goes: "3.5" stays, "5." and "a.m." lose their periods.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
# The script calls periodStrip.sub("", text, re.UNICODE): the flag lands in the ``count``
# argument, so at most re.UNICODE == 32 periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``.

    Each character of the punctuation list is deleted if it appears next to a space anywhere in
    the (original) text, or if the text contains a comma between two digits anywhere
    ("1,000" -> "1000", "red, blue" -> "red blue"); otherwise it becomes a space
    ("red,blue" -> "red blue", "t-shirt" -> "t shirt"). Then periods not followed by a digit go.
    """
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, split on whitespace, number words
    "none"/"zero".."ten" to digits, drop "a"/"an"/"the", expand apostrophe-less contractions
    ("dont" -> "don't"), join with single spaces."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str) -> str:
    """The normalisation the official script applies to an answer: newline/tab to space, strip,
    ``processPunctuation``, ``processDigitArticle``. E.g. ``"Two dogs."`` -> ``"2 dogs"``."""
    return process_digit_article(process_punctuation(_clean(text)))


def vqa_accuracy(
    prediction: str, answers: Sequence[str], normalize_unanimous: bool = False
) -> float:
    """Official VQA accuracy of one predicted answer against the annotators' answers (10 in VQAv2).

    Returns the mean over the ``len(answers)`` leave-one-out subsets of
    ``min(#other annotators whose answer equals the prediction / 3, 1)``: with 10 answers, a
    prediction given by k annotators scores 0.3 (k=1), 0.6 (k=2), 0.9 (k=3), 1.0 (k>=4).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one annotator answer")
    gts = [_clean(a) for a in answers]
    pred = _clean(prediction)
    if len(set(gts)) > 1 or normalize_unanimous:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    total = 0.0
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
        total += min(1, float(matches) / 3)
    return float(total) / len(gts)


def vqa_corpus_accuracy(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], normalize_unanimous: bool = False
) -> float:
    """Mean per-question accuracy (the official "overall" is ``round(100 * this, 2)``)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        raise ValueError("vqa_corpus_accuracy needs at least one question")
    pairs = zip(predictions, answers, strict=True)
    scores = [vqa_accuracy(p, a, normalize_unanimous) for p, a in pairs]
    return float(sum(scores)) / len(scores)
