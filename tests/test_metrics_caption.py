"""Tests of mmfuse.metrics.caption against pycocoevalcap 1.2 (BLEU, ROUGE-L, CIDEr-D, PTB tokens).

The expected tokens below are what pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, Java)
returns for each caption; the expected scores are pycocoevalcap's for the fixture. Where
pycocoevalcap (and Java, for the tokenizer) are installed, the tests also recompute them live.
"""

from __future__ import annotations

import math
import shutil

import pytest

from mmfuse.metrics.caption import bleu, caption_scores, cider_d, rouge_l, tokenize_ptb

PREDICTIONS = {
    "img1": "A man riding a wave on top of a surfboard.",
    "img2": "a a a a man man man",  # repeated words: clipped counts
    "img3": "A dog.",  # short
    "img4": "Purple elephants dance quietly",  # no n-gram in common with its references
    "img5": "A man, wearing a hat (red), rides a horse!",  # punctuation and brackets
    "img6": "Two giraffes.",  # short
    "img7": "A kitchen with a stove and a sink.",
    "img8": "The cat's sitting on the laptop's keyboard",
    "img9": "A plate of food with broccoli and rice",
    "img10": "People are walking down the street in the rain",
}
REFERENCES = {
    "img1": [
        "A surfer rides a large wave in the ocean.",
        "A man riding a wave on a surfboard.",
        "a person on a surf board riding a wave",
        "The surfer is riding the big wave!",
    ],
    "img2": [
        "A man standing in a field.",
        "a man is standing on the grass",
        "A young man stands alone in a grassy field.",
    ],
    "img3": [
        "A brown dog lying on a wooden floor.",
        "a dog is resting on the floor of a room",
        "The dog sleeps on the hardwood floor.",
    ],
    "img4": [
        "A kitchen with white cabinets and a stove.",
        "an empty kitchen with a gas stove",
        "A clean kitchen, with appliances.",
    ],
    "img5": [
        "A man in a red hat riding a brown horse.",
        "A cowboy (wearing a hat) rides a horse.",
        "a person on horseback, wearing a red cap",
        "Man riding a horse in a field.",
    ],
    "img6": [
        "Two giraffes standing next to a tall tree.",
        "A pair of giraffes near a tree.",
        "two giraffes eating leaves from a tree",
    ],
    "img7": [
        "A kitchen with a stove, a sink and a refrigerator.",
        "a small kitchen with a sink",
        "The kitchen has a stove and a sink.",
        "A kitchen that has a stove in it.",
    ],
    "img8": [
        "A cat sitting on a laptop keyboard.",
        "The cat is lying on the laptop's keys.",
        "a cat sits on top of a computer keyboard",
    ],
    "img9": [
        "A plate of rice and broccoli.",
        "A white plate with food: rice, broccoli and meat.",
        "a plate of food with broccoli",
        "Broccoli and rice on a plate.",
    ],
    "img10": [
        "People walking down a street in the rain.",
        "Pedestrians with umbrellas on a rainy street.",
        "A crowd of people walk in the rain down the street",
        "people walk down a wet street",
    ],
}
# pycocoevalcap 1.2 (COCOEvalCap pipeline: PTBTokenizer, then Bleu(4), Rouge(), Cider()).
EXPECTED = {
    "BLEU-1": 0.7286049066309506,
    "BLEU-2": 0.6535540123804793,
    "BLEU-3": 0.556964669170983,
    "BLEU-4": 0.46567699634168036,
    "ROUGE-L": 0.600856501975797,
    "CIDEr-D": 1.9520620736071561,
}

# (caption, tokens) as pycocoevalcap's Java PTBTokenizer + PUNCTUATIONS filter return them.
TOKEN_CASES = [
    ("A man riding a horse.", ["a", "man", "riding", "a", "horse"]),
    ("The dog's toy isn't new.", ["the", "dog", "'s", "toy", "is", "n't", "new"]),
    # brackets become -LRB- etc.; lower-cased, they escape the upper-case PUNCTUATIONS filter
    (
        "A man (in a red shirt) [left] {x}",
        "a man -lrb- in a red shirt -rrb- -lsb- left -rsb- -lcb- x -rcb-".split(),
    ),
    ('He said "hi"... then `left\'', ["he", "said", "hi", "then", "left"]),
    (
        "Two people walk/run on 5th Ave. at 3:30 p.m.",
        ["two", "people", "walk/run", "on", "5th", "ave.", "at", "3:30", "p.m."],
    ),
    (
        "She can't, won't; gonna wanna cannot.",
        ["she", "ca", "n't", "wo", "n't", "gon", "na", "wan", "na", "can", "not"],
    ),
    (
        "A black-and-white cat costs $1,000.50 & 20% off?",
        ["a", "black-and-white", "cat", "costs", "$", "1,000.50", "&", "20", "%", "off"],
    ),
    (
        "\u201cCurly quotes\u201d and it\u2019s an en\u2013dash\u2026 ok",
        ["curly", "quotes", "and", "it", "'s", "an", "en", "dash", "ok"],
    ),
    ("The kids' toys!! Dogs'", ["the", "kids", "toys", "!!", "dogs"]),  # "!!" is not filtered
    (
        "o'clock ma'am rock'n'roll y'all 'tis",
        ["o'clock", "ma'am", "rock", "'n'", "roll", "y'", "all", "'t", "is"],
    ),
    ("2 1/2 cups", ["2\u00a01/2", "cups"]),  # one token, no-break space
    ("the letter a. The end", ["the", "letter", "a", "the", "end"]),  # sentence end before "The"
    ("vitamin c. and plan B. ok", ["vitamin", "c.", "and", "plan", "b.", "ok"]),
    ("Mass. mass. Inc.x Mr.x etc.", ["mass.", "mass", "inc.", "x", "mr.x", "etc."]),
    ("a -- b --- c ----- d - e", ["a", "b", "c", "-----", "d", "e"]),
    ("I'M HE'D YOU'RE DON'T", ["i", "'m", "he", "'d", "you", "'re", "do", "n't"]),
    ("Fig. 5 and no. 3 but no. a", ["fig.", "5", "and", "no.", "3", "but", "no", "a"]),
    ("the u.s. flag; e.g., a.k.a. x", ["the", "u.s.", "flag", "e.g.", "a.k.a.", "x"]),
    ("\u00a35 and \u20ac3 and \u00bd cup", ["#", "5", "and", "$", "3", "and", "1/2", "cup"]),
    (
        "3-year-old x-ray t-shirts, 1990s '90s 10am",
        ["3-year-old", "x-ray", "t-shirts", "1990s", "'90s", "10am"],
    ),
    ("word.,  next: ok?!", ["word.", "next", "ok", "?!"]),
    ("#tag @user a@b.com www.example.com", ["#tag", "@user", "a@b.com", "www.example.com"]),
    ("...", []),
    ("", []),
]


@pytest.mark.parametrize(("caption", "tokens"), TOKEN_CASES)
def test_tokenize_ptb(caption, tokens):
    assert tokenize_ptb(caption) == tokens


def test_hand_derived_bleu_rouge():
    # hyp "a b c d" vs ref "a b c d e": all n-grams of the hypothesis match, so each precision is
    # (c + 1e-15) / (c + 1e-9) ~ 1; testlen 4 < reflen 5 -> BP = exp(1 - 5/4) = exp(-0.25).
    scores = bleu(["a b c d"], [["a b c d e"]])
    assert scores == pytest.approx([math.exp(-0.25)] * 4, abs=1e-9)
    # "closest" reference length: refs of 3 and 6 words for a 4-word hypothesis -> 3 (no BP);
    # BLEU-1 = 3 matched unigrams ("a", "b", "c") / 4.
    assert bleu(["a b c x"], [["a b c", "a b c d e f"]])[0] == pytest.approx(0.75, abs=1e-9)
    # repeated words are clipped by the max count in any one reference: "a a a a" vs "a a b"
    # -> 2 of 4 unigrams; BP: testlen 4 vs 3 -> none.
    assert bleu(["a a a a"], [["a a b"]])[0] == pytest.approx(0.5, abs=1e-9)
    # ROUGE-L, LCS 4: P = 4/4, R = 4/5, F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 1.952 / 2.24.
    assert rouge_l(["a b c d"], [["a b c d e"]]) == pytest.approx(1.952 / 2.24, abs=1e-12)
    # max P and max R are taken over references separately, then combined:
    # ref1 "a b": P = 2/3, R = 1; ref2 "a b c x y z": P = 1, R = 1/2 -> P = 1, R = 1.
    assert rouge_l(["a b c"], [["a b", "a b c x y z"]]) == pytest.approx(1.0, abs=1e-12)
    assert rouge_l(["x y"], [["a b"]]) == 0.0


def test_hand_derived_cider_d():
    # Two images, hypothesis == single reference. N = 2 images; every n-gram occurs in the
    # references of one image only: idf = log(2) - log(1) = log 2. Unigrams and bigrams have
    # cosine 1; there are no 3- and 4-grams (zero norms -> 0). Equal lengths -> no penalty.
    # Per image: mean over n = (1 + 1 + 0 + 0) / 4 = 0.5, one reference, times 10 = 5.
    assert cider_d(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0, abs=1e-12)
    # With a single image every idf is log(1) - log(1) = 0, so CIDEr-D is 0 whatever the text.
    assert cider_d(["a b"], [["a b"]]) == 0.0
    # Clipping and the length penalty: image 1 hyp "a b c" vs ref "a b", image 2 as above
    # (score 5). idf = log 2 for every n-gram (df 1, or df 0 -> max(1, 0) = 1 for "c" etc.).
    # Unigrams: hyp (L, L, L) . ref (L, L, 0) = 2L^2 over sqrt(3)L * sqrt(2)L -> 2/sqrt(6);
    # bigrams: hyp {ab, bc}, ref {ab} -> 1/sqrt(2); trigrams: the ref norm is 0 -> 0.
    # "Length" is the bigram count (2 vs 1): penalty exp(-1 / (2 * 6^2)).
    image1 = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    got = cider_d(["a b c", "d e"], [["a b"], ["d e"]])
    assert got == pytest.approx((image1 + 5.0) / 2, abs=1e-12)


def test_caption_scores_fixture():
    scores = caption_scores(PREDICTIONS, REFERENCES)
    assert set(scores) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert scores[key] == pytest.approx(value, abs=1e-9), key


def test_caption_scores_validation():
    with pytest.raises(ValueError):
        caption_scores({"a": "x"}, {"b": ["x"]})
    with pytest.raises(ValueError):
        caption_scores({"a": "x"}, {"a": []})
    with pytest.raises(ValueError):
        caption_scores({}, {})


def _pycocoevalcap_scores(gts: dict, res: dict) -> dict:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    r, _ = Rouge().compute_score(gts, res)
    c, _ = Cider().compute_score(gts, res)
    return {
        "BLEU-1": b[0],
        "BLEU-2": b[1],
        "BLEU-3": b[2],
        "BLEU-4": b[3],
        "ROUGE-L": float(r),
        "CIDEr-D": float(c),
    }


def test_scorers_match_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    # pre-tokenised text: the scorers alone (pure Python in pycocoevalcap, no Java needed)
    gts = {k: [" ".join(tokenize_ptb(r)) for r in v] for k, v in REFERENCES.items()}
    res = {k: [" ".join(tokenize_ptb(PREDICTIONS[k]))] for k in REFERENCES}
    expected = _pycocoevalcap_scores(gts, res)
    ours = caption_scores({k: v[0] for k, v in res.items()}, gts, tokenize=False)
    for key in expected:
        assert ours[key] == pytest.approx(expected[key], abs=1e-9), key
    # the length-penalty case from test_hand_derived_cider_d, plus an empty hypothesis
    gts2 = {1: ["a b"], 2: ["c d e"], 3: ["f g"]}
    res2 = {1: ["a b c"], 2: ["c d e"], 3: [""]}
    expected = _pycocoevalcap_scores(gts2, res2)
    ours = caption_scores({k: v[0] for k, v in res2.items()}, gts2, tokenize=False)
    for key in expected:
        assert ours[key] == pytest.approx(expected[key], abs=1e-9), key


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer needs Java")
def test_end_to_end_matches_pycocoevalcap_with_java_tokenizer():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    extra = {f"case{i}": [caption] for i, (caption, _) in enumerate(TOKEN_CASES)}
    refs = {**REFERENCES, **extra}
    preds = {**PREDICTIONS, **{k: v[0] for k, v in extra.items()}}
    tokenizer = PTBTokenizer()  # as COCOEvalCap: one Java run for gts, one for res
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tokenizer.tokenize({k: [{"caption": preds[k]}] for k in refs})
    for key, caps in refs.items():
        assert [" ".join(tokenize_ptb(c)) for c in caps] == gts[key], key
    for (caption, tokens), key in zip(TOKEN_CASES, extra, strict=True):
        assert gts[key] == [" ".join(tokens)], caption
    expected = _pycocoevalcap_scores(gts, res)
    ours = caption_scores(preds, refs)
    for key in expected:
        assert ours[key] == pytest.approx(expected[key], abs=1e-9), key
    # and the fixture on its own reproduces the stored values
    gts = {k: v for k, v in gts.items() if k in REFERENCES}
    res = {k: v for k, v in res.items() if k in REFERENCES}
    expected = _pycocoevalcap_scores(gts, res)
    for key, value in EXPECTED.items():
        assert expected[key] == pytest.approx(value, abs=1e-9), key
