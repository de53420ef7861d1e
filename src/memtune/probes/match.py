"""Whether a generated answer is right: SQuAD's exact match and F1, and the lenient "contains"
that chat models need — on any Unicode spelling of the same text.

Every score first *folds* both texts: Unicode NFKC (composed and decomposed accents, full-width
letters and non-breaking spaces become one form), typographic punctuation to ASCII (’ ‘ ʼ →
', “ ” « » → ", – — − → -), invisible format characters (soft hyphen, zero-width space) dropped.
Then SQuAD's normalisation, Unicode-aware: case folded (ß = ss), no punctuation, no articles
``a/an/the`` and possessive 's, single spaces.

``contains`` (`is_correct`, which splits facts into known and to-learn) credits a sentence that
names the answer ("The capital of France is Paris.") but not one that only *mentions* it:

- the answer must be a whole name, not part of a longer one: a capitalised word joined to it by
  a space or hyphen makes another entity (South Sudan is not Sudan, Papua New Guinea not
  Guinea, Mexico City not Mexico);
- the answer must not be negated: no negation earlier in its clause ("Not Paris; ... Lyon",
  "It isn't Paris") and no "is not" right after it ("Paris is not the capital");
- given the question, the answer must not be a copy of the question's own words: a mention
  that, with the word before or after it, is a phrase of the question repeats the question's
  subject ("The capital of Saint Pierre and Miquelon is ..." does not name the capital Saint
  Pierre; "The capital of Djibouti is Djibouti." does name the city Djibouti).

Answers of at most three characters once normalised (codes like ``IN``, ``.is``, ``+1``) must
appear verbatim — same case and punctuation — as a whole token, or ordinary words ("in", "is")
would count as right.
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata

SHORT = 3  # answers this short (normalised) must match verbatim

# Typographic punctuation that NFKC leaves alone, to its ASCII form.
_TYPOGRAPHIC = str.maketrans({
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u02bc\u02bb\u00b4\u0060\uff07", "'"),
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb\u2039\u203a\u301d\u301e", '"'),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d", "-"),
    "\u2026": "...",
})
_ARTICLES = {"a", "an", "the"}
# Capitalised words that do not make a name longer (sentence starts, title case).
_FUNCTION_WORDS = {
    "a", "an", "the", "in", "on", "at", "of", "to", "for", "from", "by", "with", "into", "near", "and", "or",
    "but", "so", "is", "are", "was", "were", "be", "it", "its", "it's", "this", "that", "these", "those",
    "there", "here", "yes", "no", "not", "i", "i'm", "answer", "which", "what", "where", "both", "also",
}
# Words that negate what follows them in their clause.
_NEGATION = re.compile(
    r"(?<![\w'])(?:not|no|never|neither|nor|none|cannot|without|except|unlike|instead of|rather than|"
    r"other than|no longer|\w+n't)(?![\w'])",
    re.IGNORECASE,
)
# What starts a new clause: a stop or a conjunction that turns the sentence.
_CLAUSE = re.compile(r"[.;:!?,()\n]|(?<!\w)(?:but|however|although|though|whereas|while|yet|and)(?!\w)",
                     re.IGNORECASE)
# A negated predicate right after the answer: "Paris is not ...", "Paris isn't ...".
_NEGATED_AFTER = re.compile(
    r"^\s*(?:(?:is|was|are|were|does|did|has|had|has been|had been)\s+(?:not|never|no longer)|"
    r"(?:isn't|wasn't|aren't|weren't|doesn't|didn't|hasn't|hadn't))(?![\w'])",
    re.IGNORECASE,
)


def fold(text: str) -> str:
    """One spelling of the same text: Unicode NFKC, typographic quotes and dashes as ASCII, no
    invisible format characters (soft hyphens, zero-width spaces)."""
    # Before NFKC too: it would turn an acute accent used as an apostrophe (´) into a space and a mark.
    text = unicodedata.normalize("NFKC", text.translate(_TYPOGRAPHIC)).translate(_TYPOGRAPHIC)
    return "".join(c for c in text if unicodedata.category(c) != "Cf")


def _is_punct(c: str) -> bool:
    return c in string.punctuation or unicodedata.category(c).startswith("P")


def _norm_word(word: str) -> str:
    """A whitespace-free chunk of folded text -> its normalised word ('' if none is left). A
    possessive 's goes too: "Sudan's capital" names Sudan."""
    w = re.sub(r"'s(?=\W*$)", "", word.casefold())
    w = "".join(c for c in w if not _is_punct(c))
    return "" if w in _ARTICLES else w


def _words(text: str) -> list[tuple[str, int, int]]:
    """(normalised word, start, end) of each chunk of the folded `text` that leaves a word."""
    out = []
    for m in re.finditer(r"\S+", text):
        w = _norm_word(m.group())
        if w:
            out.extend((part, m.start(), m.end()) for part in w.split())
    return out


def normalize_answer(text: str) -> str:
    """Folded, then SQuAD's normalisation: lower case, no punctuation or articles, single spaces."""
    return " ".join(w for w, _, _ in _words(fold(text)))


def exact_match(prediction: str, answers: str | list[str]) -> bool:
    answers = [answers] if isinstance(answers, str) else answers
    p = normalize_answer(prediction)
    return any(p == normalize_answer(a) for a in answers)


def token_f1(prediction: str, answers: str | list[str]) -> float:
    """Best SQuAD token F1 of `prediction` against any of `answers`."""
    answers = [answers] if isinstance(answers, str) else answers
    pred = normalize_answer(prediction).split()
    best = 0.0
    for a in answers:
        gold = normalize_answer(a).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _name_word(word: str) -> bool:
    """Whether a neighbouring word would make a longer proper name: capitalised, not a
    function word."""
    word = word.strip(string.punctuation + '"')
    return bool(word) and word[0].isupper() and word.lower() not in _FUNCTION_WORDS


def _longer_name(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] is joined (by a space or hyphen, no other punctuation) to a
    capitalised word: then it is part of a longer name."""
    before = re.search(r"(\S+)(\s+|-)$", text[:start])
    if (before and not _is_punct(text[start]) and not _is_punct(before.group(1)[-1])
            and _name_word(before.group(1))):
        return True
    after = re.match(r"^(\s+|-)(\S+)", text[end:])
    return bool(after and not _is_punct(text[end - 1]) and not _is_punct(after.group(2)[0])
                and _name_word(after.group(2)))


def _negated(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] is negated: a negation earlier in its clause, or right after."""
    clause_start = max((m.end() for m in _CLAUSE.finditer(text, 0, start)), default=0)
    if _NEGATION.search(text, clause_start, start):
        return True
    return _NEGATED_AFTER.match(text[end:]) is not None


def _mentions(prediction: str, answer: str) -> list[tuple[int, int]]:
    """(start, end) in `prediction` (folded) of each mention of `answer` as whole words."""
    norm = normalize_answer(answer)
    if not norm:
        return []
    if len(norm) <= SHORT:
        pattern = rf"(?<!\w){re.escape(fold(answer).strip())}(?!\w)"
        return [m.span() for m in re.finditer(pattern, prediction)]
    gold = norm.split()
    words = _words(prediction)
    return [(words[i][1], words[i + len(gold) - 1][2]) for i in range(len(words) - len(gold) + 1)
            if [w for w, _, _ in words[i : i + len(gold)]] == gold]


def _bare(word: str) -> str:
    """A normalised word without accents: "tomé" and "tome" are one word."""
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))


def _copies_question(prediction: str, start: int, end: int, question: list[str]) -> bool:
    """Whether prediction[start:end] (folded) with the content word next to it (before or
    after; function words skipped) are consecutive content words of the `question` (its
    normalised words): compared without accents and spaces, so "Saint-Pierre" is "Saint Pierre"
    and "São Tomé & Príncipe" is "Sao Tome and Principe"."""
    words = _words(prediction)
    inside = [i for i, (_, s, e) in enumerate(words) if s < end and e > start]
    if not inside:
        return False
    content = {i: _bare(w) for i, (w, _, _) in enumerate(words) if w not in _FUNCTION_WORDS}
    mention = "".join(content.get(i, "") for i in inside)
    before = "".join([content[i] for i in content if i < inside[0]][-1:])
    after = "".join([content[i] for i in content if i > inside[-1]][:1])
    q = [_bare(w) for w in question if w not in _FUNCTION_WORDS]
    spans = {"".join(q[i:j]) for i in range(len(q)) for j in range(i + 1, len(q) + 1)}
    return bool(before) and before + mention in spans or bool(after) and mention + after in spans


def _contains(prediction: str, answer: str, question: list[str] | None = None) -> bool:
    prediction = fold(prediction)
    return any(not _longer_name(prediction, s, e) and not _negated(prediction, s, e)
               and not (question and _copies_question(prediction, s, e, question))
               for s, e in _mentions(prediction, answer))


def is_correct(prediction: str, answers: str | list[str], question: str | None = None) -> bool:
    """Whether the prediction names any of the answers: whole words, not inside a longer name,
    not negated and, given the `question`, not a copy of its words (see the module doc)."""
    answers = [answers] if isinstance(answers, str) else answers
    words = normalize_answer(question).split() if question else None
    return any(_contains(prediction, a, words) for a in answers)
