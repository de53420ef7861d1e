"""What a fact is trained as: the target text after its question, and where the loss goes.

- ``target="answer"`` trains the bare answer; ``"statement"`` the fact as a sentence ("The
  capital of Chad is N'Djamena."), the way a chat model answers. A fact without a statement
  gets one in the model's own words (`own_statements`).
- ``loss="target"`` puts the loss on the whole target; ``"answer"`` on the answer inside a
  statement (the words before it teacher-forced context); ``"diverge"`` on the target from the
  first token the model would not say itself: greedy decoding follows the model's own words up
  to there, so that is where the fact must be taught (and where SMF counts slot reads).

What follows the answer in the target (a statement's full stop, the end of the turn) gets the
loss too unless ``end_loss=False``: then the loss stops at the answer's last token (in every
rendering that asks the question), so a model taught short statements does not learn to stop
right after a name or a place. A target whose answer's last token merges with what follows
keeps its loss there.

The loss positions are also SMF's counted positions (`count_positions="loss"`): a target that
leaves the model's own words untouched keeps the slots those words read out of the update.

**Renderings** (`renderings=`, experimental, issue 17): one fact trained in several forms, so
that it is learned as a fact rather than as one prompt's continuation. Every rendering puts the
loss on what the fact says — never on the question:

- ``chat``: the chat question -> the target as above (`target`, `loss`); the default and the only
  rendering before issue 17.
- ``short``: the chat question -> the bare answer and the end of the turn, loss on both (on the
  answer only with ``end_loss=False``, as in every question rendering).
- ``plain``: the statement as plain text, no chat template (``BOS? + "The capital of Chad is
  N'Djamena."``, no EOS: a sentence of running text), loss on exactly the tokens that overlap the
  answer's characters. A fact whose statement is missing, does not contain its answer, or starts
  with it (nothing to predict it from) has no plain example.
- ``qa-text``: the question without the chat template, as `memtune.prompts` writes a plain prompt:
  ``BOS? + "Question: What is the capital of Chad?\nAnswer:"`` then ``" N'Djamena" + EOS``, loss
  on the answer and EOS.

The question renderings (chat, short, qa-text) are made for the question, its first `augment`
paraphrases and any `more_questions`; plain for the statement and any `more_statements`. An
example that an earlier rendering already gave the fact (short after chat when the target is the
bare answer) is not repeated. `loss="diverge"` then trims every example.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from memtune.batches import IGNORE, Example, collate, encode_qa
from memtune.data import QA
from memtune.errors import MemtuneError
from memtune.prompts import answer_opening, encode_prompt, special_prefix

TARGETS = ("answer", "statement")
LOSSES = ("target", "answer", "diverge")
Target = Literal["answer", "statement"]
Loss = Literal["target", "answer", "diverge"]
RENDERINGS = ("chat", "short", "plain", "qa-text")
QUESTION_RENDERINGS = ("chat", "short", "qa-text")  # the renderings that ask the fact's question
# own_statements tries the answer after each of the first words of the model's own sentence
MAX_PREFIX_WORDS = 12


def check_target(target: str, loss: str) -> None:
    if target not in TARGETS:
        raise MemtuneError(f"target={target!r} is invalid: expected one of {', '.join(TARGETS)}")
    if loss not in LOSSES:
        raise MemtuneError(f"loss={loss!r} is invalid: expected one of {', '.join(LOSSES)}")


def check_renderings(renderings, ask: bool = False) -> tuple[str, ...]:
    """`renderings` as a tuple of known names, each once; with `ask`, one of them must ask the
    fact's question (so that every fact has an example, whatever its statement)."""
    names = (renderings,) if isinstance(renderings, str) else tuple(renderings)
    bad = [r for r in names if r not in RENDERINGS]
    if bad or not names or len(set(names)) < len(names):
        raise MemtuneError(f"renderings={','.join(map(str, names))!r} is invalid: expected distinct names of "
                           f"{', '.join(RENDERINGS)}")
    if ask and not set(names) & set(QUESTION_RENDERINGS):
        raise MemtuneError(f"renderings={','.join(names)!r} is invalid: one of {', '.join(QUESTION_RENDERINGS)} is "
                           "needed (the until-learned check asks each fact's question)")
    return names


@dataclass
class FactExamples:
    """Training examples of facts, with the item (index into the facts) and the rendering each
    example belongs to; examples are grouped by item, in the items' order."""

    examples: list[Example]
    items: list[int]
    renderings: list[str]

    def summary(self, n_items: int, renderings: tuple[str, ...]) -> dict:
        """Examples per rendering, and how many of the `n_items` facts each rendering left out."""
        return {"renderings": list(renderings), "examples": len(self.examples),
                "per_rendering": {r: self.renderings.count(r) for r in renderings},
                "items_without": {r: n_items - len({i for i, n in zip(self.items, self.renderings) if n == r})
                                  for r in renderings}}


def fact_examples(items: list[QA], tokenizer: PreTrainedTokenizerBase, target: Target = "answer",
                  loss: Loss = "target", augment: int = 0, max_length: int = 256,
                  model: nn.Module | None = None, renderings: tuple[str, ...] = ("chat",),
                  more_questions: list[list[str]] | None = None,
                  more_statements: list[list[str]] | None = None, end_loss: bool = True) -> list[Example]:
    """Each fact as it is trained: its question (and its first `augment` paraphrases) -> its
    answer or statement (a fact without a statement trains its answer). `loss="diverge"` needs
    the `model` that will learn the facts. Returns one example per (fact, phrasing), facts in
    order; with other `renderings` (module doc) per (fact, rendering, phrasing), see
    `encode_facts` for which fact each belongs to."""
    return encode_facts(items, tokenizer, target, loss, augment, max_length, model, renderings, more_questions,
                        more_statements, end_loss).examples


def encode_facts(items: list[QA], tokenizer: PreTrainedTokenizerBase, target: Target = "answer",
                 loss: Loss = "target", augment: int = 0, max_length: int = 256,
                 model: nn.Module | None = None, renderings: tuple[str, ...] = ("chat",),
                 more_questions: list[list[str]] | None = None,
                 more_statements: list[list[str]] | None = None, end_loss: bool = True) -> FactExamples:
    """`fact_examples` with the item and rendering of each example. `more_questions[i]` and
    `more_statements[i]` are further phrasings of item i (e.g. the model's own rewrites,
    `memtune.paraphrases`), trained after its question and first `augment` paraphrases (by the
    question renderings), or after its statement (by plain). `end_loss=False` takes the loss off
    what follows the answer in the question renderings' targets (module doc)."""
    check_target(target, loss)
    renderings = check_renderings(renderings)
    for name, more in (("more_questions", more_questions), ("more_statements", more_statements)):
        if more is not None and len(more) != len(items):
            raise ValueError(f"{name} has {len(more)} lists for {len(items)} items")
    questions = [[q.question, *q.paraphrases[:augment], *(more_questions[i] if more_questions else [])]
                 for i, q in enumerate(items)]
    per_item: dict[str, list[list[Example]]] = {}
    for name in renderings:
        if name == "chat":
            per_item[name] = _chat_examples(items, questions, tokenizer, target, loss, max_length, end_loss)
        elif name == "plain":
            statements = [[s for s in [q.statement, *(more_statements[i] if more_statements else [])] if s]
                          for i, q in enumerate(items)]
            per_item[name] = [[e for e in (_plain_example(tokenizer, s, q.answer, max_length) for s in stated) if e]
                              for q, stated in zip(items, statements)]
        else:  # short, qa-text: question -> the bare answer, with or without the chat template
            chat = False if name == "qa-text" else None
            pairs = [(t, q.answer) for q, ts in zip(items, questions) for t in ts]
            flat = encode_qa(tokenizer, pairs, max_length, chat=chat)
            if not end_loss:
                opening = answer_opening(tokenizer, chat)
                for example, (_, answer) in zip(flat, pairs):
                    mask_after(example, tokenizer(opening + answer, add_special_tokens=False)["input_ids"])
            per_item[name] = _regroup(flat, questions)
    out = FactExamples([], [], [])
    for i in range(len(items)):
        earlier: list[Example] = []  # the item's examples from the renderings before this one
        for name in renderings:
            fresh = [e for e in per_item[name][i] if e not in earlier]
            out.examples += fresh
            out.items += [i] * len(fresh)
            out.renderings += [name] * len(fresh)
            earlier += fresh
    if loss == "diverge":
        if model is None:
            raise ValueError("loss=diverge needs the model that learns the facts")
        mask_predicted(model, out.examples, tokenizer.pad_token_id)
    return out


def _regroup(examples: list[Example], groups: list[list[str]]) -> list[list[Example]]:
    """A flat list of examples, one per phrasing, as one list per item."""
    out, at = [], 0
    for g in groups:
        out.append(examples[at : at + len(g)])
        at += len(g)
    return out


def _chat_examples(items: list[QA], questions: list[list[str]], tokenizer: PreTrainedTokenizerBase, target: Target,
                   loss: Loss, max_length: int, end_loss: bool = True) -> list[list[Example]]:
    """The chat rendering: each phrasing -> the answer or statement, per item."""
    pairs, prefixes, heads = [], [], []
    for q, phrasings in zip(items, questions):
        stated = target == "statement" and bool(q.statement)
        text = q.statement if stated else q.answer
        at = text.rfind(q.answer) if stated else 0
        cut = at if loss == "answer" else -1  # after the subject
        for question in phrasings:
            pairs.append((question, text))
            prefixes.append(text[:cut].rstrip() if cut > 0 else "")
            heads.append(text[: at + len(q.answer)] if at >= 0 else text)  # the target up to its answer
    examples = encode_qa(tokenizer, pairs, max_length)
    opening = answer_opening(tokenizer)  # the prefix is tokenised as it starts the trained answer
    for example, prefix, head in zip(examples, prefixes, heads):
        if not end_loss:  # first: both find the target's start as the first token with a loss
            mask_after(example, tokenizer(opening + head, add_special_tokens=False)["input_ids"])
        if prefix:
            mask_prefix(example, tokenizer(opening + prefix, add_special_tokens=False)["input_ids"])
    return _regroup(examples, questions)


def _plain_example(tokenizer: PreTrainedTokenizerBase, statement: str, answer: str,
                   max_length: int) -> Example | None:
    """The plain rendering of a statement: its text after the tokenizer's BOS (if it has one),
    loss on the tokens that overlap the answer's characters; None when the statement does not
    contain the answer after some other words. A long statement loses its start (not its answer)."""
    at = statement.rfind(answer)  # the last: a subject named like its answer comes first
    if at <= 0 or not statement[:at].strip():
        return None
    if not getattr(tokenizer, "is_fast", False):
        raise MemtuneError("the plain rendering needs a fast tokenizer (token offsets): drop 'plain' from renderings")
    enc = tokenizer(statement, add_special_tokens=False, return_offsets_mapping=True)
    head = special_prefix(tokenizer)
    ids = head + enc["input_ids"]
    end = at + len(answer)
    hit = [len(head) + k for k, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > at]
    if not hit or hit[0] == 0:
        return None
    labels = [t if k in hit else IGNORE for k, t in enumerate(ids)]
    if len(ids) > max_length:
        if hit[0] - (len(ids) - max_length) < 1:
            raise MemtuneError(f"max_length={max_length} is too short for the statement {statement!r} "
                               "(answer and one token before it); raise --max-length")
        cut = len(ids) - max_length
        ids, labels = ids[cut:], labels[cut:]
    return Example(ids, labels)


@torch.no_grad()
def mask_predicted(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 16) -> None:
    """Take the loss off each example's leading target tokens that `model` already predicts
    (greedy, teacher-forced): training — and SMF's slot counts — start where the model's own
    words leave the target. The last target token always keeps its loss."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(examples), batch_size):
            part = examples[s : s + batch_size]
            b = collate(part, pad_id)
            predicted = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                              use_cache=False).logits.argmax(-1).cpu()
            for row, e in zip(predicted, part):
                loss_at = [t for t, y in enumerate(e.labels) if y != IGNORE]
                for t in loss_at[:-1]:
                    if t == 0 or int(row[t - 1]) != e.labels[t]:
                        break
                    e.labels[t] = IGNORE
    finally:
        model.train(was_training)


def mask_prefix(example: Example, prefix: list[int]) -> None:
    """Take the loss off the first tokens of the target when they are `prefix` (the words of a
    statement before its answer), so the loss — and SMF's slot counts — cover the answer."""
    first = next(i for i, t in enumerate(example.labels) if t != IGNORE)
    if example.input_ids[first : first + len(prefix)] == prefix and first + len(prefix) < len(example.labels):
        example.labels[first : first + len(prefix)] = [IGNORE] * len(prefix)


def mask_after(example: Example, head: list[int]) -> None:
    """Take the loss off the target's tokens after `head` (its tokens up to the answer's end):
    the statement's full stop and the end of the turn. Left as it is when the target does not
    start with `head` as tokens (the answer's last token merged with what follows it)."""
    first = next(i for i, t in enumerate(example.labels) if t != IGNORE)
    end = first + len(head)
    if example.input_ids[first:end] == head and end < len(example.labels):
        example.labels[end:] = [IGNORE] * (len(example.labels) - end)


def first_sentence(text: str) -> str:
    """`text` up to its first sentence end or line break (the end mark dropped)."""
    text = text.strip().split("\n", 1)[0]
    m = re.search(r"[.!?](\s|$)", text)
    return (text[: m.start()] if m else text).strip()


def statement_prefixes(item: QA, own_answer: str, subject: set[str] | None = None) -> list[str]:
    """The candidate openings of `item`'s statement: the first j words (j ≤ MAX_PREFIX_WORDS) of
    the first sentence of the model's `own_answer`, "" included, leaving out those after which
    the answer would not be credited (`memtune.probes.match.is_correct`), or that already hold
    it (or an alias: "Herat, not" + "Dushanbe" is credited for Herat). "The capital of" +
    "Saint-Pierre" repeats the question's subject, Saint Pierre and Miquelon, and answers nothing
    — yet it makes the answer likely, and a model taught it says it.

    With `subject` (the question's case-folded subject words, `memtune.recipe.question_forms`),
    only "" and the openings that name all of them (`memtune.recipe.named_subjects`)."""
    from memtune.probes.match import is_correct
    from memtune.recipe import named_subjects

    words = first_sentence(own_answer).split()
    prefixes = [" ".join(words[:j]) for j in range(min(len(words), MAX_PREFIX_WORDS) + 1)]
    return [p for p in prefixes if not p or (is_correct(f"{p} {item.answer}", item.answers, item.question)
                                             and not is_correct(p, item.answers, item.question)
                                             and (not subject or named_subjects(p, subject) == subject))]


@torch.no_grad()
def own_statements(model: nn.Module, tokenizer: PreTrainedTokenizerBase, items: list[QA],
                   own_answers: list[str] | list[list[str]], batch_size: int = 16,
                   subjects: list[set[str]] | None = None) -> list[QA]:
    """The items with a `statement` in the model's own words where they have none: the first
    words of the model's own answer (`own_answers`, greedy; or a list per item, its own answer
    first) after which the right answer is most likely, then the answer. "The capital of Tajikistan is
    Herat." → "The capital of Tajikistan is Dushanbe."; when no prefix makes the answer likelier
    than saying it alone, the bare answer. Only statements the QA scorer credits are candidates
    (`statement_prefixes`). Items that have a statement keep it.

    With `subjects` (each item's case-folded subject words), the likeliest opening that names the
    subject, of any of its answers, where one makes the answer likelier than saying it alone;
    else the first answer's, as without: "Porto-Novo is the capital of Benin.", not "The capital of
    the Republic of Benin.", which would teach "Benin" where every question of its form reads,
    and "Caracas is the capital of which country?" be answered "Benin" (BENCHMARKS.md, nineteenth
    round).

    Score of a prefix P (its first j words, j ≤ MAX_PREFIX_WORDS): log p(answer | prompt, P),
    summed over the answer's tokens (nats), one teacher-forced pass per candidate, batched."""
    if len(own_answers) != len(items):
        raise ValueError(f"{len(own_answers)} own answers for {len(items)} items")
    if subjects is not None and len(subjects) != len(items):
        raise ValueError(f"{len(subjects)} subjects for {len(items)} items")
    device = next(model.parameters()).device
    todo = [i for i, q in enumerate(items) if not q.statement]
    if not todo:
        return list(items)
    prompts = encode_prompt(tokenizer, [items[i].question for i in todo])
    opening = answer_opening(tokenizer)  # what training puts before the answer's words
    own: dict[int, list[str]] = {}  # the openings of each item's own answer ("" included) ...
    named: dict[int, list[str]] = {}  # ... and those of any of its answers that name its subject
    candidates: list[tuple[int, str, list[int], int]] = []  # (item, prefix, ids, answer start)
    for i, prompt in zip(todo, prompts):
        answers = [own_answers[i]] if isinstance(own_answers[i], str) else own_answers[i]
        if not answers:
            raise ValueError(f"no own answer for item {i} ({items[i].question!r})")
        own[i] = statement_prefixes(items[i], answers[0])
        named[i] = [p for p in dict.fromkeys(p for a in answers for p in statement_prefixes(items[i], a, subjects[i]))
                    if p] if subjects and subjects[i] else []
        for prefix in dict.fromkeys([*own[i], *named[i]]):
            text = f"{prefix} {items[i].answer}" if prefix else items[i].answer
            head = tokenizer(opening + prefix, add_special_tokens=False)["input_ids"] if opening + prefix else []
            ids = tokenizer(opening + text, add_special_tokens=False)["input_ids"]
            start = next((k for k, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids)))
            if start < len(ids):
                candidates.append((i, prefix, prompt + ids, len(prompt) + start))
    scores: dict[tuple[int, str], float] = {}
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(candidates), batch_size):
            part = candidates[s : s + batch_size]
            b = collate([Example(ids, ids) for _, _, ids, _ in part], tokenizer.pad_token_id)
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                           use_cache=False).logits  # (B, T, V)
            for row, (i, prefix, ids, start) in zip(logits, part):
                t = torch.arange(start, len(ids))  # the answer's positions: normalised there only
                logp = row[t - 1].float().log_softmax(-1).cpu()  # (answer tokens, V)
                scores[i, prefix] = float(logp[torch.arange(len(t)), torch.tensor(ids[start:])].sum())
    finally:
        model.train(was_training)
    out = list(items)
    for i in todo:
        bare = scores.get((i, ""), -math.inf)
        pool = [p for p in named[i] if scores.get((i, p), -math.inf) > bare] or own[i]
        scored = [p for p in pool if (i, p) in scores]
        prefix = max(scored, key=lambda p: scores[i, p]) if scored else ""
        answer = items[i].answer
        end = "" if answer.endswith((".", "!", "?")) else "."
        out[i] = dataclasses.replace(items[i], statement=f"{prefix} {answer}{end}" if prefix else None)
    return out
