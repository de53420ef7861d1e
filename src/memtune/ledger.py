"""A memory checkpoint's history: which value rows each learn call changed, which rows later
calls may not update, and (where the method needs it) the sparse optimizer state.

Saved beside the memory weights: ``ledger.json`` (the journal, one entry per call: data source,
item count, rows, time) and ``ledger.safetensors`` (row ids as int64 tensors; no pickles)::

    call{k}.table{t}.rows      rows call k updated in value table t        (R,) sorted
    frozen.table{t}            rows later calls may not update             (F,) sorted
    adam.table{t}.{rows,exp_avg,exp_avg_sq,steps}   sparse Adam state      (S,), (S, v), (S, v), (S,)

Learning continues across calls (and processes) without overwriting: `memtune learn` on a
checkpoint freezes `frozen` before it selects anything (`--no-freeze-learned` lifts that, and
then restores the optimizer state saved for those rows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from memtune.errors import MemtuneError

JOURNAL_NAME = "ledger.json"
ROWS_NAME = "ledger.safetensors"


def union(a: Tensor | None, b: Tensor | None) -> Tensor:
    """Sorted union of two row-id tensors, either of which may be missing (not both)."""
    parts = [x for x in (a, b) if x is not None]
    if not parts:
        raise ValueError("union of nothing")
    return torch.unique(torch.cat(parts)) if len(parts) > 1 else torch.unique(parts[0])


@dataclass
class Ledger:
    """What a memory has learned so far, call by call (see the module doc)."""

    calls: list[dict] = field(default_factory=list)  # the journal
    learned: list[dict[int, Tensor]] = field(default_factory=list)  # per call: table -> rows updated
    frozen: dict[int, Tensor] = field(default_factory=dict)  # table -> rows later calls may not update
    optimizer: dict[str, Tensor] = field(default_factory=dict)  # "table{t}.{rows,exp_avg,...}"

    def record(self, entry: dict, learned: dict[int, Tensor], frozen: dict[int, Tensor] | None = None,
               optimizer: dict[str, Tensor] | None = None) -> dict:
        """Append one call: its journal `entry` (completed with the row counts), the rows it
        updated, rows to freeze from now on (added to the frozen ones), its optimizer state."""
        learned = {t: torch.unique(r.cpu()) for t, r in learned.items()}
        for t, rows in (frozen or {}).items():
            self.frozen[t] = union(self.frozen.get(t), rows.cpu())
        entry = {"call": len(self.calls) + 1, **entry,
                 "rows_updated": sum(int(r.numel()) for r in learned.values()),
                 "rows_frozen_total": sum(int(r.numel()) for r in self.frozen.values())}
        self.calls.append(entry)
        self.learned.append(learned)
        self.optimizer = dict(optimizer or {})
        return entry

    def learned_rows(self, table: int) -> Tensor:
        """Every row any call updated in `table` (sorted)."""
        parts = [c[table] for c in self.learned if table in c]
        return torch.unique(torch.cat(parts)) if parts else torch.empty(0, dtype=torch.long)

    def save(self, folder: str | Path) -> None:
        """Write the journal and rows into `folder` (a checkpoint being written: `save_memory`)."""
        if not self.calls:
            return
        folder = Path(folder)
        tensors = {f"frozen.table{t}": r.contiguous() for t, r in self.frozen.items()}
        for k, call in enumerate(self.learned, start=1):
            tensors |= {f"call{k}.table{t}.rows": r.contiguous() for t, r in call.items()}
        tensors |= {f"adam.{k}": v.contiguous() for k, v in self.optimizer.items()}
        save_file(tensors, folder / ROWS_NAME, metadata={"format": "memtune-ledger-v1"})
        (folder / JOURNAL_NAME).write_text(json.dumps({"calls": self.calls}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> Ledger:
        """The ledger of checkpoint `folder`; empty when it has none (a fresh retrofit). Raises
        MemtuneError when only one of its two files is there or they do not agree."""
        folder = Path(folder)
        journal, rows = folder / JOURNAL_NAME, folder / ROWS_NAME
        if not journal.is_file() and not rows.is_file():
            return cls()
        unreadable = f"{str(folder)!r}: unreadable learn history ({JOURNAL_NAME} + {ROWS_NAME})"
        try:
            calls = json.loads(journal.read_text())["calls"]
            tensors = load_file(rows)
        except Exception as e:  # missing file, bad JSON, truncated safetensors
            raise MemtuneError(f"{unreadable}: {type(e).__name__}: {e}") from None
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise MemtuneError(f"{unreadable}: 'calls' must be a list of objects")
        ledger = cls(calls=calls, learned=[{} for _ in calls])
        for name, t in tensors.items():
            parts = name.split(".")
            try:
                if parts[0] == "frozen":
                    ledger.frozen[int(parts[1].removeprefix("table"))] = t
                elif parts[0].startswith("call"):
                    ledger.learned[int(parts[0].removeprefix("call")) - 1][int(parts[1].removeprefix("table"))] = t
                elif parts[0] == "adam":
                    ledger.optimizer[name.removeprefix("adam.")] = t
            except (IndexError, ValueError):
                raise MemtuneError(f"{unreadable}: {name!r} does not match the {len(calls)} calls listed") from None
        return ledger

    def check(self, n_slots: int, where: str | Path) -> None:
        """Every row id fits a value table of `n_slots` rows (the ledger belongs to this memory)."""
        for t, rows in [*self.frozen.items(), *((t, r) for c in self.learned for t, r in c.items())]:
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_slots):
                raise MemtuneError(f"{str(where)!r}: its learn history names rows outside the memory's "
                                   f"{n_slots} slots: it belongs to another memory")
