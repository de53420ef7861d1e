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
def greedy_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    chat: bool | None = None,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy answers as token ids, up to (not including) the end token (`stop_ids`) that ended
    each: decoded with `skip_special_tokens` and stripped, the text `generate` returns."""
    stop = set(stop_ids(model, tokenizer, chat))
    results = []
    for n, out in _generate_batches(model, tokenizer, questions, batch_size, chat, progress,
                                    max_new_tokens=max_new_tokens, do_sample=False):
        for ids in out.sequences[:, n:].tolist():
            results.append(ids[: next((t for t, i in enumerate(ids) if i in stop), len(ids))])
    return results


# A model's generation settings that leave greedy decoding the argmax of its logits, stopped at
# its end tokens (`stop_ids`): those of sampling, caching and output, whatever their value ...
_GREEDY_SAFE = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "do_sample", "temperature",
                "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff", "max_length",
                "max_new_tokens", "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config",
                "disable_compile", "low_memory", "prefill_chunk_size", "renormalize_logits", "remove_invalid_values",
                "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                "return_dict_in_generate", "transformers_version", "_from_model_config"}
# ... and the others at the values that change nothing
_NEUTRAL = {"num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
            "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
            "min_length": 0, "min_new_tokens": 0, "guidance_scale": 1.0, "length_penalty": 1.0, "diversity_penalty": 0.0,
            "early_stopping": False}


def plain_greedy(model: nn.Module) -> bool:
    """Whether `model.generate(do_sample=False)` picks the argmax of its logits at every step
    and stops only at its end tokens: False when its generation config sets anything else
    (beams, a repetition penalty, suppressed tokens, stop strings, ...) to a value that matters."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return True
    return all(k in _GREEDY_SAFE or v is None or (k in _NEUTRAL and v == _NEUTRAL[k])
               for k, v in config.to_diff_dict().items())


@torch.no_grad()
def still_greedy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    answers: list[list[int]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    chat: bool | None = None,
) -> list[bool]:
    """Whether greedy decoding (`greedy_ids`) would still answer questions[i] with the token ids
    answers[i], checked in one forward pass over prompt + answer instead of one decoding step
    per token: every answer token must be the argmax after the ones before it and, for an
    answer shorter than `max_new_tokens`, a stop token the argmax after the last. A model under
    the check learns: an answer it gave before and still gives need not be generated again.
    All False when the model's generation config makes greedy decoding anything else
    (`plain_greedy`: beams, a repetition penalty ...): the answers must then be generated."""
    if not questions:
        return []
    if not plain_greedy(model):
        return [False] * len(questions)
    model.eval()
    device = next(model.parameters()).device
    stop = torch.tensor(stop_ids(model, tokenizer, chat), dtype=torch.long)
    prompts = encode_prompt(tokenizer, questions, chat)
    out: list[bool] = []
    for s in range(0, len(prompts), batch_size):
        chunk = answers[s : s + batch_size]
        rows = [p + a for p, a in zip(prompts[s : s + batch_size], chunk)]
        width, keep = max(map(len, rows)), max(map(len, chunk)) + 1
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):  # left padding, as generation pads: every answer ends at the right
            ids[r, width - len(row) :], mask[r, width - len(row) :] = torch.tensor(row), 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row's own, as generation numbers them
        # logits only where an answer token is picked: the last `keep` positions
        picked = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=False, logits_to_keep=keep).logits.argmax(-1).cpu()
        for r, a in enumerate(chunk):
            given = picked[r, keep - len(a) - 1 :]  # the pick after the prompt, after each answer token
            same = torch.equal(given[: len(a)], torch.tensor(a, dtype=given.dtype))
            ended = len(a) >= max_new_tokens or bool(torch.isin(given[len(a)], stop))
            out.append(same and ended)
    return out


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
