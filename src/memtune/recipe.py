"""The recipe: how `memtune learn` (and `memtune.learn`) teaches a model new facts by default,
with no other input than the facts.

Each step is what the headline experiment measured (BENCHMARKS.md) and each is a function here,
so the CLI, the Python entry point and the experiment runner call the same code:

1. **retrofit** a base model with the measured memory shape (`default_memory_config`: parallel,
   1M slots at ~27/53/80 % depth, knn 4); a memory checkpoint continues as it is;
2. **related questions** (`related_questions`): the model writes questions of the same form as
   the user's (it continues a list of them), about the subjects *it* knows; with the user's
   `--keep` questions and the **neighbourhood** questions (each fact's question about 5 of
   their subjects: `neighbourhood_prompts`, so that every form of the data is kept, not only
   those the model writes most), they stand for what the model must keep (experimental, off:
   `--neighbourhood-cross` adds the data's subjects asked in its other forms, `cross_questions`,
   protecting what the answers about several subjects read);
3. **calibrate** the memory queries (fresh retrofit only) on the data and those questions;
4. **statement targets** in the model's own words (`memtune.targets.own_statements`) that name
   what the question is about (`in_own_words`: the model restates its answer where it does
   not), the loss on the whole statement, and **word dropout**
   (`memtune.paraphrases.word_dropout`): each question also trained with one or two of its
   words left out, 2 variants, so that a fact is found when asked in other words (issue 17:
   held-out paraphrases 41 → 62 % on countries, 39 → 51 % on US states; BENCHMARKS.md);
5. **background** statistics of the training examples and the related questions' own answers
   (counted where `protect` counts them), so the ranker avoids slots that every question of
   this form reads;
6. **protect**: the slots the model reads answering the related (and `--keep`) questions in its
   own words are never updated — at every position, the prompt's too (`protect_prompts`: a
   question reads its system prompt and words before it answers; issue 17, ninth round: 1 of
   50 known cities lost instead of 3, 0 of 28 states instead of 1);
7. **learn until learned** (`memtune.train`), each fact trained 5 passes more once it is first
   answered right (`LearnConfig.consolidate`: a margin, so that rephrased questions find it),
   then **keep what was learned**: every slot the data's text reads is frozen for later calls,
   recorded in the checkpoint's ledger; before that, the update is **extrapolated**
   (`extrapolate_update`) and what it undid learned again.

Two experimental generalisation levers (issue 17; off by default: BENCHMARKS.md has what they
gained) sit beside word dropout in step 4: **self-paraphrases** (`memtune.paraphrases`: the
model rewrites each question, and each statement for the plain rendering, in its own words;
filtered rewrites become further phrasings) and **renderings** (`memtune.targets`: the fact also
trained as a short answer, as plain text, as a template-less question). A fact has several
examples; the until-learned check still asks its question once, in the chat template, and all
of its examples leave training together when it is answered right (`ExampleCheck`).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from memtune.batches import Example, encode_documents, encode_qa, first_batches
from memtune.config import CALIBRATIONS, MemoryConfig
from memtune.data import QA, Document
from memtune.errors import MemtuneError, is_int, is_number
from memtune.prompts import encode_text
from memtune.rankers import NEEDS_BACKGROUND
from memtune.stats import background_stats, group_stats
from memtune.targets import (
    RENDERINGS,
    check_renderings,
    check_target,
    encode_facts,
    fact_examples,
    first_sentence,
    mask_predicted,
    own_statements,
    statement_prefixes,
)
from memtune.train import LORA_ONLY, SMF_ONLY, LearnConfig, check_options, make_method, train

log = logging.getLogger(__name__)

AUTO, NONE = "auto", "none"
# Where the recipe puts memory layers, as fractions of the model's depth: 8, 16, 24 of
# SmolLM2-135M's 30 layers (the headline's); for 24-layer Qwen2.5-0.5B 6, 13, 19.
DEPTH_FRACTIONS = (0.27, 0.53, 0.8)
# RecipeConfig options that act on memory slots: full finetuning and LoRA refuse them
RECIPE_SMF_ONLY = ("n_keys", "shard_values", "related", "background", "protect", "keep", "calibrate",
                   "align_phrasings", "neighbourhood", "neighbourhood_check", "protect_prompts", "extrapolate",
                   "neighbourhood_keep", "neighbourhood_cross")
REWRITE_STATEMENTS = ("shared", "own")
# RecipeConfig options that shape facts' examples: documents refuse them
RECIPE_FACTS_ONLY = ("target", "loss", "end_loss", "name_subject", "renderings", "word_dropout",
                     "self_paraphrases", "rewrite_statements", "check_rewrites", "align_phrasings", "neighbourhood",
                     "neighbourhood_check", "extrapolate", "neighbourhood_keep", "neighbourhood_cross")
# the value that turns a facts-only lever off: documents accept it as they accept the default
LEVER_OFF = {"word_dropout": 0, "self_paraphrases": 0, "check_rewrites": False, "align_phrasings": False,
             "neighbourhood": 0, "neighbourhood_check": 0, "extrapolate": 1.0, "neighbourhood_keep": 0,
             "neighbourhood_cross": False, "name_subject": False}
# rounds of the neighbourhood check: un-write what changed answers read, learn again
NEIGHBOURHOOD_ROUNDS = 3
# the factor on a call's value-row update once its facts are learned (BENCHMARKS.md, fourteenth round)
EXTRAPOLATE = 1.25
# questions about other subjects per fact, kept as the related ones (BENCHMARKS.md, fifteenth round)
NEIGHBOURHOOD_KEEP = 5
# --neighbourhood-cross protects the slots that the answers about this many of the data's subjects
# read, not those one subject's alone read: a fact's rephrasings need those (BENCHMARKS.md, eighteenth round)
CROSS_SUBJECTS = 2
_QUESTION = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*(.+\?)\s*$")


@dataclass
class RecipeConfig:
    """The automatic steps of `memtune learn` around the training loop; each can be turned off
    or given explicitly. Every field is also a `memtune learn` option."""

    n_keys: int = field(default=1024, metadata={
        "help": "SMF on a base model: half-keys of the memory it is given (n_keys² slots, shared by 3 layers)"})
    shard_values: bool = field(default=False, metadata={
        "help": "SMF on a base model, under torchrun: split its value table by columns over the ranks (each holds "
                "1/N; see memtune.sharding)"})
    related: int = field(default=200, metadata={
        "help": "SMF: questions of the data's form the model writes itself (about what it knows); their "
                "own answers make the background and the protected slots. 0: none"})
    background: str = field(default=AUTO, metadata={
        "help": "SMF: slot statistics for the ranker: auto (the training data and the related questions' own "
                "answers, and prompts with --protect-prompts), none, or a folder from `memtune background`"})
    protect: str = field(default=AUTO, metadata={
        "help": "SMF: slots never updated: auto (those the related and --keep questions read in the model's own "
                "answers, and in their prompts: --protect-prompts), none, or a folder from `memtune background`"})
    protect_prompts: bool = field(default=True, metadata={
        "help": "SMF: the slots the related and --keep questions read at every position are protected, their prompts "
                "too (the chat template's system prompt, the question), not only where their own answers are "
                "predicted: a question reads its prompt's slots before its answer (issue 17). Off: answers only"})
    neighbourhood: int = field(default=0, metadata={
        "help": "SMF, facts, experimental (issue 17): each fact asked again about N other subjects (those of the "
                "related questions, the same form first), its statement cut before the answer; the slots these "
                "neighbourhood prompts read where the answer would follow (every position, with --protect-prompts) "
                "are protected and in the background, so "
                "a fact is written where only its own subject reads (memtune.recipe.neighbourhood_examples). 0: none"})
    neighbourhood_keep: int = field(default=NEIGHBOURHOOD_KEEP, metadata={
        "help": "SMF, facts (issue 17): each fact's question asked about N other subjects (as "
                "--neighbourhood asks it) is kept as a --keep question is: answered in the model's own words, what "
                "it reads doing so, at every position, is protected and in the background. On data of several "
                "relations, a fact otherwise writes the rows every answer of its form reads ('Caracas is the capital "
                "of which country?' -> 'Benin' after learning 'Porto-Novo ...'; BENCHMARKS.md, fifteenth round); "
                "questions the related or --keep questions hold already are not asked twice. 0: none"})
    neighbourhood_cross: bool = field(default=False, metadata={
        "help": "SMF, facts, experimental (issue 17): each subject of the data asked in the data's other forms "
                "('What is the capital of Luxembourg?' beside the fact '... top-level domain of Luxembourg'; "
                "memtune.recipe.cross_questions), answered in the model's own words; what those answers read "
                "where they are predicted is in the background, and what the answers about 2 or more subjects "
                "read is protected (one subject's alone is what its facts' rephrasings need). On the mix of every "
                "countries relation it kept 48 of 50 known facts instead of 45, and answered 38 of 80 paraphrases "
                "instead of 41 (BENCHMARKS.md, eighteenth round). Data of one form: no question"})
    neighbourhood_check: int = field(default=0, metadata={
        "help": "SMF, facts, experimental (issue 17): each fact's question asked about N other subjects (as "
                "--neighbourhood asks it; past the questions protect keeps, whose answers cannot change) and "
                "answered by the model before learning; after learning (and "
                "--extrapolate), where such an answer changed (its first sentence), the rows this call wrote that "
                "the question reads where its answer is predicted are given back their values and protected, and "
                "the facts are trained again "
                f"until learned; up to {NEIGHBOURHOOD_ROUNDS} rounds (memtune.recipe.AnswersKept). config.json "
                "records how many changed each round: forgetting on the data's own forms. 0: none"})
    extrapolate: float = field(default=EXTRAPOLATE, metadata={
        "help": "SMF, facts: once the facts are learned, this call's change to each value row it updated is scaled "
                "by F (before + F x (after - before): task arithmetic's scaled update, Ilharco et al. 2023), and "
                "the facts no longer answered right are trained again until learned; a rephrased question reads "
                "part of the slots its fact was written to, and the scaled rows let that part give the answer "
                "(issue 17; BENCHMARKS.md, fourteenth round). 1: off"})
    keep: str | None = field(default=None, metadata={
        "help": "a file of questions (.txt, one per line, or JSONL/CSV with 'question') whose current answers "
                "must be kept: their slots are protected"})
    calibrate: str = field(default="standardize", metadata={
        "help": "SMF, fresh retrofit: calibrate the memory queries on the data first: standardize, whiten, none"})
    target: str = field(default="statement", metadata={
        "help": "facts: train the answer as a statement in the model's own words (statement) or bare (answer)"})
    name_subject: bool = field(default=True, metadata={
        "help": "facts, statement target: a statement names what its question is about where the model can say "
                "it so ('Porto-Novo is the capital of Benin.'), asking the model to restate its answer where its "
                "own does not; a statement that does not ('The capital of the Republic of Benin.') teaches the "
                "answer where every question of its form reads (BENCHMARKS.md, nineteenth round). Off: the "
                "opening of its own answer after which the answer is likeliest, whatever it names"})
    loss: str = field(default="target", metadata={
        "help": "facts: loss on the whole target (target), from where the model's own words leave it (diverge), "
                "or on the answer inside a statement (answer)"})
    end_loss: bool = field(default=True, metadata={
        "help": "facts: the loss also on what follows the answer in the target (the statement's full stop, the end "
                "of the turn); off (experimental, issue 17), the loss stops at the answer, so that the model does not "
                "learn to stop right after a name or a place"})
    renderings: tuple[str, ...] = field(default=("chat",), metadata={
        "help": "facts, experimental (issue 17): the forms each fact is trained in, of " + ", ".join(RENDERINGS)
                + " (memtune.targets); the until-learned check asks the chat question"})
    word_dropout: int = field(default=2, metadata={
        "help": "facts: variants of each question with one or two of its words left out (never its first or "
                "last word, nor what it is about), trained as further phrasings, so the fact is found when asked "
                "in other words (memtune.paraphrases.word_dropout, issue 17). 0: none"})
    self_paraphrases: int = field(default=0, metadata={
        "help": "facts, experimental (issue 17): rewrites of each question the model writes itself (and of "
                "each statement with the plain rendering); those that keep the subject (and the answer out of a "
                "question) are trained as further phrasings. 0: none"})
    rewrite_statements: str = field(default="shared", metadata={
        "help": "facts, with --self-paraphrases and the statement target, experimental (issue 17): each rewrite "
                "is trained with the question's statement (shared) or with its own: the answer after the words "
                "the model opens its answer to that rewrite with (own)"})
    check_rewrites: bool = field(default=False, metadata={
        "help": "facts, with --rewrite-statements own, experimental (issue 17): the until-learned check asks every "
                "rewrite too, and each is trained until it is answered right (else a fact's rewrites stop with "
                "its question)"})
    align_phrasings: bool = field(default=False, metadata={
        "help": "SMF, fresh retrofit, facts, experimental (issue 17): whiten the memory queries against how the "
                "self-paraphrases of one fact differ (memtune.calibrate.align_queries), so a rephrased question "
                "reads the slots its fact was written to; needs --self-paraphrases"})
    max_new_tokens: int = field(default=24, metadata={"help": "tokens generated per answer (checks, own answers)"})

    def __post_init__(self) -> None:
        check_target(self.target, self.loss)
        self.renderings = check_renderings(self.renderings, ask=True)
        if self.calibrate not in (*CALIBRATIONS, NONE):
            raise MemtuneError(f"calibrate={self.calibrate!r} is invalid: expected one of "
                               f"{', '.join(CALIBRATIONS)}, {NONE}")
        for name in ("background", "protect"):
            value = getattr(self, name)
            if value not in (AUTO, NONE) and not Path(value).is_dir():
                raise MemtuneError(f"{name}={value!r} is invalid: expected auto, none or a statistics folder "
                                   "(from `memtune background`)")
        if self.keep is not None and not Path(self.keep).is_file():
            raise MemtuneError(f"keep={self.keep!r} does not exist: expected a file of questions")
        if not is_int(self.n_keys) or self.n_keys < 2:
            raise MemtuneError(f"n_keys={self.n_keys!r} is invalid: expected an integer >= 2")
        for name, least, kind in (("related", 0, "non-negative"), ("word_dropout", 0, "non-negative"),
                                  ("self_paraphrases", 0, "non-negative"), ("neighbourhood", 0, "non-negative"),
                                  ("neighbourhood_keep", 0, "non-negative"),
                                  ("neighbourhood_check", 0, "non-negative"),
                                  ("max_new_tokens", 1, "positive")):
            value = getattr(self, name)
            if not is_int(value) or value < least:
                raise MemtuneError(f"{name}={value!r} is invalid: expected a {kind} integer")
        if not is_number(self.extrapolate) or not 0 < self.extrapolate < 1e300:  # (an int too large for a float too)
            raise MemtuneError(f"extrapolate={self.extrapolate!r} is invalid: expected a number > 0 (1: off)")
        if self.rewrite_statements not in REWRITE_STATEMENTS:
            raise MemtuneError(f"rewrite_statements={self.rewrite_statements!r} is invalid: expected one of "
                               f"{', '.join(REWRITE_STATEMENTS)}")
        for name in ("end_loss", "check_rewrites", "align_phrasings", "protect_prompts", "neighbourhood_cross",
                     "name_subject"):
            if not isinstance(getattr(self, name), bool):
                raise MemtuneError(f"{name}={getattr(self, name)!r} is invalid: expected true or false")
        if self.rewrite_statements == "own" and not (self.self_paraphrases and self.target == "statement"):
            raise MemtuneError("rewrite_statements='own' words the statement of each self-paraphrase: give "
                               "self_paraphrases > 0 and target='statement'")
        if self.check_rewrites and not (self.self_paraphrases and self.rewrite_statements == "own"):
            raise MemtuneError("check_rewrites needs rewrites of their own to ask: give self_paraphrases > 0 and "
                               "rewrite_statements='own'")
        if self.align_phrasings and not self.self_paraphrases:
            raise MemtuneError("align_phrasings needs phrasings to align: give self_paraphrases > 0 "
                               "(--self-paraphrases K)")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# The steps


def default_memory_config(model: nn.Module, base_model: str | None, n_keys: int = 1024) -> MemoryConfig:
    """The measured memory shape for `model`: parallel mode (exactly the base model until it
    learns), n_keys² slots (1024²: 1M) shared by three layers at `DEPTH_FRACTIONS` of its depth,
    4 heads, knn 4 (BENCHMARKS.md, third run), k_dim 256."""
    from memtune.retrofit import decoder_layers

    n = len(decoder_layers(model))
    layers = sorted({min(n - 1, round(n * f)) for f in DEPTH_FRACTIONS})
    return MemoryConfig(layers=layers, mode="parallel", n_keys=n_keys, heads=4, knn=min(4, n_keys), k_dim=256,
                        base_model=base_model)


def read_questions(path: str | Path) -> list[str]:
    """Questions from a .txt file (one per line) or a JSONL/CSV/parquet file with 'question'."""
    from memtune.data.files import field as required
    from memtune.data.files import read_rows

    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise MemtuneError(f"questions file {str(path)!r} does not exist")
        questions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        questions = [str(required(row, "question", where, '"question"')) for where, row in read_rows(path)]
    if not questions:
        raise MemtuneError(f"questions file {str(path)!r} holds no questions")
    return questions


def _normal(question: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", question.lower()).split())


def listed_questions(text: str) -> list[str]:
    """The items of a list ("- ...", "* ...", "1. ...") in `text` that are questions of 3 to 30
    words, in order."""
    out = []
    for line in text.splitlines():
        m = _QUESTION.match(line)
        if m and 3 <= len(_normal(m.group(1)).split()) <= 30:
            out.append(m.group(1).strip())
    return out


_STOPWORDS = frozenset("the and for was were with from into which what who whom whose when where why how does did "
                       "this that these those are has have had its his her their there than then also about".split())


def question_names(question: str) -> set[str]:
    """Case-folded words of the names and numbers in `question`: capitalised after its first
    word, or digits."""
    return {w for raw in re.findall(r"[\w']+", question)[1:] if raw[:1].isupper() or raw.isdigit()
            for w in _normal(raw).split()}


def _is_subject_word(word: str) -> bool:
    return (len(word) >= 3 or word.isdigit()) and word not in _STOPWORDS


def question_forms(questions: list[str], max_span: int = 6, max_words: int = 40) -> list[tuple[str, set[str]]]:
    """Each question's form and subject: `(form, subject words)`. The subject is a span of at most
    `max_span` words whose replacement by a blank leaves a form another question shares, with a
    word of 3+ letters that is not a stopword ("what is the capital of _" for "… of Sri Lanka?";
    never "what is _"). In a question with names (words capitalised after the first, or
    digits) the span holds names and short or stop words only ("the U.S. Virgin Islands",
    "the Democratic Republic of the Congo"). Of the spans, the shortest whose form at least half
    as many questions share as the most shared one ("chloride" alone is not the subject of
    "… of sodium chloride?" among other salts), then the later. A question that shares no
    form, or is longer than `max_words`, is its own form, and its subject is its names; with
    none, its words in at most 2 of the questions when there are 5 or more. Subject words are
    case-folded, 3+ letters or digits, not stopwords — but a blanked span of short names only
    is its subject as it is (a symbol or a code: "… has the symbol As?" is about "as"; see
    `named_subjects`). Mixed relations are what this is for: "continent" or "official" in one
    or two questions of a mix is form, not subject."""
    words = [_normal(q).split() for q in questions]
    names = [question_names(q) for q in questions]

    def blanks(w: list[str], names: set[str]):  # (i, j, w with words i..j blanked)
        content = [_is_subject_word(x) for x in w]
        named = [k == 0 or x in names or not c for k, (x, c) in enumerate(zip(w, content))]  # "São Tomé is …"
        for i in range(len(w) if len(w) <= max_words else 0):
            for j in range(i + 1, min(len(w), i + max_span) + 1):
                if names and not named[j - 1]:
                    break  # past a word that is not a name, the span only grows
                if (not names or names & set(w[i:j])) and (any(content[:i]) or any(content[j:])):  # not "what is _"
                    yield i, j, " ".join([*w[:i], "_", *w[j:]])

    distinct = {" ".join(w): (w, n) for w, n in zip(words, names)}
    sharing = Counter(form for w, n in distinct.values() for _, _, form in blanks(w, n))
    df = Counter(x for w in words for x in set(w))
    out = []
    for w, n in zip(words, names):
        shared = [(i, j, form) for i, j, form in blanks(w, n) if sharing[form] >= 2]
        if shared:
            most = max(sharing[form] for _, _, form in shared)
            i, j, form = min((s for s in shared if 2 * sharing[s[2]] >= most), key=lambda s: (s[1] - s[0], -s[0]))
            subject = {x for x in w[i:j] if _is_subject_word(x)} or {x for x in w[i:j] if x in n}  # a symbol: "As"
            out.append((form.replace("the _", "_"), subject))  # "of the _" is "of _"
        else:
            subject = {x for x in n if _is_subject_word(x)} or {
                x for x in w if _is_subject_word(x) and len(questions) >= 5 and df[x] <= 2}
            out.append((" ".join(w), subject))
    return out


def subject_words(questions: list[str]) -> set[str]:
    """Words that say what a question is about rather than its form: the union of the subjects
    of `question_forms`. "Vermont" and "francium" are subjects of a set of state and element
    questions; "capital" is form, and so is "continent" in a mix of relations."""
    return {x for _, subject in question_forms(questions) for x in subject}


def named_subjects(text: str, subjects: set[str]) -> set[str]:
    """The words of `subjects` (case-folded subject words, as `subject_words` gives them) that
    `text` names. A short one — an element symbol "As", a code "MT" — counts only where it is
    written as a name, a whole word capitalised after the first, so that "as" in "known as", "in"
    in "In which year" or the "s" of "France's" does not (the pronoun "I" does: iodine's symbol)."""
    words = set(_normal(text).split())
    names = {raw.lower() for raw in re.findall(r"[\w']+", text)[1:] if raw[:1].isupper()}  # whole: not "France's"
    return {x for x in subjects & words if _is_subject_word(x)} | (subjects & names)


def subject_span(text: str, words: set[str]) -> tuple[int, int] | None:
    """Where `text` names its subject: the characters from its first word in `words` (case-folded
    subject words, as `question_forms` gives them; a short one only capitalised, as in
    `named_subjects`) to the last of the run that follows, across short and stop words
    ("Democratic Republic of the Congo"). None when no word is in `words`."""
    start = end = None
    for k, m in enumerate(re.finditer(r"\w+", text)):
        word = m.group().lower()
        if word in words and (_is_subject_word(word) or (k and m.group()[:1].isupper())):
            start, end = m.start() if start is None else start, m.end()
        elif start is not None and _is_subject_word(word):
            break
    return None if start is None else (start, end)


def neighbourhood_examples(tokenizer, items: list[QA], others: list[str], n: int, seed: int = 0,
                           statements: bool = True, max_length: int = 256) -> list[Example]:
    """`neighbourhood_prompts` as examples: the loss, and so SMF's counted positions, is on the
    opening and the end of the turn after it: the position that would predict the answer counts."""
    pairs = neighbourhood_prompts(items, others, n, seed, statements)
    return encode_qa(tokenizer, pairs, max_length) if pairs else []


def neighbourhood_prompts(items: list[QA], others: list[str], n: int, seed: int = 0,
                          statements: bool = True, skip: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Neighbourhood prompts (MEMIT's, Meng et al. 2023): each fact's question and the opening of
    its statement (its words before the answer), with the subject swapped for `n` subjects of
    `others` — questions about other things, such as the related questions. Those of the fact's
    form (`question_forms`) come first, then others at random. "What is the capital of Chad?" ->
    "The capital of Chad is N'Djamena." gives ("What is the capital of Peru?", "The capital of
    Peru is"). With `statements=False` (a bare-answer target) or a statement that starts with its
    answer, the opening is empty. A subject that shares a word with a subject of `items` is never
    put in: its fact is being written. A fact whose subject is not found in its question gets
    none. A question in `skip` (as `_normal` writes it) is passed over for the next subject.
    Returns up to `n` (question, opening) pairs per fact, facts in order."""
    if n <= 0 or not others or not items:
        return []
    rng = random.Random(seed)
    forms = question_forms([q.question for q in items] + list(others))
    data_words = {w for _, words in forms[: len(items)] for w in words}
    fillers: dict[str, tuple[str, str, bool]] = {}  # subject (case-folded) -> (its form, as written, after "the")
    for question, (form, words) in zip(others, forms[len(items):]):
        span = subject_span(question, words)
        if span and not words & data_words:  # never a subject of the data: its fact is being written
            fillers.setdefault(question[span[0]:span[1]].lower(),
                               (form, question[span[0]:span[1]], _takes_the(question, span)))
    spans = [subject_span(item.question, words) for item, (_, words) in zip(items, forms)]
    pairs = []
    for item, span, (form, words) in zip(items, spans, forms):
        if span is None:
            continue
        at = item.statement.rfind(item.answer) if statements and item.statement else -1
        opening = item.statement[:at] if at > 0 else ""
        said = subject_span(opening, words)
        same = [(f, the) for f_form, f, the in fillers.values() if f_form == form]
        rest = [(f, the) for f_form, f, the in fillers.values() if f_form != form]
        rng.shuffle(same)
        rng.shuffle(rest)
        subject, named = item.question[span[0]:span[1]], opening[said[0]:said[1]] if said else None
        mine = []
        for filler, the in same + rest:  # every place it is named, as a whole word ("W", not Which's)
            question = put_subject(item.question, subject, filler, the)
            if _normal(question) not in skip:
                text = put_subject(opening, named, filler, the) if named else opening
                mine.append((question, text.rstrip()))
                if len(mine) == n:
                    break
        pairs += mine
    return pairs


def cross_questions(items: list[QA]) -> list[tuple[str, str]]:
    """Each subject of `items` asked in each of their other forms (`question_forms`): the first
    question of every other form with its subject swapped for this one. Facts about Luxembourg's
    top-level domain and Switzerland's capital give "What is the capital of Luxembourg?" and
    "What is the … top-level domain of Switzerland?". What these read is what a fact written about
    its subject must leave to the subject's other relations (BENCHMARKS.md, seventeenth round).
    A question that shares its form with no other is a form only when most of the questions share
    theirs (free-form trivia: []). Questions of `items` themselves (to a "the") and repeats are
    left out; a subject not found in its question, or not a whole name there ("C" of "C++"),
    gives none and asks about none. Data of one form: []."""
    forms = question_forms([q.question for q in items])
    shared = Counter(form for form, _ in forms)
    loose = 2 * sum(shared[form] == 1 for form, _ in forms) > len(items)  # most questions share no form
    subjects: list[tuple[str, str]] = []  # (form, subject as written)
    first: dict[str, tuple[str, str, bool]] = {}  # form -> (its question, its subject, after a "the")
    for item, (form, words) in zip(items, forms):
        span = subject_span(item.question, words)
        if span and _whole_name(item.question, span):
            subject = item.question[span[0]:span[1]]
            subjects.append((form, subject))
            bare = not _takes_the(item.question, span)  # "of the Gambia" -> "of the Peru"
            if (shared[form] > 1 or not loose) and (form not in first or bare and first[form][2]):
                first[form] = (item.question, subject, not bare)

    def key(question: str) -> str:  # "of the Gambia" is "of Gambia"
        return " ".join(w for w in _normal(question).split() if w != "the")

    seen = {key(q.question) for q in items}
    out = []
    for form, subject in subjects:
        for other, (question, its_subject, _) in first.items():
            asked = _replace_word(question, its_subject, subject)
            if other != form and key(asked) not in seen:
                seen.add(key(asked))
                out.append((asked, subject))
    return out


def _whole_name(text: str, span: tuple[int, int]) -> bool:
    """Whether `text[span[0]:span[1]]` is a whole name: not part of "C++" or "St. Kitts (and Nevis)"."""
    before, after = text[span[0] - 1: span[0]], text[span[1]: span[1] + 1]
    return before in ("", " ", '"') and after in ("", " ", "?", ".", "!", ",", ";", ":", "'", '"')


def _takes_the(text: str, span: tuple[int, int]) -> bool:
    """Whether the name at `span` of `text` is written after a "the" ("the Czech Republic")."""
    return text[:span[0]].lower().endswith("the ")


def put_subject(text: str, old: str, new: str, the: bool) -> str:
    """`text` with every whole-word `old` (a subject as written, with its "the" or without) swapped
    for `new`, itself after a "the" where `the`: the subject of "What is the capital of the
    Gambia?" swapped for France gives "What is the capital of France?", not "... of the France",
    and for the Czech Republic (`the`) "... of the Czech Republic?". A "The" opening a sentence
    stays capitalised; a name opening one gains a capitalised "The"."""
    def swap(m: re.Match) -> str:
        if not the:
            return new
        article = m.group(1) or ("The" if m.start() == 0 or text[:m.start()].rstrip().endswith((".", "!", "?"))
                                 else "the")
        return f"{article} {new}"

    return re.sub(rf"(?<!\w)(?:([Tt]he)\s+)?{re.escape(old)}(?!\w)", swap, text)


def _replace_word(text: str, old: str, new: str) -> str:
    return re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", lambda _: new, text)


@torch.no_grad()
def related_questions(model: nn.Module, tokenizer, questions: list[str], n: int, seed: int = 0,
                      shots: int = 4, batch_size: int = 32, max_new_tokens: int = 64,
                      progress: bool = True) -> list[str]:
    """Up to `n` distinct questions of the same form as `questions`, written by the model: it
    continues a list of `shots` of them (plain text, no chat template; sampled, temperature 0.8),
    and the lines that are questions are kept. A small model writes about the subjects it knows
    ("What is the capital of France?"), which makes them a sample of what it must keep.
    Questions about a subject of `questions` (`subject_words`) are left out: the model's own
    answer to those is what is being corrected, not something to keep."""
    if n <= 0 or not questions:
        return []
    device = next(model.parameters()).device
    rng = random.Random(seed)
    own = {_normal(q) for q in questions}
    subjects = subject_words(questions)
    found: dict[str, str] = {}
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model.eval()
    rounds = 0
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="related questions", disable=not progress)
        while len(found) < n and rounds < max(4, 4 * n // batch_size):
            rounds += 1
            prompts = ["Questions:\n" + "".join(f"- {q}\n" for q in rng.sample(questions, min(shots, len(questions))))
                       + "-" for _ in range(batch_size)]
            batch = tokenizer.pad({"input_ids": [encode_text(tokenizer, p) for p in prompts]},  # BOS once, no EOS
                                  return_tensors="pt", padding=True).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8,
                                 top_p=0.95, pad_token_id=tokenizer.pad_token_id)
            for text in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True):
                for q in listed_questions("-" + text):
                    key = _normal(q)
                    if key not in own and key not in found and len(found) < n and not named_subjects(q, subjects):
                        found[key] = q
                        bar.update(1)
        bar.close()
    finally:
        tokenizer.padding_side = side
        torch.random.set_rng_state(generator_state)
    if len(found) < n:
        log.warning("the model wrote %d distinct related questions of the %d asked for", len(found), n)
    return list(found.values())


def own_answer_examples(model: nn.Module, tokenizer, questions: list[str], max_new_tokens: int = 24,
                        progress: bool = True) -> list[Example]:
    """Examples question -> the model's own greedy answer (loss, and so counted positions, on
    every answer token); questions it answers with nothing are left out."""
    return AnswersKept(model, tokenizer, questions, max_new_tokens, progress).examples


def own_answer_stats(model: nn.Module, tokenizer, questions: list[str], max_new_tokens: int = 24,
                     batch_size: int = 8, progress: bool = True):
    """Slot reads (`memtune.stats.Background`, one batch per `batch_size` examples) of `model`
    answering `questions` in its own greedy words, every answer token counted: what the model
    must keep, as `protect` statistics. MemtuneError when it answers none of them."""
    examples = own_answer_examples(model, tokenizer, questions, max_new_tokens, progress)
    if not examples:
        raise MemtuneError(f"the model answered none of the {len(questions)} questions to keep")
    return background_stats(model, examples, tokenizer.pad_token_id, len(examples), batch_size, progress=progress)


class AnswersKept:
    """Which questions a model no longer answers as it did: made with the model before it learns
    (its greedy answers recorded; questions it answers with nothing are left out), called with
    the model after, it returns the indices (into `questions`) whose answer's first sentence
    (`first_sentence`) changed: "The demonym for people from Togo is Togolese." -> "... is Ghana."
    `examples` are the questions with those first answers (`encode_qa`: loss on the answer), for
    the slots they read where the answer is predicted."""

    def __init__(self, model: nn.Module, tokenizer, questions: list[str], max_new_tokens: int = 24,
                 progress: bool = True):
        from memtune.probes.qa import answer_questions

        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        answered = [(q, a) for q, a in zip(questions, answer_questions(
            model, tokenizer, questions, max_new_tokens=max_new_tokens, progress=progress)) if a]
        self.questions, self.answers = [q for q, _ in answered], [a for _, a in answered]
        self.examples = encode_qa(tokenizer, answered) if answered else []

    def __call__(self, model: nn.Module) -> list[int]:
        from memtune.probes.qa import answer_questions

        if not self.questions:
            return []
        now = answer_questions(model, self.tokenizer, self.questions, max_new_tokens=self.max_new_tokens,
                               progress=False)
        return [i for i, (a, b) in enumerate(zip(now, self.answers)) if first_sentence(a) != first_sentence(b)]


def example_questions(items: list[QA], augment: int = 0) -> list[QA]:
    """One QA per example of `fact_examples(items, augment=...)`, in the same order: what the
    until-learned check asks."""
    return [QA(text, q.answer, q.aliases, id=q.id) for q in items for text in [q.question, *q.paraphrases[:augment]]]


class AnswerCheck:
    """Which items the model answers right: greedy answers scored as the QA probe scores them
    (`memtune.probes.qa.is_correct`). Called with a model (and optionally the indices of the
    items to ask), returns one bool per item asked; `right` holds the latest answer per item.

    With `examples` (trained with `loss="diverge"`; example j belongs to item `owners[j]`, by
    default item j), the examples of the items still answered wrong get their loss again from
    where the model's words leave the target *now*: learning other facts can move the model's
    own words before the answer, and greedy decoding follows those.

    An item asked again whose last answer greedy decoding still gives (`still_greedy`: one
    forward pass) keeps that answer's verdict without generating; only answers that changed, or
    were never given, are generated. `asked` counts the answers asked for, `generated` those
    generated: most items rechecked once learned are not. The verdicts are those of generating
    every time (up to float rounding: a near-tie can break either way, as between batches)."""

    def __init__(self, tokenizer, items: list[QA], max_new_tokens: int = 24, batch_size: int = 32,
                 examples: list[Example] | None = None, targets: list[list[int]] | None = None,
                 owners: list[int] | None = None):
        self.tokenizer, self.items = tokenizer, items
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        if (examples is None) != (targets is None):
            raise ValueError("examples and targets (their labels with the loss on the whole target) go together")
        self.examples, self.targets = examples, targets
        owners = list(range(len(examples or []))) if owners is None else list(owners)
        self.by_item: dict[int, list[int]] = {}  # item -> its examples
        for j, i in enumerate(owners):
            self.by_item.setdefault(i, []).append(j)
        self.right: list[bool | None] = [None] * len(items)
        self.answers: dict[int, list[int]] = {}  # item -> its latest greedy answer (token ids)
        self.asked = self.generated = 0  # answers asked for, and generated (the others unchanged)

    def __call__(self, model: nn.Module, indices: list[int] | None = None) -> list[bool]:
        from memtune.generation import still_greedy
        from memtune.probes.qa import answer_ids, is_correct

        indices = list(range(len(self.items))) if indices is None else list(indices)
        known = [i for i in indices if i in self.answers]
        same = still_greedy(model, self.tokenizer, [self.items[i].question for i in known],
                            [self.answers[i] for i in known], self.max_new_tokens, self.batch_size)
        new = [i for i in indices if i not in self.answers] + [i for i, s in zip(known, same) if not s]
        given = answer_ids(model, self.tokenizer, [self.items[i].question for i in new], self.max_new_tokens,
                           self.batch_size, progress=False) if new else []
        for i, ids in zip(new, given):
            q = self.items[i]
            self.answers[i] = ids
            self.right[i] = is_correct(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), q.answers,
                                       q.question)
        self.asked, self.generated = self.asked + len(indices), self.generated + len(new)
        right = [bool(self.right[i]) for i in indices]
        if self.examples is not None:
            wrong = [j for i, ok in zip(indices, right) if not ok for j in self.by_item.get(i, [])]
            for j in wrong:
                self.examples[j].labels = list(self.targets[j])
            if wrong:
                mask_predicted(model, [self.examples[j] for j in wrong], self.tokenizer.pad_token_id)
        return right


class ExampleCheck:
    """An item check (`AnswerCheck`: item indices -> bools) as `memtune.train.train`'s check of
    examples: example j is right when its item `owners[j]` is answered right. Each item asked
    is asked once, however many of its examples are, so all of an item's examples leave (and
    rejoin) training together. With one example per item (`owners[j] == j`) it asks exactly
    what the item check would be asked."""

    def __init__(self, check, owners: list[int]):
        self.check, self.owners = check, list(owners)

    def right(self) -> set[int]:
        """The items the item check's latest answers found right."""
        return {i for i, ok in enumerate(self.check.right) if ok}

    def __call__(self, model: nn.Module, indices: list[int]) -> list[bool]:
        asked = list(dict.fromkeys(self.owners[j] for j in indices))
        right = dict(zip(asked, self.check(model, asked)))
        return [right[self.owners[j]] for j in indices]


# --------------------------------------------------------------------------------------------
# The entry point


@dataclass
class LearnResult:
    """What `learn` returns: the model (wrapped by PEFT for LoRA), the method that trained it
    (its `save` writes the checkpoint), the per-step metrics and what each recipe step did."""

    model: nn.Module
    method: object
    history: list[dict]
    recipe: dict
    examples: int
    learned: list[bool] | None = None  # per item, at the end (facts)


def learn(model: nn.Module, tokenizer, data: list[QA] | list[Document], config: LearnConfig | None = None,
          recipe: RecipeConfig | None = None, source: str = "python", on_step=None,
          progress: bool = True) -> LearnResult:
    """Teach `model` the facts (`QA`) or documents in `data` with the recipe (module doc).

    `model` is a base model (SMF retrofits it with `default_memory_config`) or a model with a
    memory (SMF continues it: earlier learn calls' rows stay frozen, `config.freeze_learned`).
    Full finetuning and LoRA (`config.method`) share the targets and the until-learned check;
    the slot steps are SMF's. Raises MemtuneError for data or options that do not fit."""
    from memtune.retrofit import get_memory_bank, retrofit

    config = config or LearnConfig()
    recipe = recipe or RecipeConfig()
    data = _check_data(data)
    facts = isinstance(data[0], QA)
    smf = config.method == "smf"
    if getattr(model, "peft_config", None) is not None:
        raise MemtuneError(f"the model is a LoRA adapter over its base: --method {config.method} learns a base model "
                           "or a memory checkpoint (merge the adapter into the base first)")
    if not smf:
        if get_memory_bank(model) is not None:
            raise MemtuneError(f"--method {config.method} trains a base model: pass a model without memory layers")
    # options that do nothing for this method: refused, as the command line refuses them (given
    # here = not the default)
    default, default_recipe = LearnConfig(method=config.method), RecipeConfig()
    check_options(config.method, [k for k in (*SMF_ONLY, *LORA_ONLY) if getattr(config, k) != getattr(default, k)]
                  + [k for k in RECIPE_SMF_ONLY if getattr(recipe, k) != getattr(default_recipe, k)],
                  SMF_ONLY + RECIPE_SMF_ONLY)
    if not facts:  # (a lever turned off is accepted: a script may pin it off for any data)
        shaped = [(k, getattr(recipe, k)) for k in RECIPE_FACTS_ONLY
                  if getattr(recipe, k) != getattr(default_recipe, k) and getattr(recipe, k) != LEVER_OFF.get(k)]
        if config.consolidate not in (default.consolidate, 0):  # documents have no until-learned check to add a margin to
            shaped.insert(0, ("consolidate", config.consolidate))
        if shaped:
            name, value = shaped[0]
            flag = name.replace("_", "-")
            if isinstance(value, bool):  # as the option is typed: --check-rewrites, --no-end-loss
                given = f"--{flag}" if value else f"--no-{flag}"
            else:
                given = f"--{flag}=" + (",".join(value) if isinstance(value, tuple) else str(value))
            raise MemtuneError(f"{given} is for facts ({{question, answer}} items), but the data is documents: drop it")
    if recipe.neighbourhood_check and not config.until_learned:
        raise MemtuneError(f"--neighbourhood-check {recipe.neighbourhood_check} learns the facts again until learned "
                           "after un-writing: drop --no-until-learned (or --neighbourhood-check)")
    pad = tokenizer.pad_token_id
    report: dict = {"source": source, "items": len(data), "kind": "qa" if facts else "documents"}
    start = time.perf_counter()
    torch.manual_seed(config.seed)

    fresh = False
    given: dict[str, object] = {}  # statistics folders the user named, checked before any work
    if smf:
        from memtune.stats import Background

        bank = get_memory_bank(model)
        if bank is None:
            named = [n for n in ("background", "protect") if getattr(recipe, n) not in (AUTO, NONE)]
            if named:
                raise MemtuneError(f"{named[0]}={getattr(recipe, named[0])!r} holds statistics of a memory, but the "
                                   "model has none: pass the memory checkpoint they were computed on as --model")
            memory = default_memory_config(model, getattr(model.config, "name_or_path", None), recipe.n_keys)
            memory.shard_values = recipe.shard_values
            retrofit(model, memory)
            fresh = True
            report["retrofit"] = {k: v for k, v in memory.to_dict().items() if v is not None}
            bank = get_memory_bank(model)
        else:
            # what shapes a fresh retrofit cannot change a memory: refused unless it says what it has
            fresh_only = [k for k in ("n_keys", "shard_values", "calibrate", "align_phrasings")
                          if getattr(recipe, k) not in (getattr(default_recipe, k), getattr(bank.config, k, None))]
            if fresh_only:
                raise MemtuneError(f"--{fresh_only[0].replace('_', '-')} is for a fresh retrofit: the model already has "
                                   "its memory (pass the base model to retrofit a new one)")
            report["memory"] = {"continued": True, "earlier_calls": len(bank.ledger.calls),
                                "frozen_rows": sum(int(r.numel()) for r in bank.ledger.frozen.values())}
            for name in ("background", "protect"):
                folder = getattr(recipe, name)
                if folder not in (AUTO, NONE):
                    given[name] = Background.load(folder)
                    given[name].check(bank, folder)
        bank.check_write_knn(config.write_knn)  # before any work: the method sets it only when training

    # -- what the model must keep: questions of the data's form it writes itself, and --keep
    keep_questions = read_questions(recipe.keep) if recipe.keep else []
    related: list[str] = []
    needs_related = (smf and facts and recipe.related > 0
                     and (AUTO in (recipe.background, recipe.protect) or recipe.neighbourhood_check))
    if needs_related:
        related = related_questions(model, tokenizer, [q.question for q in data], recipe.related, seed=config.seed,
                                    progress=progress)
        report["related_questions"] = {"asked": recipe.related, "written": len(related), "questions": related}
    own_user = {_normal(q.question) for q in data} if facts else set()
    # a question of the data is what is being learned, not kept (related_questions leaves them out already)
    keep_kept = [q for q in keep_questions if _normal(q) not in own_user]
    guarded = [*related, *keep_kept]
    around: list[str] = []  # the neighbourhood questions kept
    if smf and facts and recipe.neighbourhood_keep and guarded and AUTO in (recipe.background, recipe.protect):
        # the data's forms about other subjects, kept as the related questions are
        asked_already = own_user | {_normal(q) for q in guarded}
        around = list(dict.fromkeys(q for q, _ in neighbourhood_prompts(data, guarded, recipe.neighbourhood_keep,
                                                                        config.seed, statements=False)
                                    if _normal(q) not in asked_already))
        report["neighbourhood_keep"] = {"per_fact": recipe.neighbourhood_keep, "questions": len(around),
                                        "examples": around[:3]}
        if not around:
            log.info("--neighbourhood-keep %d: no new questions about other subjects (the data's forms about the "
                     "related and --keep questions' subjects are among those questions already, or none has a "
                     "subject to put in)", recipe.neighbourhood_keep)
    cross: list[str] = []  # the data's subjects in its other forms (protected where their answers are)
    cross_subjects: list[str] = []  # ... and the subject each asks about
    if smf and facts and recipe.neighbourhood_cross and AUTO in (recipe.background, recipe.protect):
        taken = own_user | {_normal(q) for q in guarded + around}
        pairs = [(q, subject) for q, subject in cross_questions(data) if _normal(q) not in taken]
        cross, cross_subjects = [q for q, _ in pairs], [subject for _, subject in pairs]
        report["neighbourhood_cross"] = {"questions": len(cross), "examples": cross[:3]}
        if not cross:
            log.info("--neighbourhood-cross: no question (the data has one form, or its subjects were not found)")
    subjects = guarded  # (where the neighbourhood questions take their subjects from)
    guarded = guarded + around
    guard_examples: list[Example] = []
    cross_examples: list[Example] = []
    if guarded:
        guard_examples = own_answer_examples(model, tokenizer, guarded, recipe.max_new_tokens, progress)
    if cross:  # (a question answered with nothing is left out: its subject with it)
        answered = AnswersKept(model, tokenizer, cross, recipe.max_new_tokens, progress)
        subject_of = dict(zip(cross, cross_subjects))
        cross_examples, cross_subjects = answered.examples, [subject_of[q] for q in answered.questions]
        report["neighbourhood_cross"] |= {"answered": len(cross_examples), "subjects": len(set(cross_subjects))}
    kept_check = None  # the data's questions about other subjects, answered before learning
    if smf and facts and recipe.neighbourhood_check:
        # (past the questions protect keeps: their reads are protected, their answers cannot change;
        # a cross question's can, where what its subject alone reads is written)
        protected = frozenset(_normal(q) for q in guarded) if recipe.protect == AUTO else frozenset()
        asked = list(dict.fromkeys(q for q, _ in neighbourhood_prompts(data, subjects, recipe.neighbourhood_check,
                                                                      config.seed, statements=False, skip=protected)))
        if asked:
            kept_check = AnswersKept(model, tokenizer, asked, recipe.max_new_tokens, progress)
        else:
            log.warning("--neighbourhood-check %d: no questions about other subjects, no check (they take their "
                        "subjects from the related and --keep questions: none had a subject to put in, or each question "
                        "is one protect keeps already)",
                        recipe.neighbourhood_check)

    # -- training targets (the base model's own words: before anything is learned in this call)
    more_questions = more_statements = None  # the model's own rewrites (self_paraphrases) ...
    dropped: list[list[str]] = []  # ... and the questions with words left out (word_dropout)
    rewritten: list[QA] = []  # with rewrite_statements="own": each rewrite as a fact of its own ...
    parents: list[int] = []  # ... of this item
    if facts:
        items = list(data)
        wants_statements = recipe.target == "statement" or "plain" in recipe.renderings
        if wants_statements and any(not q.statement for q in items):
            items, restated = in_own_words(model, tokenizer, items, recipe.max_new_tokens, progress,
                                           recipe.name_subject)
            stated = sum(bool(q.statement) for q in items)
            report["targets"] = {"target": recipe.target, "loss": recipe.loss, "own_statements": stated,
                                 "bare_answers": len(items) - stated, "name_subject": recipe.name_subject,
                                 "restated": restated,
                                 "examples": [q.statement or q.answer for q in items[:3]]}
        else:
            report["targets"] = {"target": recipe.target, "loss": recipe.loss}
        if recipe.self_paraphrases:
            from memtune.paraphrases import self_paraphrases

            t = time.perf_counter()
            written = self_paraphrases(model, tokenizer, items, recipe.self_paraphrases, seed=config.seed,
                                       statements="plain" in recipe.renderings, progress=progress)
            more_questions, more_statements = written.questions, written.statements
            report["self_paraphrases"] = {**written.report(), "seconds": round(time.perf_counter() - t, 1)}
            if recipe.rewrite_statements == "own":  # (the statement target: RecipeConfig checks)
                rewritten, parents = own_rewrite_statements(model, tokenizer, items, more_questions,
                                                            recipe.max_new_tokens, progress)
        if recipe.word_dropout:
            from memtune.paraphrases import word_dropout

            dropped = word_dropout(items, recipe.word_dropout, seed=config.seed, avoid=more_questions,
                                   keep=[*related, *keep_questions])
            more_questions = [[*mine, *more] for mine, more in zip(more_questions or [[] for _ in items], dropped)]
            without = sum(not d for d in dropped)
            if without:
                log.info("word dropout: %d of %d questions have no variant (too short, no subject found, or "
                         "every variant is another question)", without, len(items))
            report["word_dropout"] = {"variants": sum(map(len, dropped)), "questions_without": without,
                                      "examples": next((d[:3] for d in dropped if d), [])}

    # -- calibrate a fresh memory on the data's form (changes which slots are read: first)
    if smf and fresh and recipe.calibrate != NONE:
        from memtune.calibrate import calibrate_queries

        plain = (fact_examples(items, tokenizer, "statement", "target", max_length=config.max_length,
                               renderings=recipe.renderings, more_questions=more_questions,
                               more_statements=more_statements)
                 if facts else encode_documents(tokenizer, [d.text for d in data], config.max_length))
        cal = [*plain, *guard_examples, *cross_examples]
        n, batches = first_batches(cal, tokenizer.pad_token_id, len(cal), config.batch_size)
        positions = calibrate_queries(model, batches, recipe.calibrate, n_batches=n, progress=progress)
        report["calibrate"] = {"mode": recipe.calibrate, "examples": len(cal), "positions": positions}
    if smf and fresh and facts and recipe.align_phrasings:
        from memtune.calibrate import align_queries

        phrased = encode_facts(items, tokenizer, recipe.target, "target", max_length=config.max_length,
                               more_questions=more_questions)
        groups: list[list[Example]] = [[] for _ in items]
        for example, owner in zip(phrased.examples, phrased.items):
            groups[owner].append(example)
        if any(len(g) > 1 for g in groups):
            report["align_phrasings"] = align_queries(model, groups, pad, batch_size=config.batch_size,
                                                      progress=progress)
        else:
            log.warning("no fact got a self-paraphrase the filter kept: the memory queries are not aligned")
            report["align_phrasings"] = {"groups": 0}

    owners: list[int] | None = None  # the item of each example (facts)
    if facts:
        diverge = recipe.loss == "diverge"
        encoded = encode_facts(items + rewritten, tokenizer, recipe.target, "target" if diverge else recipe.loss,
                               max_length=config.max_length, renderings=recipe.renderings,
                               more_questions=((dropped or [[] for _ in items]) + [[] for _ in rewritten]
                                               if rewritten else more_questions),  # (rewrites are items then)
                               more_statements=more_statements and more_statements + [[] for _ in rewritten],
                               end_loss=recipe.end_loss)
        asked = items + rewritten if recipe.check_rewrites else items  # what the until-learned check asks
        raw = encoded.items  # indices into items + rewritten
        encoded.items = [i if i < len(items) else parents[i - len(items)] for i in raw]  # each example's fact
        examples, owners = encoded.examples, raw if recipe.check_rewrites else encoded.items  # ... and question
        if recipe.renderings != ("chat",) or recipe.self_paraphrases or recipe.word_dropout:
            report["renderings"] = encoded.summary(len(items), recipe.renderings)
        targets = [list(e.labels) for e in examples]
        if diverge:  # the loss from where the model's own words leave the target (again at each check)
            mask_predicted(model, examples, pad)
        check = AnswerCheck(tokenizer, example_questions(asked), recipe.max_new_tokens,
                            examples=examples if diverge else None, targets=targets if diverge else None,
                            owners=owners)
    else:
        examples = encode_documents(tokenizer, [d.text for d in data], config.max_length)
        check = None

    background, protect = given.get("background"), given.get("protect")
    if smf:
        # the related questions' own answers: protected, and (with the training examples) the background
        guard_stats = None
        guard_positions = "all" if recipe.protect_prompts else config.count_positions
        if facts and recipe.neighbourhood and AUTO in (recipe.background, recipe.protect):
            neighbours = neighbourhood_examples(tokenizer, items, guarded, recipe.neighbourhood, config.seed,
                                                recipe.target == "statement", config.max_length)
            report["neighbourhood"] = {"per_fact": recipe.neighbourhood, "examples": len(neighbours),
                                       "example": tokenizer.decode(neighbours[0].input_ids) if neighbours else None}
            if not neighbours:
                log.warning("--neighbourhood %d: no neighbourhood prompts (they take their subjects from the "
                            "related and --keep questions: none had a subject to put in)", recipe.neighbourhood)
            guard_examples = guard_examples + neighbours
        also = ", and to the cross questions (counted where their answers are predicted)" if cross_examples else ""
        cross_stats = None  # df: the subjects whose cross questions read a slot
        if AUTO in (recipe.background, recipe.protect):
            if guard_examples:
                guard_stats = background_stats(model, guard_examples, pad, len(guard_examples), config.batch_size,
                                               guard_positions, progress)
            if cross_examples:
                by_subject: dict[str, list[Example]] = {}
                for example, subject in zip(cross_examples, cross_subjects):
                    by_subject.setdefault(subject, []).append(example)
                cross_stats = group_stats(model, list(by_subject.values()), pad, config.batch_size,
                                          config.count_positions, progress, desc="cross questions' reads")
        if recipe.background == AUTO and config.ranker in NEEDS_BACKGROUND:
            background = background_stats(model, examples, pad, len(examples), config.batch_size,
                                          config.count_positions, progress)
            for stats in (guard_stats, cross_stats):
                if stats is not None:
                    background = background + stats
            report["background"] = {"source": "auto: training examples + own answers to related, neighbourhood "
                                              "and --keep questions (counted where protect counts them)" + also,
                                    "examples": len(examples) + len(guard_examples) + len(cross_examples),
                                    "batches": background.n_batches}
        elif background is not None:
            report["background"] = {"source": recipe.background, "batches": background.n_batches}
        if cross_stats is not None:  # one subject's own rows stay free to its facts (BENCHMARKS.md, eighteenth round)
            several = cross_stats.read_by(CROSS_SUBJECTS)
            guard_stats = several if guard_stats is None else guard_stats + several
            if recipe.protect == AUTO and not any(v.any() for v in several.df.values()):
                log.warning("--neighbourhood-cross: no slot that the answers about %d or more subjects read (%d subject%s "
                            "asked about): none of their slots protected", CROSS_SUBJECTS, cross_stats.n_batches,
                            "" if cross_stats.n_batches == 1 else "s")
        if recipe.protect == AUTO and guard_stats is not None:
            protect = guard_stats
            which = f"; of these, what the answers about {CROSS_SUBJECTS} or more subjects read" if also else ""
            report["protect"] = {"source": "auto: own answers to related, neighbourhood and --keep questions" + also
                                           + which,
                                 "positions": guard_positions,
                                 "questions": len(guarded) + len(cross), "related": len(related),
                                 "keep": len(keep_kept),
                                 "neighbourhood": len(around), "cross": len(cross),
                                 "slots": {k: int((v > 0).sum()) for k, v in protect.df.items()}}
        elif protect is not None:
            report["protect"] = {"source": recipe.protect}
    report["setup_s"] = round(time.perf_counter() - start, 1)

    method = make_method(config, background, protect)
    extrapolate = smf and facts and recipe.extrapolate != 1
    if kept_check is not None or extrapolate:
        method.remember_originals()
    t = time.perf_counter()
    learned_check = None if check is None else ExampleCheck(check, owners)
    model, history = train(model, tokenizer, examples, config, method, on_step=on_step, progress=progress,
                           learned=learned_check)
    if extrapolate:
        report["extrapolate"] = extrapolate_update(model, tokenizer, examples, config, method, recipe.extrapolate,
                                                   learned_check, history, t, on_step, progress)
    if kept_check is not None:  # (after the scaling: it checks the model as it will be)
        report["neighbourhood_check"] = neighbourhood_check(model, tokenizer, examples, config, method, kept_check,
                                                            learned_check, history, t, on_step, progress)
    report["train_s"] = round(time.perf_counter() - t, 1)
    learned = everything = None  # per fact; per question asked (the facts, then their rewrites)
    if check is not None:  # until learned, train's last check saw the final model
        everything = check.right if config.until_learned else check(model)
        learned = everything[: len(data)]
        report["learned"] = {"right": sum(learned), "items": len(learned)}
        report["check"] = {"asked": check.asked, "generated": check.generated}  # (the rest unchanged: not generated)
        if len(everything) > len(data):
            report["rewrites_learned"] = {"right": sum(everything[len(data):]), "items": len(everything) - len(data)}
    if smf:
        # what the learned data reads now, at every position, stays (what was not learned may be
        # learned by a later call, so its slots stay free)
        if config.protect_learned:
            method.keep_learned(model, examples if learned is None else
                                [e for e, i in zip(examples, owners) if everything[i]], pad, config.batch_size)
        report["call"] = method.record_call({
            "data": source, "items": len(data), "kind": report["kind"], "steps": len(history),
            "learned": report.get("learned"), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - start, 1)}, freeze_updated=not config.protect_learned)
    return LearnResult(model, method, history, report, len(examples), learned)


def neighbourhood_check(model: nn.Module, tokenizer, examples: list[Example], config: LearnConfig, method,
                        kept: AnswersKept, learned: ExampleCheck, history: list[dict], start: float,
                        on_step=None, progress: bool = True) -> dict:
    """`RecipeConfig.neighbourhood_check` after the first training of `examples` by `method`
    (SMF, `remember_originals` called before it; `learned` its until-learned check, `history` its
    metrics, extended here; `start` its `time.perf_counter()`): up to NEIGHBOURHOOD_ROUNDS times,
    the questions of `kept` answered otherwise have the rows they read where their first answer
    is predicted un-written (`SparseMemoryFinetuning.unwrite`), and the examples of the facts
    right before it are trained again until learned (a fact the first training did not learn
    had its passes), within what is left of `config.max_steps` and `config.max_minutes`; once
    rows were un-written, every fact is asked again at the end, so the check's verdicts are the
    final model's. Returns the report: per round the questions answered otherwise and the rows
    un-written, and the facts (the check's items) answered right before the check and after it."""
    rounds, before = [], len(learned.right())
    for r in range(NEIGHBOURHOOD_ROUNDS + 1):
        changed = kept(model)
        rounds.append({"changed": len(changed)})
        if not changed or r == NEIGHBOURHOOD_ROUNDS or _spent(budget_left(config, history, start)):
            break
        reads = background_stats(model, [kept.examples[i] for i in changed], tokenizer.pad_token_id, len(changed),
                                 config.batch_size, "loss", progress=False)
        right_now = learned.right()
        again = [j for j, i in enumerate(learned.owners) if i in right_now]  # examples to learn again
        rounds[-1]["rows_unwritten"] = method.unwrite(reads) if again else 0
        if not rounds[-1]["rows_unwritten"]:  # nothing learned, or what changed them is not where they answer
            break
        learn_again(model, tokenizer, examples, again, config, method, learned, history, start, on_step, progress)
    if any(x.get("rows_unwritten") for x in rounds):  # the facts not trained again may read what was un-written
        learned.check(model)
    after = len(learned.right())
    log.info("neighbourhood check: %s of %d questions about other subjects answered otherwise, round by round; "
             "%d of %d facts right before it, %d after", " -> ".join(str(x["changed"]) for x in rounds),
             len(kept.questions), before, len(learned.check.items), after)
    if after < before:
        log.warning("neighbourhood check: %d facts answered right before it are not after it (learned again, "
                    "they read the rows it protected)", before - after)
    return {"questions": len(kept.questions), "rounds": rounds, "right_before": before, "right_after": after}


def budget_left(config: LearnConfig, history: list[dict], start: float) -> tuple[int | None, float | None]:
    """What is left of `config.max_steps` after `history`'s steps and of `config.max_minutes`
    since `start` (a `time.perf_counter()`): (steps, minutes), None where there is no cap."""
    steps = None if config.max_steps is None else config.max_steps - len(history)
    minutes = None if config.max_minutes is None else config.max_minutes - (time.perf_counter() - start) / 60
    return steps, minutes


def _spent(left: tuple[int | None, float | None]) -> bool:
    return any(x is not None and x <= 0 for x in left)


def learn_again(model: nn.Module, tokenizer, examples: list[Example], again: list[int], config: LearnConfig, method,
                learned: ExampleCheck, history: list[dict], start: float, on_step=None, progress: bool = True) -> None:
    """Train `examples[j]` for j in `again` by `method` (which trained `examples` first, `learned`
    its until-learned check and `history` its metrics, extended here with the step numbers going
    on; `start` its `time.perf_counter()`), until learned, within what is left of
    `config.max_steps` and `config.max_minutes`; nothing when none is left."""
    steps_left, minutes_left = left = budget_left(config, history, start)
    if not again or _spent(left):
        return
    offset = len(history)  # step numbers go on from the first training
    shifted = lambda m: {**m, "step": m["step"] + offset}  # noqa: E731
    _, more = train(model, tokenizer, [examples[j] for j in again],
                    replace(config, max_steps=steps_left, max_minutes=minutes_left), method, progress=progress,
                    learned=ExampleCheck(learned.check, [learned.owners[j] for j in again]),
                    on_step=None if on_step is None else lambda m: on_step(shifted(m)))
    history += [shifted(m) for m in more]


def extrapolate_update(model: nn.Module, tokenizer, examples: list[Example], config: LearnConfig, method,
                       factor: float, learned: ExampleCheck | None, history: list[dict], start: float,
                       on_step=None, progress: bool = True) -> dict:
    """`RecipeConfig.extrapolate` after `method` (SMF, `remember_originals` called before its
    training) trained `examples`: its update to every value row it wrote is scaled by `factor`
    (`SparseMemoryFinetuning.extrapolate`); then, with an until-learned check (`learned`), the
    facts right before and wrong after are trained again until learned (`learn_again`), and every
    fact is asked again at the end, so the check's verdicts are the final model's. Returns the
    report: the rows scaled, and the facts (the check's items) right before, right just after the
    scaling, and right at the end."""
    until_learned = learned is not None and config.until_learned
    if until_learned and _spent(budget_left(config, history, start)):
        log.warning("--extrapolate %g skipped: no step or time left (--max-steps / --max-minutes) to learn again "
                    "what the scaling would undo", factor)
        return {"factor": factor, "rows": 0, "skipped": "no step or time left to learn again"}
    rows = method.extrapolate(factor)
    out = {"factor": factor, "rows": rows}
    if not until_learned:
        return out
    before = learned.right()
    learned.check(model)
    now = learned.right()
    again = [j for j, i in enumerate(learned.owners) if i in before - now]
    if again:
        method.relearn = True  # the facts learned again may move their own rows
        learn_again(model, tokenizer, examples, again, config, method, learned, history, start, on_step, progress)
        learned.check(model)  # (training those again may move the others' answers)
    after = learned.right()
    log.info("extrapolated the update by %g (%d rows): %d facts right before, %d just after, %d at the end",
             factor, rows, len(before), len(now), len(after))
    if before - after:
        log.warning("--extrapolate %g: %d facts answered right before the scaling are not after learning them again "
                    "(out of steps or time?); --extrapolate 1 leaves the update as trained", factor, len(before - after))
    return {**out, "right_before": len(before), "right_scaled": len(now), "right_after": len(after)}


def own_rewrite_statements(model: nn.Module, tokenizer, items: list[QA], rewrites: list[list[str]],
                           max_new_tokens: int = 24, progress: bool = True) -> tuple[list[QA], list[int]]:
    """Each rewrite of `items[i]` (`rewrites[i]`: e.g. the model's own, `memtune.paraphrases`) as
    a fact of its own whose statement is in the model's own words for that rewrite
    (`own_statements`: "Which three-letter currency code does Chad use?" -> "The three-letter
    currency code of Chad is XAF."), and the item each belongs to. A rephrased question is often
    answered with other first words than the original, and the answer is then read after
    another context: trained this way, the fact is learned after those words too (issue 17)."""
    parents = [i for i, written in enumerate(rewrites) for _ in written]
    if not parents:
        return [], []
    rewritten = [QA(text, items[i].answer, items[i].aliases, id=items[i].id)
                 for i, written in enumerate(rewrites) for text in written]
    # (each rewrite trained after its own opening, whatever it names: as the twelfth round measured it)
    return in_own_words(model, tokenizer, rewritten, max_new_tokens, progress, name_subject=False)[0], parents


# asked when the model's own answer to a question does not name its subject (`in_own_words`)
RESTATE = "Question: {question}\nAnswer: {answer}\nRewrite the answer as one full sentence."


def in_own_words(model: nn.Module, tokenizer, items: list[QA], max_new_tokens: int = 24,
                 progress: bool = True, name_subject: bool = True) -> tuple[list[QA], int]:
    """`items` with a statement in the model's own words where they have none: its greedy answer
    to each question, then `memtune.targets.own_statements`; and how many were restated.

    With `name_subject`, a statement names what its question is about (`question_forms`' subject)
    where the model can say it so: where the model's own answer does not, it is asked to restate
    the answer (`RESTATE`: "Question: Porto-Novo is the capital of which country?\nAnswer:
    Benin\n…" → "Porto-Novo is the capital of Benin, a country in West Africa."), and
    `own_statements` takes the likeliest opening of either answer that names the subject where
    one makes the answer likelier than the bare answer; else the own answer's openings, as
    without (BENCHMARKS.md, nineteenth round)."""
    from memtune.probes.qa import answer_questions

    own = answer_questions(model, tokenizer, [q.question for q in items], max_new_tokens, progress=progress)
    if not name_subject:
        return own_statements(model, tokenizer, items, own), 0
    subjects = [subject for _, subject in question_forms([q.question for q in items])]
    unnamed = [i for i, (q, a, subject) in enumerate(zip(items, own, subjects))
               if not q.statement and subject and not any(statement_prefixes(q, a, subject))]
    answers: list = list(own)
    if unnamed:
        asks = [RESTATE.format(question=items[i].question, answer=items[i].answer) for i in unnamed]
        restated = answer_questions(model, tokenizer, asks, max_new_tokens, progress=progress)
        for i, again in zip(unnamed, restated):
            answers[i] = [own[i], again]
    return own_statements(model, tokenizer, items, answers, subjects=subjects), len(unnamed)


def _check_data(data) -> list:
    """`data` as a non-empty list of QA, or of Document; MemtuneError otherwise."""
    data = list(data) if not isinstance(data, (str, bytes)) else None
    if not data:
        raise MemtuneError("no data to learn: expected a non-empty list of memtune.data.QA or Document")
    kind = QA if isinstance(data[0], QA) else Document
    for i, item in enumerate(data):
        if not isinstance(item, kind):
            raise MemtuneError(f"data[{i}] is a {type(item).__name__}: expected every item to be a {kind.__name__} "
                               "(QA for facts, Document for text; not both)")
        if kind is QA and not (str(item.question).strip() and str(item.answer).strip()):
            raise MemtuneError(f"data[{i}] ({item.question!r} -> {item.answer!r}): question and answer must not be empty")
        if kind is Document and not str(item.text).strip():
            raise MemtuneError(f"data[{i}] is an empty document")
    return data
