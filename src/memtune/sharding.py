"""A value table split by columns over the ranks of a process group ("memory parallel").

Rank r of N holds columns [bounds[r], bounds[r+1]) of every row: (n_slots, ~v/N). This is how
the Memory Layers at Scale code shards its values (by columns over a memory-parallel mesh).

Why columns rather than rows (each rank owning n_slots/N whole rows, reads sent to their owners
by an all-to-all): both move about the same bytes per token (the v floats of a token's output
and of its gradient; see BENCHMARKS.md for the cost model), but by columns
- every rank reads the same rows, so a token's output columns are computed exactly as in one
  process (the bag-sum is per column): sharded forward equals unsharded bit for bit;
- every rank holds exactly 1/N of the table and of SMF's optimizer state, whatever rows the
  data reads (rows owned by one rank would be hot or cold as the data is);
- the collectives have sizes known from token counts alone (no per-step routing of reads), and
  SMF's selection, the same on every rank, applies unchanged to every shard.

Forward, for the N_r tokens of rank r (weights, indices: (N_r, K)), N = Σ_r N_r:
 1. all-gather weights and indices: every rank has every token's reads, (N, K);
 2. bag-sum of the local columns for all N tokens: (N, v_r);
 3. all-to-all: rank r gets its own tokens' columns from every rank: (N_r, v).
Backward mirrors it: an all-to-all of grad_out gives every rank all tokens' gradients for its
columns (N, v_r); from them the shard's sparse gradient (every rank's reads — nothing left to
reduce) and partial dot products (N, K) for the weights, sent back by an all-to-all and summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from memtune import distributed

_INIT_ROWS = 4096  # rows of a sharded normal init drawn at a time


@dataclass(frozen=True)
class ColumnShard:
    """This rank's columns of a table of `v_dim` columns split over `world` ranks."""

    rank: int
    world: int
    v_dim: int

    def bounds(self, r: int) -> tuple[int, int]:
        return r * self.v_dim // self.world, (r + 1) * self.v_dim // self.world

    @property
    def columns(self) -> tuple[int, int]:
        return self.bounds(self.rank)

    @property
    def width(self) -> int:
        start, end = self.columns
        return end - start

    def widths(self) -> list[int]:
        return [b - a for a, b in map(self.bounds, range(self.world))]


def column_shard(v_dim: int) -> ColumnShard | None:
    """This rank's shard of a `v_dim`-column table, or None in one process."""
    if not distributed.active():
        return None
    world = distributed.world_size()
    if v_dim < world:
        from memtune.errors import MemtuneError

        raise MemtuneError(f"shard_values: v_dim={v_dim} cannot be split over {world} ranks: expected at least one column each")
    return ColumnShard(distributed.rank(), world, v_dim)


def _exchange(parts: list[Tensor], recv_shapes: list[tuple[int, int]]) -> list[Tensor]:
    """All-to-all of 2-D blocks: parts[j] goes to rank j; returns the block from each rank.
    Flattened, since the blocks' widths differ by rank."""
    send = torch.cat([p.reshape(-1) for p in parts])
    recv = send.new_empty(sum(a * b for a, b in recv_shapes))
    dist.all_to_all_single(recv, send, output_split_sizes=[a * b for a, b in recv_shapes],
                           input_split_sizes=[p.numel() for p in parts])
    return [x.view(shape) for x, shape in zip(recv.split([a * b for a, b in recv_shapes]), recv_shapes)]


class _ShardedRead(torch.autograd.Function):
    """y[n] = Σ_k weights[n, k] · table[indices[n, k]] with the table split by columns."""

    @staticmethod
    def forward(ctx, weights: Tensor, indices: Tensor, shard_weight: Tensor, shard: ColumnShard) -> Tensor:
        import torch.nn.functional as F

        all_w, counts = distributed.all_gather_rows(weights)  # (N, K)
        all_i = distributed._gather_padded(indices, counts)  # (N, K)
        cols = F.embedding_bag(all_i, shard_weight, per_sample_weights=all_w, mode="sum")  # (N, v_r)
        mine = counts[shard.rank]
        blocks = _exchange(list(cols.split(counts)), [(mine, w) for w in shard.widths()])
        ctx.save_for_backward(all_w, all_i, shard_weight)
        ctx.shard, ctx.counts = shard, counts
        return torch.cat(blocks, dim=1)  # (N_r, v)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        from memtune.memory import _gathered_dots, _table_grad

        all_w, all_i, shard_weight = ctx.saved_tensors
        shard, counts = ctx.shard, ctx.counts
        grad_out = grad_out.contiguous()
        parts = [grad_out[:, a:b] for a, b in map(shard.bounds, range(shard.world))]
        grad_cols = torch.cat(_exchange(parts, [(n, shard.width) for n in counts]))  # (N, v_r)
        grad_w = grad_table = None
        if ctx.needs_input_grad[0]:
            dots = _gathered_dots(shard_weight, all_i, grad_cols.to(shard_weight.dtype))  # (N, K), partial
            k = all_i.shape[1]
            back = _exchange(list(dots.split(counts)), [(counts[shard.rank], k)] * shard.world)
            grad_w = torch.stack(back).sum(0).to(all_w.dtype)
        if ctx.needs_input_grad[2]:
            grad_table = _table_grad(all_w, all_i, grad_cols, shard_weight)
        return grad_w, None, grad_table, None


def read_sharded(weights: Tensor, indices: Tensor, shard_weight: Tensor, shard: ColumnShard) -> Tensor:
    """Weighted sum of value rows from a column-sharded table. weights, indices: (N_r, K) this
    rank's tokens; shard_weight: (S, v_r) -> (N_r, v). A collective: every rank calls it."""
    return _ShardedRead.apply(weights, indices, shard_weight, shard)


@torch.no_grad()
def gather_columns(shard_weight: Tensor, shard: ColumnShard) -> Tensor:
    """The whole table (S, v) on every rank, from each rank's columns. A collective."""
    widest = max(shard.widths())
    padded = shard_weight.new_zeros(shard_weight.shape[0], widest)
    padded[:, : shard.width] = shard_weight
    parts = [torch.empty_like(padded) for _ in range(shard.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:, :w] for p, w in zip(parts, shard.widths())], dim=1)


def take_columns(full: Tensor, shard: ColumnShard) -> Tensor:
    """This rank's columns of a whole table (S, v) -> (S, v_r)."""
    start, end = shard.columns
    return full[:, start:end].contiguous()


@torch.no_grad()
def normal_init_(shard_weight: Tensor, shard: ColumnShard) -> None:
    """Fill this rank's columns of a table drawn N(0, 1/v): every rank draws the same rows (same
    seed) a block at a time and keeps its columns, so the shards make one table."""
    start, end = shard.columns
    block = torch.empty(_INIT_ROWS, shard.v_dim, dtype=shard_weight.dtype, device=shard_weight.device)
    for s in range(0, shard_weight.shape[0], _INIT_ROWS):
        e = min(shard_weight.shape[0], s + _INIT_ROWS)
        shard_weight[s:e] = block[: e - s].normal_(0.0, shard.v_dim**-0.5)[:, start:end]


# Per-row optimizer state whose columns follow the table's (memtune.sparse_optim.SparseAdam).
_COLUMN_STATE = ("exp_avg", "exp_avg_sq")


def whole_optimizer_state(state: dict[str, Tensor], tables) -> dict[str, Tensor]:
    """`SparseAdam.state_tensors` of this rank, with the moments of sharded tables gathered to
    whole rows, as one process would save them (a collective: every rank selected the same rows,
    so every rank holds state for the same rows). tables: the ValueTables, numbered as in `state`."""
    out = dict(state)
    for t, table in enumerate(tables):
        if table.shard is not None:
            for name in _COLUMN_STATE:
                if f"table{t}.{name}" in out:
                    out[f"table{t}.{name}"] = gather_columns(out[f"table{t}.{name}"], table.shard)
    return out


def local_optimizer_state(state: dict[str, Tensor], tables) -> dict[str, Tensor]:
    """Inverse of `whole_optimizer_state`: this rank's columns of saved whole-row moments."""
    out = dict(state)
    for t, table in enumerate(tables):
        key = f"table{t}.exp_avg"
        if table.shard is not None and key in out and out[key].shape[1] == table.v_dim:
            for name in _COLUMN_STATE:
                out[f"table{t}.{name}"] = take_columns(out[f"table{t}.{name}"], table.shard)
    return out
