"""What a fact is trained as: the target text after its question, and where the loss goes.

- ``target="answer"`` trains the bare answer; ``"statement"`` the fact as a sentence ("The
  capital of Chad is N'Djamena."), the way a chat model answers. A fact without a statement
  gets one in the model's own words (`own_statements`).
- ``loss="target"`` puts the loss on the whole target; ``"answer"`` on the answer inside a
  statement (the words before it teacher-forced context); ``"diverge"`` on the target from the
  first token the model would not say itself: greedy decoding follows the model's own words up
  to there, so that is where the fact must be taught (and where SMF counts slot reads).

The loss positions are also SMF's counted positions (`count_positions="loss"`): a target that
leaves the model's own words untouched keeps the slots those words read out of the update.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from memtune.batches import IGNORE, Example, collate, encode_qa
from memtune.data import QA
from memtune.errors import MemtuneError
from memtune.prompts import answer_opening, encode_prompt

TARGETS = ("answer", "statement")
LOSSES = ("target", "answer", "diverge")
Target = Literal["answer", "statement"]
Loss = Literal["target", "answer", "diverge"]
# own_statements tries the answer after each of the first words of the model's own sentence
MAX_PREFIX_WORDS = 12


def check_target(target: str, loss: str) -> None:
    if target not in TARGETS:
        raise MemtuneError(f"target={target!r} is invalid: expected one of {', '.join(TARGETS)}")
    if loss not in LOSSES:
        raise MemtuneError(f"loss={loss!r} is invalid: expected one of {', '.join(LOSSES)}")


def fact_examples(items: list[QA], tokenizer: PreTrainedTokenizerBase, target: Target = "answer",
                  loss: Loss = "target", augment: int = 0, max_length: int = 256,
                  model: nn.Module | None = None) -> list[Example]:
    """Each fact as it is trained: its question (and its first `augment` paraphrases) -> its
    answer or statement (a fact without a statement trains its answer). `loss="diverge"` needs
    the `model` that will learn the facts. Returns one example per (fact, phrasing), facts in order."""
    check_target(target, loss)
    pairs, prefixes = [], []
    for q in items:
        stated = target == "statement" and bool(q.statement)
        text = q.statement if stated else q.answer
        cut = text.find(q.answer) if stated and loss == "answer" else -1
        for question in [q.question, *q.paraphrases[:augment]]:
            pairs.append((question, text))
            prefixes.append(text[:cut].rstrip() if cut > 0 else "")
    examples = encode_qa(tokenizer, pairs, max_length)
    opening = answer_opening(tokenizer)  # the prefix is tokenised as it starts the trained answer
    for example, prefix in zip(examples, prefixes):
        if prefix:
            mask_prefix(example, tokenizer(opening + prefix, add_special_tokens=False)["input_ids"])
    if loss == "diverge":
        if model is None:
            raise ValueError("loss=diverge needs the model that learns the facts")
        mask_predicted(model, examples, tokenizer.pad_token_id)
    return examples


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


def first_sentence(text: str) -> str:
    """`text` up to its first sentence end or line break (the end mark dropped)."""
    text = text.strip().split("\n", 1)[0]
    m = re.search(r"[.!?](\s|$)", text)
    return (text[: m.start()] if m else text).strip()


@torch.no_grad()
def own_statements(model: nn.Module, tokenizer: PreTrainedTokenizerBase, items: list[QA],
                   own_answers: list[str], batch_size: int = 16) -> list[QA]:
    """The items with a `statement` in the model's own words where they have none: the first
    words of the model's own answer (`own_answers`, greedy) after which the right answer is most
    likely, then the answer. "The capital of Tajikistan is Herat." → "The capital of Tajikistan
    is Dushanbe."; when no prefix makes the answer likelier than saying it alone, the bare
    answer. Items that have a statement keep it.

    Score of a prefix P (its first j words, j ≤ MAX_PREFIX_WORDS): log p(answer | prompt, P),
    summed over the answer's tokens (nats), one teacher-forced pass per candidate, batched."""
    if len(own_answers) != len(items):
        raise ValueError(f"{len(own_answers)} own answers for {len(items)} items")
    device = next(model.parameters()).device
    todo = [i for i, q in enumerate(items) if not q.statement]
    if not todo:
        return list(items)
    prompts = encode_prompt(tokenizer, [items[i].question for i in todo])
    opening = answer_opening(tokenizer)  # what training puts before the answer's words
    candidates: list[tuple[int, str, list[int], int]] = []  # (item, prefix, ids, answer start)
    for i, prompt in zip(todo, prompts):
        words = first_sentence(own_answers[i]).split()
        for j in range(min(len(words), MAX_PREFIX_WORDS) + 1):
            prefix = " ".join(words[:j])
            text = f"{prefix} {items[i].answer}" if prefix else items[i].answer
            head = tokenizer(opening + prefix, add_special_tokens=False)["input_ids"] if opening + prefix else []
            ids = tokenizer(opening + text, add_special_tokens=False)["input_ids"]
            start = next((k for k, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids)))
            if start < len(ids):
                candidates.append((i, prefix, prompt + ids, len(prompt) + start))
    best: dict[int, tuple[float, str]] = {}
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(candidates), batch_size):
            part = candidates[s : s + batch_size]
            b = collate([Example(ids, ids) for _, _, ids, _ in part], tokenizer.pad_token_id)
            logp = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                         use_cache=False).logits.float().log_softmax(-1).cpu()
            for row, (i, prefix, ids, start) in zip(logp, part):
                t = torch.arange(start, len(ids))
                score = float(row[t - 1, torch.tensor(ids[start:])].sum())
                if i not in best or score > best[i][0]:
                    best[i] = (score, prefix)
    finally:
        model.train(was_training)
    out = list(items)
    for i in todo:
        prefix = best.get(i, (0.0, ""))[1]
        answer = items[i].answer
        end = "" if answer.endswith((".", "!", "?")) else "."
        out[i] = dataclasses.replace(items[i], statement=f"{prefix} {answer}{end}" if prefix else None)
    return out
