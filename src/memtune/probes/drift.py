"""The forgetting probe that needs no labels: how far the model's next-token distributions
have moved from its base model's on held-out text.

For a memory model the base is the same model with its memory bypassed
(`memtune.retrofit.bypass_memory`), for a PEFT model the same model with its adapter
disabled — no second copy in either case. Any other model needs its base passed explicitly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from memtune.data import Document
from memtune.errors import MemtuneError
from memtune.probes.likelihood import _pad_id, pad_right
from memtune.prompts import encode_text
from memtune.retrofit import bypass_memory, get_memory_bank


def builtin_base(model: nn.Module) -> str | None:
    """How `model` can show its base without a second copy, or None if it cannot."""
    if get_memory_bank(model) is not None:
        return "memory bypassed"
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        return "adapter disabled"
    return None


def require_base(model: nn.Module, base: nn.Module | None) -> None:
    if base is None and builtin_base(model) is None:
        raise MemtuneError(
            "drift needs a base model: this model has neither memory layers nor a PEFT adapter, "
            "so pass its base with --base NAME"
        )


@contextlib.contextmanager
def base_view(model: nn.Module, base: nn.Module | None = None) -> Iterator[tuple[nn.Module, str]]:
    """(base model, how it was obtained) for the duration of the block."""
    require_base(model, base)
    if base is not None:
        yield base, "separate"
    elif builtin_base(model) == "memory bypassed":
        with bypass_memory(model):
            yield model, "memory bypassed"
    else:
        with model.disable_adapter():
            yield model, "adapter disabled"


@torch.no_grad()
def drift(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str] | list[Document],
    base: nn.Module | None = None,
    max_length: int = 256,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Mean KL(p_base || p_model) of next-token distributions over every position of the texts.

    The texts are joined by blank lines, tokenised once and cut into consecutive windows of
    `max_length` tokens. Returns ``{"kl", "kl_max", "top1_agreement", "tokens", "base"}``:
    mean and largest per-position KL (nats), and how often the two models' most likely next
    tokens agree.
    """
    require_base(model, base)
    strings = [t.text if isinstance(t, Document) else t for t in texts]
    ids = encode_text(tokenizer, "\n\n".join(strings))  # BOS once, as documents are trained
    if not ids:
        raise MemtuneError("drift needs non-empty text")
    windows = [ids[s : s + max_length] for s in range(0, len(ids), max_length)]
    model.eval()
    device = next(model.parameters()).device
    kl_sum, kl_max, agree, count, how = 0.0, 0.0, 0, 0, ""
    for s in tqdm(range(0, len(windows), batch_size), desc="drift", disable=not progress):
        batch_ids, mask = pad_right(windows[s : s + batch_size], _pad_id(tokenizer), device)  # (B, T)
        with base_view(model, base) as (reference, how):
            base_lp = F.log_softmax(reference(input_ids=batch_ids, attention_mask=mask).logits.float(), dim=-1)
        model_lp = F.log_softmax(model(input_ids=batch_ids, attention_mask=mask).logits.float(), dim=-1)  # (B, T, V)
        kl = F.kl_div(model_lp, base_lp, log_target=True, reduction="none").sum(-1)  # (B, T)
        real = mask.bool()
        kl_sum += kl[real].double().sum().item()
        kl_max = max(kl_max, kl[real].max().item())
        agree += (base_lp.argmax(-1) == model_lp.argmax(-1))[real].sum().item()
        count += int(real.sum())
    return {"kl": kl_sum / count, "kl_max": kl_max, "top1_agreement": agree / count, "tokens": count, "base": how}
