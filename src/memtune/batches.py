"""From QA pairs and documents to padded training batches.

A QA example is the prompt (chat template applied when the tokenizer has one) followed by the
answer; the loss covers the answer tokens only. A document is trained on all its tokens. Each
example also carries the positions whose slot reads count for sparse finetuning:
`count_positions="loss"` counts the positions that predict a loss token (for QA: the answer),
`"all"` every real token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from memtune.errors import MemtuneError
from memtune.prompts import encode_answers, encode_prompt, encode_text

log = logging.getLogger(__name__)

IGNORE = -100
COUNT_POSITIONS = ("loss", "all")
# How to read a data source: detect it, QA pairs, or documents.
DATA_KINDS = ("auto", "qa", "documents")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss


def encode_qa(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], max_length: int = 256,
    chat: bool | None = None,
) -> list[Example]:
    """(question, answer) pairs -> examples with loss on the answer (and end-of-turn) tokens.

    An example longer than `max_length` loses the start of its prompt, never its answer or the
    answer's end token; an answer that cannot fit with one token of prompt is an error."""
    prompts = encode_prompt(tokenizer, [q for q, _ in pairs], chat)
    answers = encode_answers(tokenizer, [a for _, a in pairs], chat)
    out, cut = [], 0
    for (question, _), p, a in zip(pairs, prompts, answers):
        if len(a) + 1 > max_length:
            raise MemtuneError(f"max_length={max_length} is too short for the answer to {question!r}: it needs "
                               f"{len(a) + 1} tokens (answer and end token, one prompt token); raise --max-length")
        if len(p) + len(a) > max_length:
            p, cut = p[len(p) + len(a) - max_length :], cut + 1
        out.append(Example(p + a, [IGNORE] * len(p) + a))
    if cut:
        log.warning("%d of %d prompts were cut from the left to fit max_length=%d (answers kept whole)",
                    cut, len(out), max_length)
    return out


def encode_documents(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int = 256
) -> list[Example]:
    """Documents -> examples of at most max_length tokens. A long document is split into
    windows that overlap by one token, so every token after the first — the EOS included — is
    predicted exactly once (no token is lost at a window's edge)."""
    if max_length < 2:
        raise MemtuneError(f"max_length={max_length} is too short: a document example needs at least 2 tokens")
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        ids = encode_text(tokenizer, text) + eos  # BOS once, EOS once, whatever the tokenizer adds
        for begin in range(0, max(len(ids) - 1, 1), max_length - 1):
            chunk = ids[begin : begin + max_length]  # chunk[0] is context: the previous window predicted it
            if len(chunk) > 1:
                out.append(Example(chunk, list(chunk)))
    return out


def collate(examples: Sequence[Example], pad_id: int, count_positions: str = "loss") -> dict[str, Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (B, T) and count_mask (B, T)."""
    if count_positions not in COUNT_POSITIONS:
        raise MemtuneError(f"count_positions={count_positions!r} is invalid: expected one of {', '.join(COUNT_POSITIONS)}")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    if count_positions == "all":
        count = mask.bool()
    else:  # position t predicts token t+1
        count = torch.zeros_like(mask, dtype=torch.bool)
        count[:, :-1] = labels[:, 1:] != IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "count_mask": count}


def first_batches(examples: Sequence[Example], pad_id: int, n_batches: int, batch_size: int,
                  count_positions: str = "loss") -> tuple[int, Iterator[dict[str, Tensor]]]:
    """The first `n_batches` collated batches of `examples` (fewer when they run out): (n, batches)."""
    n = min(n_batches, -(-len(examples) // batch_size))
    return n, (collate(examples[b * batch_size : (b + 1) * batch_size], pad_id, count_positions) for b in range(n))


def token_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy over labelled positions. logits (B, T, V), labels (B, T)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


def n_loss_tokens(labels: Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum().item())
