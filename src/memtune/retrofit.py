"""Attach memory layers to a pretrained Hugging Face decoder model.

Each chosen decoder layer's `mlp` is wrapped by `MemoryFFN`, which adds the memory output to
the FFN's (parallel mode) or uses the memory alone (replace mode; the FFN weights stay in the
model so the original can be restored by `bypass_memory`). Every memory parameter lives in the
`MemoryBank` attached as `model.memory`, so all of them are named `memory.*`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from memtune.config import MemoryConfig
from memtune.errors import MemtuneError
from memtune.memory import MemoryBank, ProductKeyMemory, ValueTable

PREFIX = "memory."


class MemoryFFN(nn.Module):
    """Stands in for a decoder layer's `mlp`: ffn(x) + memory(x), or memory(x) alone."""

    def __init__(self, ffn: nn.Module, memory: ProductKeyMemory, values: ValueTable, mode: str):
        super().__init__()
        self.ffn = ffn
        self.mode = mode
        self.bypass = False
        # The memory and its table are registered in the model's MemoryBank; holding them
        # unregistered here keeps a single name (`memory.*`) for every memory parameter.
        object.__setattr__(self, "memory", memory)
        object.__setattr__(self, "values", values)

    def forward(self, x: Tensor) -> Tensor:
        if self.bypass:
            return self.ffn(x)
        out = self.memory(x, self.values)
        if self.mode == "replace":
            return out
        return self.ffn(x) + out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a HF causal LM (Llama, Qwen2, Mistral, Gemma, Phi-3 ...)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise MemtuneError(
            f"{type(model).__name__} is not supported: expected a decoder model whose layers are "
            "at model.model.layers (Llama, Qwen2, Mistral, Gemma, Phi-3, SmolLM ...)"
        )
    return layers


def hidden_size_of(model: nn.Module) -> int:
    cfg = model.config
    size = getattr(cfg, "hidden_size", None) or getattr(getattr(cfg, "text_config", None), "hidden_size", None)
    if size is None:
        raise MemtuneError(f"{type(model).__name__}: cannot find the hidden size in its config")
    return int(size)


def retrofit(model: nn.Module, config: MemoryConfig) -> nn.Module:
    """Put memory layers into `model` (in place) at `config.layers`; returns the model."""
    if get_memory_bank(model) is not None:
        raise MemtuneError("this model already has memory layers: retrofit a base model")
    layers = decoder_layers(model)
    if not config.layers:
        raise MemtuneError("layers=[] is invalid: name at least one decoder layer, e.g. --layers 8,16,24")
    bad = [i for i in config.layers if i >= len(layers)]
    if bad:
        raise MemtuneError(
            f"layers={config.layers} is invalid: {bad} out of range; the model has {len(layers)} "
            f"decoder layers (0..{len(layers) - 1})"
        )
    for i in config.layers:
        if not isinstance(getattr(layers[i], "mlp", None), nn.Module):
            raise MemtuneError(f"decoder layer {i} ({type(layers[i]).__name__}) has no `mlp` to put a memory beside")
    hidden = hidden_size_of(model)
    if config.hidden_size not in (None, hidden):
        raise MemtuneError(f"hidden_size={config.hidden_size} in the memory config does not match the model's {hidden}")
    config.hidden_size = hidden
    ref = next(model.parameters())
    bank = MemoryBank(config, hidden, dtype=ref.dtype).to(ref.device)
    model.memory = bank
    for i in config.layers:
        layers[i].mlp = MemoryFFN(layers[i].mlp, bank.layers[str(i)], bank.table_for(i), config.mode)
    return model


def get_memory_bank(model: nn.Module) -> MemoryBank | None:
    bank = getattr(model, "memory", None)
    return bank if isinstance(bank, MemoryBank) else None


def require_memory_bank(model: nn.Module) -> MemoryBank:
    bank = get_memory_bank(model)
    if bank is None:
        raise MemtuneError(f"{type(model).__name__} has no memory layers: run `memtune retrofit` first")
    return bank


def is_memory_param(name: str) -> bool:
    return name.startswith(PREFIX)


def memory_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) for every memory parameter; names start with `memory.`."""
    for name, p in model.named_parameters():
        if is_memory_param(name):
            yield name, p


def freeze_base(model: nn.Module) -> nn.Module:
    """Only memory parameters require grad afterwards."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_memory_param(name))
    return model


def memory_ffns(model: nn.Module) -> list[MemoryFFN]:
    return [m for m in model.modules() if isinstance(m, MemoryFFN)]


class _MemoryRead(Exception):
    """Raised once the deepest memory layer has run (`forward_to_memory`)."""


def forward_to_memory(model: nn.Module, **inputs) -> None:
    """Run `model(**inputs)` only as far as its deepest memory layer: for passes that use what
    the memory layers read or are given (`MemoryBank.set_record`, hooks on `MemoryFFN`) and not
    the model's output, which is not computed. The decoder layers above the deepest memory
    layer and the LM head are skipped: on SmolLM2-135M with memory at layers 8 / 16 / 24 of 30,
    about a third of a forward pass (BENCHMARKS.md, `benchmarks/bench_setup.py`). A model
    without memory layers runs whole."""
    wrappers = memory_ffns(model)
    if not wrappers:
        model(**inputs)
        return

    def stop(*_):
        raise _MemoryRead

    handle = wrappers[-1].register_forward_hook(stop)  # modules() lists the layers in their order
    try:
        model(**inputs)
    except _MemoryRead:
        pass
    finally:
        handle.remove()


@contextlib.contextmanager
def bypass_memory(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model is the original: memory skipped, FFNs restored."""
    wrappers = memory_ffns(model)
    previous = [w.bypass for w in wrappers]
    for w in wrappers:
        w.bypass = True
    try:
        yield model
    finally:
        for w, b in zip(wrappers, previous):
            w.bypass = b


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Unique parameters: total, memory, base, and bytes of each."""
    seen: set[int] = set()
    counts = {"total": 0, "memory": 0, "base": 0, "total_bytes": 0, "memory_bytes": 0, "base_bytes": 0}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        kind = "memory" if is_memory_param(name) else "base"
        nbytes = p.numel() * p.element_size()
        counts["total"] += p.numel()
        counts[kind] += p.numel()
        counts["total_bytes"] += nbytes
        counts[f"{kind}_bytes"] += nbytes
    return counts


@torch.no_grad()
def memory_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The memory parameters and buffers only, keyed `memory.*`."""
    bank = require_memory_bank(model)
    return {PREFIX + k: v.detach().contiguous() for k, v in bank.state_dict().items()}
