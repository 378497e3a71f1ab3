"""COCO caption metrics computed exactly as pycocoevalcap 1.2 computes them.

What is reproduced, and from where (pycocoevalcap, the pip package of tylin/coco-caption):

- ``tokenize_ptb``: ``tokenizer/ptbtokenizer.py``. That wrapper pipes every caption, one per line,
  through Stanford CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` (Java) and then drops
  the tokens listed in ``PUNCTUATIONS``. Here the Java step is a Python re-implementation of the
  PTB lexer rules that matter for English captions (see ``_RULES``): contractions (``do n't``,
  ``it 's``, ``gon na``, ``can not``), abbreviations that keep their period (``mr.``, ``st.``,
  ``u.s.``), numbers, hyphenated and slashed words, PTB3 escaping of brackets (``-lrb-``; note the
  lower-casing means pycocoevalcap's upper-case ``-LRB-`` filter never removes them), quotes,
  dashes and ellipses. Exotic input (URLs, e-mail, SGML, emoji, rare Unicode symbols) is handled
  approximately; see the module's tests for what is checked against the Java tokenizer.
- BLEU-1..4: ``bleu/bleu_scorer.py`` with ``option="closest"``: corpus-level clipped n-gram counts,
  the reference length closest to each hypothesis (ties go to the shorter one), the ``tiny=1e-15``
  and ``small=1e-9`` terms, and the brevity penalty applied when the corpus length ratio is < 1.
- ROUGE-L: ``rouge/rouge.py``: per image, LCS precision and recall against each reference, the
  *maximum* precision and the maximum recall (taken separately), F with ``beta=1.2``; the mean over
  images. Tokens are split on single spaces there, as here.
- CIDEr-D: ``cider/cider_scorer.py`` (pycocoevalcap's ``Cider`` class is CIDEr-D): n = 1..4,
  document frequencies from the references of the evaluated corpus, idf = log(#images) -
  log(max(1, df)), clipped tf-idf (``min(hyp, ref) * ref``), cosine per n, the Gaussian length
  penalty with sigma = 6 (whose "length" is, as in the reference, the number of *bigrams*), the mean
  over n, the mean over references, times 10, and the mean over images.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np

# Tokens pycocoevalcap removes after PTB tokenisation (ptbtokenizer.py, verbatim list).
# fmt: off
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
     "...", ";"]
)
# fmt: on


# ---------------------------------------------------------------------------------------------
# PTB tokeniser (Stanford CoreNLP 3.4.1 PTBLexer, default PTB3 escaping, as pycocoevalcap runs it)
# ---------------------------------------------------------------------------------------------
# The lexer picks the longest match among all rules at the current position (trailing context
# counts towards the length), earlier rules winning ties. Each rule below is a regex whose group
# "t" is the token text; whatever the regex matches after "t" is trailing context only.

# A letter: \w minus digits, "_" and the No-category characters Python counts as \w (½, ²).
_L = r"[^\W\d_\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f\u2460-\u24ff]"
_AN = rf"(?:{_L}|\d)"  # a letter or digit
_APOS = "['\u2019]"
_WORD = rf"{_L}(?:{_L}|\d)*(?:[.!?]{_L}(?:{_L}|\d)*)*"
_REDAUX = rf"{_APOS}(?i:m|s|d|re|ve|ll)"
_NUM = r"\d+(?:[.:,]\d+)*|(?:[.:,]\d+)+"
_NUMBER = rf"[-+]?(?:{_NUM})"
_THING_PRE = rf"[dDoOlL]{_APOS}{_AN}"
_THING_PART = rf"(?:{_THING_PRE})?(?:\d+(?:[.,]\d+)+|{_AN}+)"
_THING = rf"{_THING_PART}(?:[-_]{_THING_PART})*"

# Abbreviations that keep their period in every context (probed on the 3.4.1 jar). Case matters
# where the Java lexer uses a character class: "Mass." is an abbreviation, "mass." is not.
# ABBREV1 (months, states, company suffixes, "etc.") also wins over a longer plain word, because
# its Java rule counts two characters of trailing context: "Inc.x" -> "inc." "x", "Mr.x" -> "mr.x".


def _abbrev_regex(any_case: str, capitalised: str = "", extra: str = "") -> str:
    words = sorted(any_case.split(), key=len, reverse=True)
    alternatives = ["(?i:" + "|".join(re.escape(w) for w in words) + ")"]
    alternatives += [f"{w[0].upper()}(?i:{w[1:]})" for w in capitalised.split()]
    alternatives += [extra] if extra else []
    return "(?:" + "|".join(alternatives) + r")\."


_ABBREV1 = _abbrev_regex(
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri "
    "ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla penn "
    "tenn va vt wis wisc wyo inc co cos corp ltd plc rt bancorp bhd assn univ intl sys tel est ext "
    "sq jr sr bros ed.d ph.d esq etc al seq bldg",
    capitalised="az ark del ill la mass miss ore pa tex wash",
    extra="(?i:p)(?i:p)?(?i:t)[ye](?i:s)?",  # Pty., Ptes.: the [ye] is case-sensitive in Java
)
_ABBREV2 = _abbrev_regex(
    "adj adm adv assoc asst atty attys brig capt cmdr col comdr cpl det dr drs ens gen gov govs "
    "hon insp lieut lt maj messrs mlle mme mr mrs ms msgr mt pfc pres prof profs pvt rep reps rev "
    "rt sen sens sfc sgt spc st ste supt supts ft ave invt elec natl dept blvd rd cf cie jos wm "
    "treas ph vs",
    capitalised="miss",
    extra=r"(?i:m)[ft](?i:g)|[A-Za-z](?:\.[A-Za-z])*",  # Mfg., Mtg.; acronyms "u.s.", "a."
)
# Abbreviations that keep their period only before a digit ("no. 5", "fig. 2").
_ABBREV_BEFORE_DIGIT = r"(?i:ca|figs?|prop|nos?|art|pp|op)\."
# A single letter or letter.letter acronym followed by one of these capitalised words is read as
# a sentence end: "the letter a. The" -> "a" "." but "vitamin c. and" -> "c.".
_SENTENCE_STARTERS = (
    "A About According Additionally After An As At But Earlier He Her Here However If In It Last "
    "Many More Mr. Ms. Now Once One Other Our She Since So Some Such That The Their Then There "
    "These They This We When While What Yet You"
).split()
_STARTER = "|".join(f"{w[0]}(?i:{re.escape(w[1:])})" for w in _SENTENCE_STARTERS)

# fmt: off
_ASSIMILATIONS = [("can", "not"), ("'t", "was|is"), ("gon", "na"), ("got", "ta"), ("lem", "me"),
                  ("gim", "me"), ("wan", "na")]
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_CHAR_MAP = {"\u20ac": "$", "\u00a3": "#", "\u00a2": "cents", "\u00bc": "1/4", "\u00bd": "1/2",
             "\u00be": "3/4", "\u2013": "--", "\u2014": "--", "\u2015": "--", "\u2026": "...",
             "&amp;": "&", "\u2018": "`", "\u2019": "'", "\u201c": "``", "\u201d": "''", '"': "``"}
# fmt: on


Action = Callable[[re.Match], list[str]]


def _keep(m: re.Match) -> list[str]:
    return [m["t"]]


def _ascii_apostrophe(m: re.Match) -> list[str]:
    return [m["t"].replace("\u2019", "'")]


def _acronym_at_sentence_end(m: re.Match) -> list[str]:
    tok = m["t"]  # "a." -> "a" "."; "u.s." -> "u.s." "." (the PTB3 period reduplication)
    return [tok[:-1], "."] if len(tok) == 2 else [tok, "."]


def _dashes(m: re.Match) -> list[str]:
    return ["--"] if 2 <= len(m["t"]) <= 4 else [m["t"]]


def _mapped(m: re.Match) -> list[str]:
    # Quotes all map to tokens pycocoevalcap drops, so `` versus '' does not matter here.
    return [_CHAR_MAP.get(m["t"], m["t"])]


def _brackets(m: re.Match) -> list[str]:
    return ["".join(_BRACKETS.get(c, c) for c in m["t"])]


def _nbsp(m: re.Match) -> list[str]:
    return [m["t"].replace(" ", "\u00a0")]  # normalizeSpace: "2 1/2" is one token "2\xa01/2"


def _rule(pattern: str, action: Action = _keep) -> tuple[re.Pattern, Action]:
    return re.compile(pattern), action


_RULES = [
    # "cannot" -> "can" "not", "gonna" -> "gon" "na": the lexer returns the first part and reads
    # the rest again ("'twasis" -> "'t" "wasis").
    *[_rule(rf"(?P<t>(?i:{head}))(?i:{rest})") for head, rest in _ASSIMILATIONS],
    # words before clitics: "i'd've" -> "i"; "don't" -> "do"; "dog's" -> "dog"
    _rule(rf"(?P<t>{_WORD}){_REDAUX}{_REDAUX}"),
    _rule(rf"(?P<t>[A-Za-z]*[A-MO-Za-mo-z])(?i:n{_APOS}t)(?:{_REDAUX})?"),
    _rule(rf"(?P<t>{_WORD}){_REDAUX}(?!{_L})"),
    # words that keep an apostrophe: "y'" (all), "'n'", "'em", "'90s", "ol'", "ma'am", "O'Neil"
    _rule(rf"(?P<t>(?i:th|y){_APOS}){_WORD}"),
    _rule(
        rf"(?P<t>'(?i:n)(?:{_APOS}|(?!{_L}))|\u2019(?i:n){_APOS}?"
        rf"|{_APOS}(?i:em|till?|cause)|{_APOS}[2-9]0(?i:s)|{_APOS}\d\d(?=\s)"
        rf"|(?i:ol{_APOS}|c{_APOS}mon|li{_APOS}l|nat{_APOS}l|e{_APOS}er)"
        rf"|[A-HJ-XZn]['\u2019`]{_L}{{2,}}|{_L}+[aeiouyAEIOUY]['\u2019`\u2018][aeiouA-Z]{_L}*)"
    ),
    _rule(rf"(?P<t>{_WORD})"),
    # clitics on their own; after a straight apostrophe only before a non-letter ("'dog" is a
    # quote and a word), after a curly one anywhere ("\u2019dog" -> "'d" "og")
    _rule(rf"(?P<t>'(?i:m|s|d|re|ve|ll)(?!{_L})|\u2019(?i:m|s|d|re|ve|ll))", _ascii_apostrophe),
    _rule(rf"(?P<t>(?i:n{_APOS}t))(?!{_L})", _ascii_apostrophe),
    # numbers: fractions ("2 1/2" is one token), decimals, times, hyphenated and slashed words
    _rule(r"(?P<t>(?:\d{1,4}[- \u00a0])?\d{1,4}\\?/\d{1,4})", _nbsp),
    _rule(rf"(?P<t>{_NUMBER})"),
    _rule(rf"(?P<t>{_THING})"),
    _rule(rf"(?P<t>{_AN}[\w.,]*(?:-(?:[A-Za-z](?:\.[A-Za-z])+\.|{_AN}+))+)"),
    _rule(r"(?P<t>(?i:c\+\+|[cf]#))"),
    _rule(r"(?P<t>[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2})"),
    _rule(r"(?P<t>[A-Z]+(?:&[A-Z]+)+)"),  # AT&T
    # abbreviations and acronyms keeping their period
    _rule(rf"(?P<t>[A-Za-z](?:\.[A-Za-z])*\.)\s+(?:{_STARTER})\s", _acronym_at_sentence_end),
    _rule(rf"(?P<t>{_ABBREV_BEFORE_DIGIT})\s?\d"),
    _rule(rf"(?P<t>{_ABBREV1})(?s:..)?"),
    _rule(rf"(?P<t>{_ABBREV2})"),
    _rule(rf"(?P<t>{_WORD}\.)[,;:]"),  # "word.," keeps its period
    # web and social tokens
    _rule(r"(?P<t>(?:https?|ftp)://[^\s<>\"'()\[\]{}]*[^\s<>\"'()\[\]{}.,;:!?-])"),
    _rule(r"(?P<t>[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"),
    _rule(r"(?P<t>www\.(?:[^\s.()]+\.)+[a-zA-Z]{2,4}|(?:[^\s.()/:$]+\.)+(?:com|net|org|edu))"),
    _rule(rf"(?P<t>@[A-Za-z_][A-Za-z0-9_]*|#{_L}+)"),
    _rule(r"(?P<t></?[A-Za-z!][^>\n]*>)", _nbsp),  # SGML tags
    _rule(r"(?P<t>[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]])(?![^\W_])", _brackets),  # smileys
    # symbols and punctuation
    _rule(r"(?P<t>[A-Z]*\$)"),  # "$", "US$"
    _rule(r"(?P<t>\.\.\.+)", lambda m: ["..."]),
    _rule(r"(?P<t>-+)", _dashes),
    _rule(r"(?P<t>''|``|[?!]+|\*+|#+|@+|_+|<<|>>)"),
    _rule(
        "(?P<t>&amp;|[\"'`\u2018\u2019\u201c\u201d\u20ac\u00a3\u00a2\u00bc\u00bd\u00be"
        "\u2013\u2014\u2015\u2026])",
        _mapped,
    ),
    _rule(r"(?P<t>[()\[\]{}])", _brackets),
    # untokenizable characters are deleted (with a warning) by the Java tokenizer
    _rule("(?P<t>[\u2010\u2011\U00010000-\U0010ffff])", lambda m: []),
    _rule(r"(?P<t>\S)"),  # anything else: a one-character token
]


def _ptb_lines(text: str) -> list[list[str]]:
    """Tokenises ``text`` line by line as ``PTBTokenizer -preserveLines -lowerCase`` does."""
    lines: list[list[str]] = [[]]
    pos, end = 0, len(text)
    while pos < end:
        ch = text[pos]
        if ch == "\n":
            lines.append([])
            pos += 1
            continue
        if ch.isspace():
            pos += 1
            continue
        best, best_len = None, 0
        for pattern, action in _RULES:
            m = pattern.match(text, pos)
            if m is not None and m.end() - pos > best_len:
                best, best_len = (m, action), m.end() - pos
        m, action = best  # the final catch-all rule always matches a non-space character
        lines[-1].extend(tok.lower() for tok in action(m))
        pos = m.end("t")
    return lines


def _drop_punctuation(tokens: list[str]) -> list[str]:
    return [t for t in tokens if t not in PUNCTUATIONS]


def tokenize_ptb(text: str) -> list[str]:
    """Tokens of one caption as pycocoevalcap's ``PTBTokenizer`` leaves them.

    Lower-cased PTB tokens with the ``PUNCTUATIONS`` tokens removed, e.g.
    ``"A man's hat (red)."`` -> ``["a", "man", "'s", "hat", "-lrb-", "red", "-rrb-"]``.
    """
    return _drop_punctuation(_ptb_lines(text.replace("\n", " "))[0])


def _tokenize_corpus(captions: list[str]) -> list[str]:
    # pycocoevalcap writes all captions of one dict into one file, one per line, and tokenises it
    # in a single run; the lexer's look-ahead may cross a line ("... letter a." + "The ...").
    lines = _ptb_lines("\n".join(c.replace("\n", " ") for c in captions))
    return [" ".join(_drop_punctuation(tokens)) for tokens in lines]


# ---------------------------------------------------------------------------------------------
# Scorers (inputs: space-separated token strings, as pycocoevalcap's scorers take them)
# ---------------------------------------------------------------------------------------------


def _ngram_counts(words: list[str], n: int = 4) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as pycocoevalcap's ``BleuScorer.compute_score(option="closest")``."""
    tiny, small = 1e-15, 1e-9
    testlen_total = reflen_total = 0
    guess, correct = [0] * n, [0] * n
    for hyp, ref_list in zip(hyps, refs, strict=True):
        words = hyp.split()
        testlen = len(words)
        max_ref_counts: dict[tuple[str, ...], int] = {}
        reflens = []
        for ref in ref_list:
            ref_words = ref.split()
            reflens.append(len(ref_words))
            for ngram, count in _ngram_counts(ref_words, n).items():
                max_ref_counts[ngram] = max(max_ref_counts.get(ngram, 0), count)
        testlen_total += testlen
        reflen_total += min((abs(length - testlen), length) for length in reflens)[1]
        for k in range(n):
            guess[k] += max(0, testlen - k)
        for ngram, count in _ngram_counts(words, n).items():
            correct[len(ngram) - 1] += min(max_ref_counts.get(ngram, 0), count)
    scores, product = [], 1.0
    for k in range(n):
        product *= float(correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen_total + tiny) / (reflen_total + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """Mean ROUGE-L F over images as pycocoevalcap's ``Rouge`` (max P and max R over refs)."""
    scores = []
    for hyp, ref_list in zip(hyps, refs, strict=True):
        cand = hyp.split(" ")
        precs, recs = [], []
        for ref in ref_list:
            tokens = ref.split(" ")
            lcs = _lcs_length(tokens, cand)
            precs.append(lcs / float(len(cand)))
            recs.append(lcs / float(len(tokens)))
        p, r = max(precs), max(recs)
        score = ((1 + beta**2) * p * r) / float(r + beta**2 * p) if p != 0 and r != 0 else 0.0
        scores.append(score)
    return float(np.mean(np.array(scores)))


def cider_d(
    hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> float:
    """Corpus CIDEr-D as pycocoevalcap's ``CiderScorer`` (its ``Cider`` class)."""
    hyp_counts = [_ngram_counts(h.split(), n) for h in hyps]
    ref_counts = [[_ngram_counts(r.split(), n) for r in ref_list] for ref_list in refs]
    doc_freq: dict[tuple[str, ...], float] = defaultdict(float)
    for counts in ref_counts:
        for ngram in {g for c in counts for g in c}:
            doc_freq[ngram] += 1
    log_num_images = np.log(float(len(ref_counts)))

    def tfidf(counts):
        vec = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            vec[k][ngram] = float(tf) * (log_num_images - np.log(max(1.0, doc_freq[ngram])))
            norm[k] += pow(vec[k][ngram], 2)
            if k == 1:  # sic: the reference counts bigrams as the "length" of a sentence
                length += tf
        return vec, [np.sqrt(x) for x in norm], length

    scores = []
    for counts, ref_list in zip(hyp_counts, ref_counts, strict=True):
        vec, norm, length = tfidf(counts)
        total = np.zeros(n)
        for ref in ref_list:
            vec_ref, norm_ref, length_ref = tfidf(ref)
            delta = float(length - length_ref)
            val = np.zeros(n)
            for k in range(n):
                for ngram in vec[k]:
                    ref_value = vec_ref[k].get(ngram, 0.0)
                    val[k] += min(vec[k][ngram], ref_value) * ref_value  # clipping
                if norm[k] != 0 and norm_ref[k] != 0:
                    val[k] /= norm[k] * norm_ref[k]
                val[k] *= np.e ** (-(delta**2) / (2 * sigma**2))
            total += val
        scores.append(np.mean(total) / len(ref_list) * 10.0)
    return float(np.mean(np.array(scores)))


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    tokenize: bool = True,
) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D of one caption per id against that id's references.

    With ``tokenize=True`` the captions go through :func:`tokenize_ptb` first (as in
    pycocoevalcap's ``COCOEvalCap``); with ``False`` they are used as given (space-separated
    tokens), as when calling pycocoevalcap's scorers directly. Ids are taken in the order of
    ``predictions``; both mappings must have the same ids and every id at least one reference.
    """
    ids = list(predictions)
    if set(ids) != set(references):
        raise ValueError("predictions and references must have the same ids")
    if not ids:
        raise ValueError("caption_scores needs at least one prediction")
    refs = [list(references[i]) for i in ids]
    if any(len(r) == 0 for r in refs):
        raise ValueError("every id needs at least one reference caption")
    hyps = [predictions[i] for i in ids]
    if tokenize:
        flat = _tokenize_corpus([r for ref_list in refs for r in ref_list])
        it = iter(flat)
        refs = [[next(it) for _ in ref_list] for ref_list in refs]
        hyps = _tokenize_corpus(hyps)
    scores = {f"BLEU-{k + 1}": s for k, s in enumerate(bleu(hyps, refs))}
    scores["ROUGE-L"] = rouge_l(hyps, refs)
    scores["CIDEr-D"] = cider_d(hyps, refs)
    return scores
