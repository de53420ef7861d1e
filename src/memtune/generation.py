"""Batched greedy generation from prompts, for the CLI and the probes."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from memtune.prompts import encode_prompt


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
    model.eval()
    device = next(model.parameters()).device
    prompts = encode_prompt(tokenizer, questions, chat)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        for s in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
            batch = tokenizer.pad(
                {"input_ids": prompts[s : s + batch_size]}, return_tensors="pt", padding=True
            ).to(device)
            kwargs = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs
            )
            new = out[:, batch["input_ids"].shape[1] :]
            answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers
