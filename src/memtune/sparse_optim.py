"""Exact sparse updates of value tables: only the selected rows move.

`step(table, rows)` applies the table's (sparse) gradient to `rows` alone. Every other row —
and every other parameter — is left bitwise untouched. State (Adam moments, per-row step
counts) exists only for rows that have been selected, so memory and work scale with the rows
touched, never with the number of slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from memtune.errors import MemtuneError

OPTIMIZERS = ("sgd", "adam")


def sparse_rows(grad: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The gradient restricted to `rows` (sorted): (row ids (R,), gradient rows (R, v))."""
    if not grad.is_sparse:
        raise MemtuneError("a value table's gradient must be sparse; was it read through memtune's memory layer?")
    grad = grad.coalesce()
    ids, values = grad.indices()[0], grad.values()
    keep = torch.isin(ids, rows)
    return ids[keep], values[keep]


class SparseSGD:
    """row -= lr · grad, on the selected rows only."""

    def __init__(self, lr: float):
        self.lr = lr

    @torch.no_grad()
    def step(self, table: nn.Parameter, rows: Tensor) -> int:
        if table.grad is None:
            return 0
        ids, g = sparse_rows(table.grad, rows)
        table.index_add_(0, ids, g.to(table.dtype), alpha=-self.lr)
        return ids.numel()

    def state_dict(self) -> dict:
        return {}

    def state_tensors(self, tables: list[nn.Parameter]) -> dict[str, Tensor]:
        return {}  # stateless

    def load_state_tensors(self, tables: list[nn.Parameter], tensors: dict[str, Tensor]) -> None:
        pass

    def forget(self, table: nn.Parameter, rows: Tensor) -> None:
        pass  # stateless


@dataclass
class _RowState:
    rows: Tensor  # (R,) sorted ids of rows ever selected
    exp_avg: Tensor  # (R, v)
    exp_avg_sq: Tensor  # (R, v)
    steps: Tensor  # (R,) updates each row has received (bias correction is per row)


@dataclass
class SparseAdam:
    """Adam with lazily created per-row state. A row's moments and step count advance only in
    steps that select it, so an unselected row never moves — not even by stale momentum."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    state: dict[int, _RowState] = field(default_factory=dict)

    def _rows_state(self, table: nn.Parameter, ids: Tensor) -> tuple[_RowState, Tensor]:
        """State for `table`, grown to include `ids`; returns it and the positions of ids in it."""
        st = self.state.get(id(table))
        v = table.shape[1]
        if st is None:
            empty = torch.empty(0, v, dtype=torch.float32, device=table.device)
            st = _RowState(ids.new_empty(0), empty, empty.clone(), ids.new_empty(0))
        new = ids[~torch.isin(ids, st.rows)]
        if new.numel():
            rows, order = torch.cat([st.rows, new]).sort()
            zeros = torch.zeros(new.numel(), v, dtype=torch.float32, device=table.device)
            st = _RowState(
                rows,
                torch.cat([st.exp_avg, zeros])[order],
                torch.cat([st.exp_avg_sq, zeros])[order],
                torch.cat([st.steps, torch.zeros_like(new)])[order],
            )
        self.state[id(table)] = st
        return st, torch.searchsorted(st.rows, ids)

    @torch.no_grad()
    def step(self, table: nn.Parameter, rows: Tensor) -> int:
        if table.grad is None:
            return 0
        ids, g = sparse_rows(table.grad, rows)
        if ids.numel() == 0:
            return 0
        st, pos = self._rows_state(table, ids)
        b1, b2 = self.betas
        g = g.float()
        st.steps[pos] += 1
        m = st.exp_avg[pos].mul_(b1).add_(g, alpha=1 - b1)
        s = st.exp_avg_sq[pos].mul_(b2).addcmul_(g, g, value=1 - b2)
        st.exp_avg[pos], st.exp_avg_sq[pos] = m, s
        t = st.steps[pos].double()
        bc1 = (1 - b1**t).float()[:, None]
        bc2 = (1 - b2**t).float()[:, None]
        update = (m / bc1) / ((s / bc2).sqrt() + self.eps)
        table.index_add_(0, ids, update.to(table.dtype), alpha=-self.lr)
        return ids.numel()

    def forget(self, table: nn.Parameter, rows: Tensor) -> None:
        """Drop the state of `rows` of `table`: a row updated again starts as if never updated."""
        st = self.state.get(id(table))
        if st is not None:
            keep = ~torch.isin(st.rows, rows.to(st.rows.device))
            self.state[id(table)] = _RowState(st.rows[keep], st.exp_avg[keep], st.exp_avg_sq[keep], st.steps[keep])

    def rows_with_state(self) -> int:
        return sum(st.rows.numel() for st in self.state.values())

    def state_tensors(self, tables: list[nn.Parameter]) -> dict[str, Tensor]:
        """The per-row state as named tensors, `table{t}.{rows,exp_avg,exp_avg_sq,steps}` (for a
        checkpoint's ledger), tables numbered as in `tables`."""
        out = {}
        for t, table in enumerate(tables):
            st = self.state.get(id(table))
            if st is not None:
                for name in ("rows", "exp_avg", "exp_avg_sq", "steps"):
                    out[f"table{t}.{name}"] = getattr(st, name).cpu()
        return out

    def load_state_tensors(self, tables: list[nn.Parameter], tensors: dict[str, Tensor]) -> None:
        """Inverse of `state_tensors`: continue from saved per-row state."""
        for t, table in enumerate(tables):
            if f"table{t}.rows" in tensors:
                self.state[id(table)] = _RowState(*(tensors[f"table{t}.{name}"].to(table.device)
                                                    for name in ("rows", "exp_avg", "exp_avg_sq", "steps")))


def make_sparse_optimizer(name: str, lr: float) -> SparseSGD | SparseAdam:
    if name == "sgd":
        return SparseSGD(lr)
    if name == "adam":
        return SparseAdam(lr)
    raise MemtuneError(f"optimizer={name!r} is invalid for SMF: expected one of {', '.join(OPTIMIZERS)}")

