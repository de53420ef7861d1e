"""Further phrasings of a fact (issue 17). Word dropout (`word_dropout`, at the end; in the
recipe by default) needs no model: the question with one or two of its words left out.

Self-generated paraphrases (experimental, off by default): the model being taught rewrites each
question — and, for the plain rendering, each statement — in its own words, and a filter keeps
the rewrites that still ask (or state) the same fact. The kept rewrites are trained as further
phrasings of the fact (`memtune.targets.encode_facts`'s `more_questions`, `more_statements`),
beside the question; the data's own paraphrases stay held out.

How the model is asked: plain text, no chat template (as `memtune.recipe.related_questions`
asks it), so that base and instruct models continue the same page — a few fixed examples of
rewrites of general-knowledge questions (never the data's own paraphrases, nor a question of
the packaged countries' forms: a countries example taught the held-out template), then the question;
the first line it writes is the rewrite. Sampled (temperature 0.8, top-p 0.95), seeded; the
global random state is restored afterwards.

The filter (`paraphrase_fault`): a rewrite is kept when it

- differs from the original (compared as lower-case words, punctuation dropped) and from every
  rewrite already kept for it and every text in `avoid` (the data's held-out paraphrases: a
  rewrite that happens to equal one would leak it into training);
- has 3 to 40 words;
- keeps the subject: every subject word of the original (`question_subjects`) is among its words;
- a question: ends with its only "?", or is a request ("Name the capital city of Chad.": one
  sentence ending with "." that opens with a verb of `REQUEST_VERBS`, then, after an optional
  "me", a word of `REQUEST_OBJECTS`), and contains none of the answers (as whole words);
- a statement: is not a question and contains the answer as written, after every subject word
  (the plain rendering's loss is on the answer: it must follow what it is about).
"""

from __future__ import annotations

import itertools
import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from memtune.data import QA
from memtune.errors import is_int
from memtune.prompts import encode_text

log = logging.getLogger(__name__)

Kind = Literal["question", "statement"]
KINDS = ("question", "statement")
MIN_WORDS, MAX_WORDS = 3, 40
# Words word dropout never leaves out: without them a question asks another real question
# ("Who is the vice president of ...?", "Which country is not in ...?", "Who was the first king ...?")
MEANING_WORDS = frozenset({"not", "no", "never", "nor", "without", "least", "vice", "deputy", "acting", "co",
                           "former", "first", "second", "third", "fourth", "fifth", "last", "next", "previous"})
# Verbs that open a request asking what a question asks ("Name the ...", "Give the ...")
REQUEST_VERBS = frozenset({"name", "give", "tell", "state", "list", "identify", "say", "provide"})
# ... followed (after an optional "me") by what is asked: "Name the ...", "Tell me which ..."
REQUEST_OBJECTS = frozenset({"the", "a", "an", "one", "which", "what", "who", "where", "when", "how"})

QUESTION_PROMPT = (
    "Each question is asked again in other words.\n\n"
    "Question: What is the tallest mountain on Earth?\nIn other words: Which mountain on Earth is the highest?\n\n"
    "Question: Who wrote Hamlet?\nIn other words: Name the author of the play Hamlet.\n\n"
    "Question: When did the Second World War end?\nIn other words: In which year did the Second World War "
    "come to an end?\n\n"
    "Question: {text}\nIn other words:"
)
STATEMENT_PROMPT = (
    "Each sentence is said again in other words.\n\n"
    "Sentence: The tallest mountain on Earth is Mount Everest.\nIn other words: Mount Everest is the highest "
    "mountain on Earth.\n\n"
    "Sentence: Hamlet was written by William Shakespeare.\nIn other words: The author of the play Hamlet is "
    "William Shakespeare.\n\n"
    "Sentence: The Second World War ended in 1945.\nIn other words: The Second World War came to an end in 1945.\n\n"
    "Sentence: {text}\nIn other words:"
)


def _words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped (as `memtune.recipe` compares questions)."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _has_phrase(words: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return n > 0 and any(words[i : i + n] == phrase for i in range(len(words) - n + 1))


def question_subjects(questions: Sequence[str]) -> list[set[str]]:
    """What each question is about, as lower-case words: its names (capitalised after the first
    word, or digits) among `memtune.recipe.subject_words(questions)`, a short one (a symbol
    "As") only where it is the question's own subject (`question_forms`); else its words among
    those; else its own names of 3+ letters or digits. An empty set: nothing to check a rewrite
    against (none is kept)."""
    from memtune.recipe import named_subjects, question_forms, question_names

    forms = question_forms(list(questions))
    subjects = {w for _, subject in forms for w in subject}
    out = []
    for q, (_, own) in zip(questions, forms):
        names = question_names(q)
        named = {w for w in named_subjects(q, subjects) if w in own or len(w) >= 3 or w.isdigit()}  # not U.S.'s "s"
        out.append((named & names) or named or {w for w in names if len(w) >= 3 or w.isdigit()})
    return out


def paraphrase_fault(original: str, rewrite: str, answers: str | Sequence[str], subject: Iterable[str],
                     kind: Kind = "question", avoid: Iterable[str] = ()) -> str | None:
    """Why `rewrite` is not kept as a rewrite of `original` (module doc), or None when it is.
    `answers`: the answer first, then its aliases; `subject`: lower-case words (`question_subjects`);
    `avoid`: texts it must not equal (earlier rewrites, held-out paraphrases)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    answers = [answers] if isinstance(answers, str) else list(answers)
    text = rewrite.strip()
    words = _words(text)
    if words == _words(original):
        return "same"
    if any(words == _words(a) for a in avoid):
        return "duplicate"
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return "length"
    subject = set(subject)
    if not subject or not subject <= set(words):
        return "subject"
    if kind == "question":
        asks = text.endswith("?") and text.count("?") == 1
        requests = (text.endswith(".") and "?" not in text and not re.search(r"[.!]\s", text)
                    and words[0] in REQUEST_VERBS and (words[1] in REQUEST_OBJECTS
                                                       or words[1] == "me" and words[2] in REQUEST_OBJECTS))
        if not (asks or requests):
            return "not a question"
        given = _words(original)  # "the capital of Djibouti": the answer is the subject's name
        if any(_has_phrase(words, _words(a)) and not _has_phrase(given, _words(a)) for a in answers):
            return "answer"
        return None
    if text.endswith("?"):
        return "not a statement"
    at = text.rfind(answers[0])  # the last: a subject named like its answer comes first
    if at < 0:
        return "answer"
    if not subject <= set(_words(text[:at])):
        return "answer before subject"
    return None


def keep_paraphrase(original: str, rewrite: str, answers: str | Sequence[str], subject: Iterable[str],
                    kind: Kind = "question", avoid: Iterable[str] = ()) -> bool:
    """Whether `rewrite` says what `original` says, in other words (`paraphrase_fault`)."""
    return paraphrase_fault(original, rewrite, answers, subject, kind, avoid) is None


@torch.no_grad()
def sample_rewrites(model: nn.Module, tokenizer, texts: Sequence[str], k: int, kind: Kind = "question",
                    seed: int = 0, batch_size: int = 16, max_new_tokens: int = 48, temperature: float = 0.8,
                    progress: bool = True) -> list[list[str]]:
    """`k` sampled rewrites of each of `texts` by `model` (module doc: the prompt), unfiltered:
    the first line of each continuation, stripped."""
    if k <= 0 or not texts:
        return [[] for _ in texts]
    from tqdm.auto import tqdm

    template = QUESTION_PROMPT if kind == "question" else STATEMENT_PROMPT
    device = next(model.parameters()).device
    out: list[list[str]] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for s in tqdm(range(0, len(texts), batch_size), desc=f"rewrite {kind}s", disable=not progress):
            prompts = [encode_text(tokenizer, template.format(text=t)) for t in texts[s : s + batch_size]]
            batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt", padding=True).to(device)
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                       top_p=0.95, num_return_sequences=k, pad_token_id=tokenizer.pad_token_id)
            decoded = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for j in range(len(prompts)):
                out.append([d.strip().split("\n", 1)[0].strip() for d in decoded[j * k : (j + 1) * k]])
    finally:
        tokenizer.padding_side = side
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return out


@dataclass
class SelfParaphrases:
    """The kept rewrites per item (`questions[i]`, `statements[i]`) and what the filter did."""

    questions: list[list[str]]
    statements: list[list[str]]
    asked: int
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> fault -> count

    def report(self) -> dict:
        """Counts and the kept rewrites, for config.json's `steps`."""
        out: dict = {"asked_per_text": self.asked}
        for kind, kept in (("question", self.questions), ("statement", self.statements)):
            if kind in self.rejected:
                out[kind + "s"] = {"kept": sum(map(len, kept)), "items_with_rewrites": sum(bool(k) for k in kept),
                                   "rejected": self.rejected[kind], "kept_rewrites": kept}
        return out


def self_paraphrases(model: nn.Module, tokenizer, items: Sequence[QA], k: int, seed: int = 0,
                     statements: bool = False, batch_size: int = 16, max_new_tokens: int = 48,
                     progress: bool = True) -> SelfParaphrases:
    """The model's own rewrites of each item's question (and, with `statements`, of its
    statement, where it has one) that the filter keeps (module doc): up to `k` per text, asked
    `k` times each."""
    items = list(items)
    subjects = question_subjects([q.question for q in items])
    result = SelfParaphrases([[] for _ in items], [[] for _ in items], k)
    kinds: list[Kind] = ["question", *(["statement"] if statements else [])]
    for kind in kinds:
        todo = [i for i, q in enumerate(items) if kind == "question" or q.statement]
        originals = [items[i].question if kind == "question" else items[i].statement for i in todo]
        written = sample_rewrites(model, tokenizer, originals, k, kind, seed, batch_size, max_new_tokens,
                                  progress=progress)
        faults: dict[str, int] = {}
        kept = result.questions if kind == "question" else result.statements
        for i, original, rewrites in zip(todo, originals, written):
            for rewrite in rewrites:
                fault = paraphrase_fault(original, rewrite, items[i].answers, subjects[i], kind,
                                         avoid=[*items[i].paraphrases, *kept[i]])
                if fault is None:
                    kept[i].append(rewrite.strip())
                else:
                    faults[fault] = faults.get(fault, 0) + 1
        result.rejected[kind] = faults
        log.info("self-paraphrases: kept %d of %d %s rewrites (%d of %d items have one)", sum(map(len, kept)),
                 k * len(todo), kind, sum(bool(x) for x in kept), len(items))
    return result


def word_dropout(items: Sequence[QA], k: int, seed: int = 0,
                 avoid: Sequence[Iterable[str]] | None = None, keep: Iterable[str] = ()) -> list[list[str]]:
    """Up to `k` variants of each item's question with one or two of its words left out (word
    dropout): further phrasings that need neither the model nor paraphrase data (issue 17).

    Only lower-case words that are neither the first nor the last word, not subject words
    (`question_subjects`) and not in `MEANING_WORDS` (negations, ordinals, "vice": without them a
    question asks another question) are left out, so every variant keeps its opening, its "?"
    and what it is about ("What is the atomic number of francium?" → "What is the number of
    francium?"); a question without subject words gets none. A variant is kept when it has
    `MIN_WORDS` words or more and is not (as lower-case words) any item's question or held-out
    paraphrase, one of `keep` (questions whose own answers must stay: the recipe's related and
    --keep questions), a variant of another item ("What is the of Ostland?" from its capital and
    its currency: two answers), or one of `avoid[i]` (e.g. item i's self-paraphrases). Up to `k`
    are drawn (seeded) from the kept one- and two-word drops; a question with fewer has fewer,
    possibly none.

    Returns: one list of variants per item, in order.
    Raises: ValueError for a `k` that is not a non-negative integer."""
    if not is_int(k) or k < 0:
        raise ValueError(f"k={k!r}: expected a non-negative integer")
    items = list(items)
    taken = {" ".join(_words(t)) for t in (*(t for q in items for t in (q.question, *q.paraphrases)), *keep)}
    candidates: list[dict[str, str]] = []  # per item: lower-case words -> variant
    owners: dict[str, int] = {}  # lower-case words -> how many items have that variant
    for i, (item, subject) in enumerate(zip(items, question_subjects([q.question for q in items]))):
        words = item.question.split()
        free = [j for j, w in enumerate(words[1:-1], 1)
                if w.isalpha() and w.islower() and w not in subject and w not in MEANING_WORDS]
        mine = {" ".join(_words(t)) for t in (avoid[i] if avoid else ())}
        variants: dict[str, str] = {}
        for drop in (set(c) for n in (1, 2) for c in itertools.combinations(free, n)) if subject else ():
            text = " ".join(w for j, w in enumerate(words) if j not in drop)
            key = " ".join(_words(text))
            if len(key.split()) >= MIN_WORDS and key not in taken and key not in mine:
                variants.setdefault(key, text)
        candidates.append(variants)
        for key in variants:
            owners[key] = owners.get(key, 0) + 1
    rng = random.Random(seed)
    out = []
    for variants in candidates:
        kept = [text for key, text in variants.items() if owners[key] == 1]
        out.append(rng.sample(kept, min(k, len(kept))))
    return out
