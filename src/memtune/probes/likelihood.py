"""Probes that read the model's token probabilities, with no generation: perplexity of text,
multiple-choice accuracy by log-likelihood, and the loss on reference answers.

All of them score token sequences through `continuation_logprobs`: right-padded batches (so
positions are unaffected by padding), sequences sorted by length to waste less padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from memtune.batches import IGNORE, encode_qa
from memtune.data import QA, Choice, Document
from memtune.errors import MemtuneError
from memtune.prompts import encode_text


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_right(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both (B, T) with T the longest sequence."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def token_logprobs(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """log p(ids[:, t] | ids[:, <t]) for t >= 1: (B, T-1) from ids and mask (B, T)."""
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    return -F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"  # (B, V, T-1) vs (B, T-1)
    )


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module,
    sequences: list[list[int]],
    starts: list[int],
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str = "score",
    progress: bool = True,
) -> list[Tensor]:
    """For each token sequence, the log-probabilities of its tokens from `starts[i]` on (>= 1):
    a 1-D tensor of length len(sequence) - start."""
    model.eval()
    device = _device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[Tensor] = [torch.empty(0)] * len(sequences)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        batch = order[s : s + batch_size]
        ids, mask = pad_right([sequences[i] for i in batch], pad_id, device)
        lp = token_logprobs(model, ids, mask).cpu()  # (B, T-1); lp[:, t-1] scores token t
        for row, i in enumerate(batch):
            start = max(1, starts[i])
            out[i] = lp[row, start - 1 : len(sequences[i]) - 1]
    return out


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def split_encode(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of context + continuation (plain text: the tokenizer's BOS once, as
    `memtune.prompts.encode_text`) and where the continuation starts.

    The whole string is encoded at once (as lm-evaluation-harness does) so the boundary is
    tokenised as the model saw it in training; if the context's tokens are not a prefix of the
    whole, the two parts are encoded separately."""
    ctx = encode_text(tokenizer, context)
    whole = encode_text(tokenizer, context + continuation)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return whole, len(ctx)
    return ctx + tokenizer(continuation, add_special_tokens=False).input_ids, len(ctx)


def truncate_left(ids: list[int], start: int, max_length: int, what: str = "a continuation") -> tuple[list[int], int]:
    """Keep the last `max_length` tokens: the whole continuation, as much context as fits. A
    continuation that does not fit with one token of context is an error naming `what`."""
    if len(ids) - start + 1 > max_length:
        raise MemtuneError(f"max_length={max_length} is too short for {what}: it needs {len(ids) - start + 1} tokens")
    cut = max(0, len(ids) - max_length)
    return ids[cut:], start - cut


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str] | list[Document],
    max_length: int = 512,
    stride: int = 256,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Sliding-window perplexity of the texts joined by blank lines into one token stream.

    Windows of `max_length` tokens start every `stride` tokens; each token is scored once, in
    the first window that reaches it past the previous window's end, so every scored token sees
    at least ``max_length - stride`` tokens of context (all of it in the first window).
    Returns ``{"perplexity", "nll" (mean per token, nats), "tokens", "windows"}``.
    """
    if not 0 < stride <= max_length:
        raise MemtuneError(f"stride={stride} is invalid: expected 0 < stride <= max_length ({max_length})")
    strings = [t.text if isinstance(t, Document) else t for t in texts]
    ids = encode_text(tokenizer, "\n\n".join(strings))  # BOS once, as documents are trained
    if len(ids) < 2:
        raise MemtuneError("perplexity needs text of at least two tokens")
    windows, starts, prev_end = [], [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        windows.append(ids[begin:end])
        starts.append(prev_end - begin)  # tokens before prev_end were scored by earlier windows
        prev_end = end
        if end == len(ids):
            break
    lps = continuation_logprobs(model, windows, starts, batch_size, _pad_id(tokenizer), "perplexity", progress)
    total = torch.cat(lps)
    nll = -total.double().mean().item()
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": total.numel(), "windows": len(windows)}


def choice_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: list[Choice],
    batch_size: int = 8,
    max_length: int = 1024,
    progress: bool = True,
) -> dict:
    """Multiple-choice accuracy: the choice whose continuation ``" " + choice`` of the context
    has the highest log-likelihood — summed (``accuracy``) and per character of the choice
    (``accuracy_norm``, the length-normalised score of lm-evaluation-harness's ``acc_norm``)."""
    seqs, starts, owners = [], [], []
    for i, item in enumerate(items):
        for choice in item.choices:
            ids, start = truncate_left(*split_encode(tokenizer, item.question, " " + choice), max_length,
                                       f"choice {choice!r} of {item.question[:60]!r}")
            seqs.append(ids)
            starts.append(start)
            owners.append(i)
    lps = continuation_logprobs(model, seqs, starts, batch_size, _pad_id(tokenizer), "choice", progress)
    sums: list[list[float]] = [[] for _ in items]
    for i, lp in zip(owners, lps):
        sums[i].append(lp.sum().item())
    n = len(items)
    right = sum(max(range(len(s)), key=s.__getitem__) == it.label for s, it in zip(sums, items))
    right_norm = sum(
        max(range(len(s)), key=lambda j: s[j] / max(1, len(it.choices[j]))) == it.label for s, it in zip(sums, items)
    )
    return {"n": n, "accuracy": right / n if n else 0.0, "accuracy_norm": right_norm / n if n else 0.0}


def answer_loss(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: list[QA],
    batch_size: int = 8,
    max_length: int = 1024,
    chat: bool | None = None,
    progress: bool = True,
) -> dict:
    """Mean loss (nats per token) on the reference answers and their end token: exactly the ids
    and loss positions training uses (`memtune.batches.encode_qa`). ``loss`` weighs every answer token alike; ``item_loss`` every answer."""
    examples = encode_qa(tokenizer, [(item.question, item.answer) for item in items], max_length, chat)
    seqs = [e.input_ids for e in examples]
    starts = [sum(1 for y in e.labels if y == IGNORE) for e in examples]  # the prompt: no loss
    scored = continuation_logprobs(model, seqs, starts, batch_size, _pad_id(tokenizer), "answer loss", progress)
    lps = [lp for lp in scored if lp.numel()]
    if not lps:
        raise MemtuneError("answer loss needs at least one item with a non-empty answer")
    total = torch.cat(lps)
    loss = -total.double().mean().item()
    return {
        "n": len(lps),
        "loss": loss,
        "perplexity": math.exp(loss),
        "item_loss": sum(-lp.double().mean().item() for lp in lps) / len(lps),
        "tokens": total.numel(),
    }
