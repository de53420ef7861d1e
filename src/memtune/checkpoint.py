"""Save and load memory checkpoints like PEFT adapters: a folder holding the memory config
(naming the base model) and the memory weights as safetensors — never the base weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from memtune.config import MemoryConfig
from memtune.errors import MemtuneError
from memtune.io import atomic_dir
from memtune.ledger import Ledger
from memtune.retrofit import PREFIX, memory_state_dict, require_memory_bank, retrofit

CONFIG_NAME = "memory_config.json"
WEIGHTS_NAME = "memory.safetensors"
# A value table whose non-zero rows are fewer than this fraction is stored as (rows, data):
# a parallel-mode memory after sparse finetuning is a few MB instead of gigabytes.
SPARSE_FRACTION = 0.5
ROWS_SUFFIX, DATA_SUFFIX = ".rows", ".nonzero"


def _compact(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Value tables with mostly zero rows -> their non-zero rows and the rows' indices."""
    out = {}
    for name, t in state.items():
        if name.startswith(PREFIX + "values.") and t.dim() == 2:
            rows = torch.nonzero(t.any(dim=1)).flatten()
            if rows.numel() < SPARSE_FRACTION * t.shape[0]:
                out[name + ROWS_SUFFIX] = rows
                out[name + DATA_SUFFIX] = t[rows].contiguous()
                continue
        out[name] = t
    return out


def _expand(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Inverse of `_compact`, given the full shapes."""
    out = {k: v for k, v in state.items() if not k.endswith((ROWS_SUFFIX, DATA_SUFFIX))}
    for key in state:
        if key.endswith(ROWS_SUFFIX):
            name = key.removesuffix(ROWS_SUFFIX)
            data = state[name + DATA_SUFFIX]
            full = torch.zeros(shapes[name], dtype=data.dtype, device=data.device)
            full[state[key]] = data
            out[name] = full
    return out


def is_memory_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def save_memory(model: nn.Module, path: str | Path, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write `path/memory_config.json`, `path/memory.safetensors` and the learn history
    (`memtune.ledger`, when there is one) atomically."""
    bank = require_memory_bank(model)
    config = bank.config
    if config.base_model:  # a relative folder would not reload from another working directory
        from memtune.models import portable_name

        config.base_model = portable_name(config.base_model)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(_compact(memory_state_dict(model)), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        bank.ledger.save(tmp)
        data = {"memory": config.to_dict(), "format": "memtune-memory-v1", "base": base_signature(model),
                "weights_sha256": file_sha256(tmp / WEIGHTS_NAME), **(extra or {})}
        (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)


BASE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
               "num_attention_heads", "num_key_value_heads")


def base_signature(model: nn.Module) -> dict:
    """What a memory checkpoint needs of its base model: the architecture's shape."""
    config = model.config
    return {k: getattr(config, k, None) for k in BASE_FIELDS}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_weights(path: str | Path) -> None:
    """Refuse a memory.safetensors that is not the one saved with this config (truncated,
    edited, copied from another checkpoint). Checkpoints saved before checksums pass."""
    expected = json.loads((Path(path) / CONFIG_NAME).read_text()).get("weights_sha256")
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise MemtuneError(f"memory checkpoint {str(path)!r} has no {WEIGHTS_NAME}")
    if expected is not None and file_sha256(weights) != expected:
        raise MemtuneError(f"memory checkpoint {str(path)!r}: {WEIGHTS_NAME} does not match the checksum in "
                           f"{CONFIG_NAME} (truncated or edited): save it again")


def read_memory_config(path: str | Path) -> MemoryConfig:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise MemtuneError(f"{str(path)!r} is not a memory checkpoint: {CONFIG_NAME} is missing")
    try:
        return MemoryConfig.from_dict(json.loads(file.read_text())["memory"])
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, MemtuneError):
            raise
        raise MemtuneError(f"{str(file)!r} is not a valid memory config: expected JSON with a 'memory' object "
                           f"({type(e).__name__}: {e})") from None


def load_memory(model: nn.Module, path: str | Path) -> nn.Module:
    """Retrofit `model` (a base model) as the checkpoint says and load the memory weights and
    the learn history (`bank.ledger`)."""
    config = read_memory_config(path)
    verify_weights(path)
    saved = json.loads((Path(path) / CONFIG_NAME).read_text()).get("base")
    if saved is not None and saved != base_signature(model):
        diff = {k: (saved.get(k), v) for k, v in base_signature(model).items() if saved.get(k) != v}
        raise MemtuneError(f"memory checkpoint {str(path)!r} belongs to another base model than {config.base_model!r} "
                           f"(saved vs this model: {diff}): load it onto the model it was made for")
    retrofit(model, config)
    try:
        state = load_file(Path(path) / WEIGHTS_NAME, device=str(next(model.parameters()).device))
    except Exception as e:  # missing, truncated or not safetensors
        raise MemtuneError(f"memory checkpoint {str(path)!r}: cannot read {WEIGHTS_NAME} "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    bank = require_memory_bank(model)
    shapes = {PREFIX + k: v for k, v in bank.state_shapes().items()}
    state = {k.removeprefix(PREFIX): v for k, v in _expand(state, shapes).items()}
    try:
        missing, unexpected = bank.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes of another memory
        raise MemtuneError(f"memory checkpoint {str(path)!r} does not match its config or base model: "
                           f"{str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.endswith(".query_center")]  # older checkpoints: uncalibrated
    if missing or unexpected:
        raise MemtuneError(f"memory checkpoint {str(path)!r} does not match its config: missing {missing}, unexpected {unexpected}")
    bank.ledger = Ledger.load(path)
    bank.ledger.check(config.n_slots, path)
    return model


def load_memory_model(
    path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load the checkpoint's base model, then its memory."""
    from memtune.models import load_base_model

    config = read_memory_config(path)
    if not config.base_model:
        raise MemtuneError(f"memory checkpoint {str(path)!r} names no base model")
    model, tokenizer = load_base_model(config.base_model, dtype=dtype, device=device)
    return load_memory(model, path).eval(), tokenizer
