"""From QA pairs and documents to padded training batches.

A QA example is the prompt (chat template applied when the tokenizer has one) followed by the
answer; the loss covers the answer tokens only. A document is trained on all its tokens. Each
example also carries the positions whose slot reads count for sparse finetuning:
`count_positions="loss"` counts the positions that predict a loss token (for QA: the answer),
`"all"` every real token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from memtune.errors import MemtuneError
from memtune.prompts import answer_suffix, encode_prompt

IGNORE = -100
COUNT_POSITIONS = ("loss", "all")
# How to read a data source: detect it, QA pairs, or documents.
DATA_KINDS = ("auto", "qa", "documents")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss


def encode_qa(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], max_length: int = 256
) -> list[Example]:
    """(question, answer) pairs -> examples with loss on the answer (and end-of-turn) tokens."""
    prompts = encode_prompt(tokenizer, [q for q, _ in pairs])
    answers = tokenizer([answer_suffix(tokenizer, a) for _, a in pairs], add_special_tokens=False)["input_ids"]
    out = []
    for p, a in zip(prompts, answers):
        ids = (p + a)[:max_length]
        labels = ([IGNORE] * len(p) + a)[:max_length]
        if all(x == IGNORE for x in labels[1:]):
            raise MemtuneError(f"max_length={max_length} is too short: a prompt of {len(p)} tokens leaves no answer tokens")
        out.append(Example(ids, labels))
    return out


def encode_documents(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int = 256
) -> list[Example]:
    """Documents -> examples of at most max_length tokens (long documents are split)."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for ids in tokenizer(list(texts))["input_ids"]:
        ids = ids + eos
        for s in range(0, len(ids), max_length):
            chunk = ids[s : s + max_length]
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
