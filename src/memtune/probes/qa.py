"""The learning probe: generate answers (greedy, not teacher forcing) and score them.

Three scores per question, each the best over the reference answer and its aliases
(`memtune.probes.match`: Unicode- and typography-folded SQuAD normalisation):

- ``exact_match`` and ``f1``: equality, or the F1 of the bag of tokens;
- ``contains``: the generation names the answer — as whole words, not inside a longer name of
  another entity, not negated.

Chat models answer in sentences ("The capital of France is Paris."), which exact match scores
as wrong, so memtune's decision "answered right" (`is_correct`, used to split facts into known
and to-learn) is ``contains``.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedTokenizerBase

from memtune.data import QA
from memtune.generation import generate, greedy_gaps, greedy_ids
from memtune.probes.match import SHORT, exact_match, fold, is_correct, normalize_answer, token_f1

__all__ = ["SHORT", "answer_questions", "answers_with_margins", "exact_match", "fold", "is_correct",
           "normalize_answer", "qa_accuracy", "score", "token_f1"]


def score(predictions: list[str], answers: list[list[str]], questions: list[str] | None = None) -> dict[str, float | int]:
    """Mean exact match, F1 and contains over aligned predictions and answer lists (contains
    given the questions asked, when known: `is_correct`)."""
    n = len(predictions)
    questions = questions or [None] * n
    if n == 0:
        return {"n": 0, "exact_match": 0.0, "f1": 0.0, "contains": 0.0}
    return {
        "n": n,
        "exact_match": sum(exact_match(p, a) for p, a in zip(predictions, answers)) / n,
        "f1": sum(token_f1(p, a) for p, a in zip(predictions, answers)) / n,
        "contains": sum(is_correct(p, a, q) for p, a, q in zip(predictions, answers, questions)) / n,
    }


def _in_length_order(questions: list[str], answer) -> list:
    """`answer(questions)` with the questions batched by length (less padding), in input order."""
    order = sorted(range(len(questions)), key=lambda i: len(questions[i]))
    out = [None] * len(questions)
    for i, a in zip(order, answer([questions[i] for i in order])):
        out[i] = a
    return out


def answer_questions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    chat: bool | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy answers in the input order."""
    return _in_length_order(questions, lambda qs: generate(
        model, tokenizer, qs, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat, progress=progress))


def answer_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    chat: bool | None = None,
    progress: bool = True,
) -> list[list[int]]:
    """Greedy answers as token ids (`memtune.generation.greedy_ids`), in the input order."""
    return _in_length_order(questions, lambda qs: greedy_ids(
        model, tokenizer, qs, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat, progress=progress))


def answers_with_margins(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: list[QA],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    chat: bool | None = None,
    progress: bool = True,
) -> list[tuple[str, float]]:
    """Greedy answers and how surely the model gives them: the margin is the smallest gap (nats)
    between the greedy token's log-probability and the runner-up's, over the tokens generated
    until the answer contains one of the item's answers (over all of them if it never does). A
    near-tie (margin ~0) flips under the smallest change to the model."""
    gaps = _in_length_order([q.question for q in items], lambda qs: greedy_gaps(
        model, tokenizer, qs, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat, progress=progress))
    out = []
    for item, (ids, row) in zip(items, gaps):
        end = next((t + 1 for t in range(len(ids))
                    if is_correct(tokenizer.decode(ids[: t + 1], skip_special_tokens=True), item.answers,
                               item.question)), len(ids))
        out.append((tokenizer.decode(ids, skip_special_tokens=True).strip(), min(row[:end], default=0.0)))
    return out


def qa_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: list[QA],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    paraphrases: bool = True,
    chat: bool | None = None,
    predictions: bool = False,
    progress: bool = True,
) -> dict:
    """Exact match, F1 and contains on the questions, and separately on their paraphrases.

    Returns ``{"n", "exact_match", "f1", "contains", "paraphrases": {...} | None}`` and, with
    `predictions`, a ``"predictions"`` list of ``{"id", "question", "prediction", "correct"}``
    (paraphrases included, marked ``"paraphrase": true``).
    """
    asked: list[tuple[int, str, bool]] = [(i, q.question, False) for i, q in enumerate(items)]
    if paraphrases:
        asked += [(i, p, True) for i, q in enumerate(items) for p in q.paraphrases]
    generated = answer_questions(
        model, tokenizer, [q for _, q, _ in asked], max_new_tokens=max_new_tokens,
        batch_size=batch_size, chat=chat, progress=progress,
    )
    main = [(items[i].answers, g, q) for (i, q, para), g in zip(asked, generated) if not para]
    para = [(items[i].answers, g, q) for (i, q, p), g in zip(asked, generated) if p]
    result: dict = score(*_columns(main))
    result["paraphrases"] = score(*_columns(para)) if para else None
    if predictions:
        result["predictions"] = [
            {"id": items[i].id, "question": q, "prediction": g, "correct": is_correct(g, items[i].answers, q),
             **({"paraphrase": True} if p else {})}
            for (i, q, p), g in zip(asked, generated)
        ]
    return result


def _columns(rows: list[tuple[list[str], str, str]]) -> tuple[list[str], list[list[str]], list[str]]:
    """(answers, prediction, question) rows -> score's predictions, answers, questions."""
    return [g for _, g, _ in rows], [a for a, _, _ in rows], [q for _, _, q in rows]
