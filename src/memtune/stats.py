"""Slot statistics: how often each memory slot is read.

- per step (`StepUsage`): read counts c(i) over the real tokens of every micro-batch of the
  step, kept sparse (slot ids + counts), so a step costs O(reads), not O(n_slots);
- over background text (`Background`): df(i), the number of background batches that read slot
  i, and counts(i), the total reads — computed once, saved, and reused by every `learn`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from memtune.errors import MemtuneError, is_int
from memtune.io import atomic_dir
from memtune.memory import MemoryBank
from memtune.retrofit import forward_to_memory, require_memory_bank

log = logging.getLogger(__name__)

STATS_NAME = "background.safetensors"
META_NAME = "background.json"


def read_slots(indices: Tensor, mask: Tensor) -> Tensor:
    """The slots read at counted positions. indices: (B, T, K); mask: (B, T) bool -> (reads,)."""
    return indices[mask.to(indices.device, torch.bool)].reshape(-1)


class StepUsage:
    """Accumulates, per memory layer, the slots read during one optimizer step."""

    def __init__(self, bank: MemoryBank):
        self.bank = bank
        self.reads: dict[str, list[Tensor]] = {name: [] for name in bank.layers}

    def add(self, mask: Tensor) -> None:
        """Record the last forward's reads at positions where `mask` (B, T) is true."""
        for name, layer in self.bank.layers.items():
            if layer.last_indices is None:
                raise RuntimeError("memory layers did not record their reads: call bank.set_record(True)")
            self.reads[name].append(read_slots(layer.last_indices, mask))

    def counts(self) -> dict[str, tuple[Tensor, Tensor]]:
        """layer -> (slots (U,) sorted, counts (U,)) of the slots read at least once."""
        out = {}
        for name, parts in self.reads.items():
            flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
            out[name] = torch.unique(flat, return_counts=True)
        return out


# What decides which slots a token reads: these config fields and each layer's query and keys.
LOOKUP_FIELDS = ("layers", "n_keys", "heads", "knn", "k_dim", "query_norm")


def memory_fingerprint(bank: MemoryBank) -> str:
    """Identifies the lookup: statistics are valid only for it. Values, gates and output
    projections are left out — sparse finetuning changes values, not which slots are read."""
    config = bank.config.to_dict()
    h = hashlib.sha256(json.dumps({k: config[k] for k in LOOKUP_FIELDS}, sort_keys=True).encode())
    for name, p in sorted(bank.layers.state_dict().items()):
        if name.split(".")[1] in ("query", "query_norm", "keys", "query_center"):
            h.update(name.encode())
            h.update(p.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Background:
    """Per-layer df and counts over `n_batches` background batches."""

    df: dict[str, Tensor]
    counts: dict[str, Tensor]
    n_batches: int
    meta: dict = field(default_factory=dict)

    def __add__(self, other: Background) -> Background:
        """The statistics of both sets of batches (of the same memory)."""
        if self.meta.get("memory_fingerprint") != other.meta.get("memory_fingerprint"):
            raise MemtuneError("cannot add slot statistics of two different memory models")
        return Background({k: v + other.df[k] for k, v in self.df.items()},
                          {k: v + other.counts[k] for k, v in self.counts.items()},
                          self.n_batches + other.n_batches, dict(self.meta))

    def read_by(self, n: int) -> Background:
        """The rows that at least `n` batches read, as the statistics of one batch that reads them
        all (df 1, counts kept; others 0): with `group_stats`, the rows `n` or more groups read.
        MemtuneError unless `n` is an integer >= 1."""
        if not is_int(n) or n < 1:
            raise MemtuneError(f"read_by({n!r}) is invalid: expected an integer >= 1 (batches that read a row)")
        keep = {k: v >= n for k, v in self.df.items()}
        return Background({k: keep[k].long() for k in self.df}, {k: v * keep[k] for k, v in self.counts.items()},
                          1, dict(self.meta))

    def df_total(self, layer: str) -> float:
        """Σ_j (df(j) + 1), the KL ranker's normaliser."""
        df = self.df[layer]
        return float(df.sum().item() + df.numel())

    def check(self, bank: MemoryBank, path: str | Path = "background statistics") -> None:
        expected = memory_fingerprint(bank)
        if self.meta.get("memory_fingerprint") != expected:
            raise MemtuneError(
                f"{str(path)!r} was computed for a different memory model (fingerprint "
                f"{self.meta.get('memory_fingerprint')} != {expected}): rerun `memtune background` on this one"
            )

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        tensors = {f"df.{k}": v.to(torch.int32) for k, v in self.df.items()}
        tensors |= {f"counts.{k}": v for k, v in self.counts.items()}
        with atomic_dir(path, overwrite=overwrite) as tmp:
            save_file(tensors, tmp / STATS_NAME)
            (tmp / META_NAME).write_text(json.dumps({**self.meta, "n_batches": self.n_batches}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Background:
        path = Path(path)
        if not (path / STATS_NAME).is_file() or not (path / META_NAME).is_file():
            raise MemtuneError(f"{str(path)!r} holds no background statistics: expected the output of `memtune background`")
        try:
            meta = json.loads((path / META_NAME).read_text())
            tensors = load_file(path / STATS_NAME)
            n_batches = int(meta["n_batches"])
        except Exception as e:  # edited, truncated, not ours
            raise MemtuneError(f"background statistics {str(path)!r} cannot be read ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}): rerun `memtune background`") from None
        df = {k.removeprefix("df."): v.long() for k, v in tensors.items() if k.startswith("df.")}
        counts = {k.removeprefix("counts."): v for k, v in tensors.items() if k.startswith("counts.")}
        return cls(df=df, counts=counts, n_batches=n_batches, meta=meta)


@torch.no_grad()
def compute_background(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    n_batches: int | None = None,
    progress: bool = True,
) -> Background:
    """Run batches (input_ids, attention_mask[, count_mask]) through the model; df(i) counts
    the batches that read slot i at a counted position, counts(i) all such reads."""
    bank = require_memory_bank(model)
    n_slots = bank.config.n_slots
    df = {name: torch.zeros(n_slots, dtype=torch.long) for name in bank.layers}
    counts = {name: torch.zeros(n_slots, dtype=torch.long) for name in bank.layers}
    device = next(model.parameters()).device
    model.eval()
    recording = all(m.record for m in bank.layers.values())  # as SMF training keeps it: restored after
    bank.set_record(True)
    seen = 0
    try:
        for batch in tqdm(batches, total=n_batches, desc="background", disable=not progress):
            mask = batch.get("count_mask", batch["attention_mask"]).bool()
            forward_to_memory(model, input_ids=batch["input_ids"].to(device),
                              attention_mask=batch["attention_mask"].to(device), use_cache=False)
            for name, layer in bank.layers.items():
                slots, c = torch.unique(read_slots(layer.last_indices, mask).cpu(), return_counts=True)
                df[name][slots] += 1
                counts[name][slots] += c
            seen += 1
    finally:
        bank.set_record(recording)
    if seen == 0:
        raise MemtuneError("background text is empty: expected at least one batch of text")
    return Background(df=df, counts=counts, n_batches=seen, meta={"memory_fingerprint": memory_fingerprint(bank)})


def background_stats(model: nn.Module, examples: list, pad_id: int, n_batches: int, batch_size: int,
                     count_positions: str = "loss", progress: bool = True) -> Background:
    """Slot statistics of the first `n_batches` batches of `examples` (`memtune.batches.Example`;
    fewer batches when they run out), counted at `count_positions` ("loss" or "all")."""
    from memtune.batches import first_batches

    n, batches = first_batches(examples, pad_id, n_batches, batch_size, count_positions)
    return compute_background(model, batches, n_batches=n, progress=progress)


def group_stats(model: nn.Module, groups: list[list], pad_id: int, batch_size: int, count_positions: str = "loss",
                progress: bool = True, desc: str = "slot reads") -> Background:
    """Slot statistics with each group of examples counted as one batch, however many batches of
    `batch_size` it takes: per layer, df(i) is the number of groups that read slot i at a counted
    position (`count_positions`) of that layer, counts(i) all their reads; n_batches is the number
    of groups. With questions grouped by subject, df counts subjects. Layers are counted apart even
    when they share a value table: a row one group reads at layer 8 and another at layer 24 is
    read by one group at each (counted per value row, `--neighbourhood-cross` protected 296 k
    slots of the mix instead of 209 k, kept no known fact more and answered 5 points fewer
    paraphrases: BENCHMARKS.md, eighteenth round). MemtuneError when no group has an example."""
    total = None
    for group in tqdm([g for g in groups if g], desc=desc, disable=not progress):
        one = background_stats(model, group, pad_id, len(group), batch_size, count_positions, progress=False)
        one = Background({k: (v > 0).long() for k, v in one.df.items()}, one.counts, 1, one.meta)
        total = one if total is None else total + one
    if total is None:
        raise MemtuneError("no examples to count slot reads of: expected at least one non-empty group")
    return total
