"""Typed, self-validating configuration of the memory layers, round-tripping to JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from memtune.errors import MemtuneError, is_int

MODES = ("parallel", "replace")
VALUE_INITS = ("auto", "zeros", "normal")
VALUE_DTYPES = ("auto", "float32", "bfloat16", "float16")
CALIBRATIONS = ("standardize", "whiten")  # memtune.calibrate


@dataclass
class MemoryConfig:
    """Where memory layers go in a model and how big they are.

    The defaults are the papers' (1024² ≈ 1M slots, 4 heads, knn 32) with a k_dim suited to
    small models.
    """

    layers: list[int] = field(
        default_factory=list, metadata={"help": "decoder layer indices that get a memory"}
    )
    mode: Literal["parallel", "replace"] = field(
        default="parallel",
        metadata={"help": "parallel: FFN kept, memory added (exactly the base model at init); "
                  "replace: FFN removed (needs healing)"},
    )
    n_keys: int = field(default=1024, metadata={"help": "half-keys per product half; slots = n_keys²"})
    heads: int = field(default=4, metadata={"help": "memory heads (independent lookups)"})
    knn: int = field(default=32, metadata={"help": "slots read per head and token"})
    k_dim: int = field(default=256, metadata={"help": "query/key size per head (even)"})
    v_dim: int | None = field(
        default=None, metadata={"help": "value size; default: the model's hidden size"}
    )
    share_values: bool = field(
        default=True, metadata={"help": "one value table shared by all memory layers"}
    )
    value_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": "dtype of the value table; auto: the model's. bfloat16 halves the largest tensor "
                  "(1M slots x 576: 2.3 GiB -> 1.15 GiB)"},
    )
    shard_values: bool = field(
        default=False,
        metadata={"help": "memory parallel: under torchrun each rank holds 1/N of every value table's columns "
                  "(reads become collectives); checkpoints are the same at any number of ranks"},
    )
    query_norm: bool = field(default=True, metadata={"help": "RMS-normalise each head's query"})
    gate: bool = field(default=True, metadata={"help": "Memory+ gate: out = W_o(y * silu(W_g x))"})
    value_init: Literal["auto", "zeros", "normal"] = field(
        default="auto",
        metadata={"help": "auto: zeros in parallel mode (exact base model), normal in replace mode"},
    )
    query_calibration: str | None = field(
        default=None,
        metadata={"help": "how the queries were calibrated on data (standardize, whiten), set by "
                  "memtune.calibrate; None: not calibrated"},
    )
    base_model: str | None = field(
        default=None, metadata={"help": "the base model this memory belongs to (id, path or alias)"}
    )
    hidden_size: int | None = field(
        default=None, metadata={"help": "the base model's hidden size (filled in by retrofit)"}
    )

    def __post_init__(self) -> None:
        self.layers = [int(i) for i in self.layers]
        for name in ("n_keys", "heads", "knn", "k_dim"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise MemtuneError(f"{name}={value!r} is invalid: expected a positive integer")
        if self.k_dim % 2:
            raise MemtuneError(f"k_dim={self.k_dim} is invalid: expected an even number (it is split in two halves)")
        if self.knn > self.n_keys:
            raise MemtuneError(f"knn={self.knn} is invalid: expected at most n_keys={self.n_keys}")
        if self.v_dim is not None and (not is_int(self.v_dim) or self.v_dim <= 0):
            raise MemtuneError(f"v_dim={self.v_dim!r} is invalid: expected a positive integer or None")
        if self.mode not in MODES:
            raise MemtuneError(f"mode={self.mode!r} is invalid: expected one of {', '.join(MODES)}")
        if self.value_init not in VALUE_INITS:
            raise MemtuneError(
                f"value_init={self.value_init!r} is invalid: expected one of {', '.join(VALUE_INITS)}"
            )
        if self.value_dtype not in VALUE_DTYPES:
            raise MemtuneError(
                f"value_dtype={self.value_dtype!r} is invalid: expected one of {', '.join(VALUE_DTYPES)}"
            )
        if self.query_calibration not in (None, *CALIBRATIONS):
            raise MemtuneError(f"query_calibration={self.query_calibration!r} is invalid: expected one of "
                               f"{', '.join(CALIBRATIONS)} or None")
        if any(i < 0 for i in self.layers):
            raise MemtuneError(f"layers={self.layers} is invalid: expected non-negative indices")
        if len(set(self.layers)) != len(self.layers):
            raise MemtuneError(f"layers={self.layers} is invalid: an index is repeated")

    @property
    def n_slots(self) -> int:
        return self.n_keys**2

    @property
    def resolved_value_init(self) -> str:
        if self.value_init != "auto":
            return self.value_init
        return "zeros" if self.mode == "parallel" else "normal"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MemtuneError(f"unknown memory config field(s) {unknown}: expected some of {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MemoryConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def parse_layers(spec: str | list[int]) -> list[int]:
    """'8,16,24' -> [8, 16, 24]."""
    if isinstance(spec, list):
        return spec
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise MemtuneError(f"layers={spec!r} is invalid: expected comma-separated integers like 8,16,24") from None
