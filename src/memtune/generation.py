"""Batched greedy generation from prompts, for the CLI and the probes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from memtune.prompts import encode_prompt, stop_token_ids


def stop_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase, chat: bool | None = None) -> list[int]:
    """Where an answer ends: the model's own end tokens, EOS, and the token that closes an
    assistant turn in the chat template (which a base model's generation config may not list)."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    own = [] if own is None else [own] if isinstance(own, int) else list(own)
    return sorted({*own, *stop_token_ids(tokenizer, chat)})


def _generate_batches(model, tokenizer, questions, batch_size, chat, progress, **kwargs) -> Iterator:
    """`model.generate` over left-padded batches of prompts; yields (prompt length, output)."""
    model.eval()
    device = next(model.parameters()).device
    prompts = encode_prompt(tokenizer, questions, chat)
    stops = stop_ids(model, tokenizer, chat)
    if stops:
        kwargs.setdefault("eos_token_id", stops)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for s in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
            batch = tokenizer.pad({"input_ids": prompts[s : s + batch_size]}, return_tensors="pt", padding=True).to(device)
            out = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, **kwargs)
            yield batch["input_ids"].shape[1], out
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    chat: bool | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    progress: bool = False,
) -> list[str]:
    """Answer each question; chat template applied when the tokenizer has one (or `chat`)."""
    kwargs = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    answers: list[str] = []
    for n, out in _generate_batches(model, tokenizer, questions, batch_size, chat, progress,
                                    max_new_tokens=max_new_tokens, **kwargs):
        answers += [t.strip() for t in tokenizer.batch_decode(out.sequences[:, n:], skip_special_tokens=True)]
    return answers


@torch.no_grad()
def greedy_gaps(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    chat: bool | None = None,
    progress: bool = False,
) -> list[tuple[list[int], list[float]]]:
    """Greedy answers with how sure each token was: per question, the generated token ids (up to
    the end of the answer) and, per token, its log-probability minus the runner-up's (nats)."""
    stop = {*stop_ids(model, tokenizer, chat), tokenizer.pad_token_id}
    results = []
    for n, out in _generate_batches(model, tokenizer, questions, batch_size, chat, progress,
                                    max_new_tokens=max_new_tokens, do_sample=False, output_scores=True):
        top2 = torch.stack(out.scores, dim=1).float().log_softmax(-1).topk(2, dim=-1).values  # (B, steps, 2)
        gaps = (top2[..., 0] - top2[..., 1]).tolist()
        for ids, row in zip(out.sequences[:, n:].tolist(), gaps):
            end = next((t for t, i in enumerate(ids) if i in stop), len(ids))
            results.append((ids[:end], row[:end]))
    return results
