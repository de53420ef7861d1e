"""The product-key memory layer (Memory Layers at Scale), its value table, and the bank that
holds all of a model's memory parameters under one name prefix (`memory.`).

A read touches only the value rows that were looked up: forward is a weighted bag-sum of rows,
and backward returns a *sparse* (coalesced COO) gradient holding just the unique rows read, so
neither an (n_slots × d) gradient nor optimizer state is ever materialised. The table and that
gradient sit in transparent huge pages where Linux allows it (`empty_huge`): random row reads
miss the TLB less, and a fresh gradient costs 70 page faults instead of 36 K.
"""

from __future__ import annotations

import ctypes
import math
import sys
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memtune.config import MemoryConfig
from memtune.errors import MemtuneError, is_number
from memtune.ledger import Ledger
from memtune.product_keys import product_key_topk
from memtune.sharding import ColumnShard, column_shard, gather_columns, normal_init_, read_sharded, take_columns

# Elements of the buffer that gathered value rows are recomputed into in backward when no
# sampled matmul is available: 4M elements bounds the temporary whatever the batch size.
_GRAD_CHUNK_ELEMENTS = 4 * 2**20
# Rows of the table gradient written per step: small enough that scaling a chunk right after
# gathering it finds it in cache.
_GRAD_ROWS_CHUNK = 1024

# Transparent huge pages for the value table and its gradient, asked for through madvise.
_HUGE_PAGE = 2 * 2**20
_HUGE_MIN_BYTES = 32 * 2**20  # glibc serves allocations this large by a fresh mmap
_MADV_HUGEPAGE = 14


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def thp_mode() -> str:
    """The kernel's transparent-huge-page policy ("always", "madvise", "never"), or "unavailable"."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unavailable"
    return text.split("[")[1].split("]")[0] if "[" in text else text.strip()


@lru_cache(maxsize=1)
def huge_pages_granted() -> bool:
    """Whether `empty_huge` buffers really get huge pages: Linux with THP "always" or "madvise"."""
    return _madvise is not None and thp_mode() in ("always", "madvise")


def empty_huge(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """torch.empty, with the buffer's 2 MiB-aligned interior marked for transparent huge pages
    (Linux madvise) before anything touches it.

    A fresh 140 MiB buffer in 4 KiB pages costs ~36 K page faults, 4x the time of writing it;
    in 2 MiB pages, 70. Random reads from a multi-GiB value table also miss the TLB far less.
    Only the page size changes; without Linux or THP this is plain torch.empty.
    """
    t = torch.empty(shape, dtype=dtype, device=device)
    if _madvise is not None and t.device.type == "cpu" and t.nbytes >= _HUGE_MIN_BYTES:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (t.data_ptr() + t.nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: failure changes nothing
    return t


def _mark_coalesced(param: Tensor) -> None:
    """Autograd stores a sparse gradient through a constructor that drops the `coalesced` flag,
    so a consumer's `.coalesce()` would sort and copy every row again. Restore the flag when the
    row indices are strictly increasing (always, for one read; not after summing two reads)."""
    grad = param.grad
    if grad is not None and grad.is_sparse and not grad.is_coalesced() and grad.sparse_dim() == 1:
        rows = grad._indices()[0]
        if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
            grad._coalesced_(True)


class ValueTable(nn.Module):
    """n_slots value rows of size v_dim. Several memory layers may read one table.

    With a `shard` (memtune.sharding, under torchrun) `weight` holds only this rank's columns,
    (n_slots, ~v_dim/N), and reads are collectives. Its state_dict is still the whole table
    (gathered: every rank must call it, as with FSDP's full state dict) and loading takes this
    rank's columns, so checkpoints are the same whatever the number of ranks.
    """

    def __init__(self, n_slots: int, v_dim: int, init: str = "zeros", dtype: torch.dtype | None = None,
                 shard: ColumnShard | None = None):
        super().__init__()
        device = torch.get_default_device()
        dtype = dtype or torch.get_default_dtype()
        self.v_dim = v_dim
        self.shard = shard
        width = v_dim if shard is None else shard.width
        self.weight = nn.Parameter(empty_huge((n_slots, width), dtype, device))
        self.weight.register_post_accumulate_grad_hook(_mark_coalesced)
        if shard is not None:
            self.register_state_dict_post_hook(_gather_shard)
            self.register_load_state_dict_pre_hook(_take_shard)
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "zeros") -> None:
        with torch.no_grad():
            if init == "zeros":
                self.weight.zero_()
            elif self.shard is not None:
                normal_init_(self.weight, self.shard)
            else:
                self.weight.normal_(0.0, self.weight.shape[1] ** -0.5)

    def read(self, weights: Tensor, indices: Tensor) -> Tensor:
        """Weighted sum of rows. weights, indices: (N, K) -> (N, v_dim)."""
        if self.shard is None:
            return read_values(weights, indices, self.weight)
        return read_sharded(weights, indices, self.weight, self.shard)

    @property
    def n_slots(self) -> int:
        return self.weight.shape[0]


def _gathered_dots(table: Tensor, indices: Tensor, rows: Tensor) -> Tensor:
    """out[n, k] = <table[indices[n, k]], rows[n]>. table: (S, v); indices: (N, K); rows: (N, v).

    One sampled matmul (rows @ table.T, computed only at the N·K read positions) when the
    backend has it; otherwise chunks gathered into one reused buffer, because a fresh (N, K, v)
    tensor costs more in page faults than the arithmetic.
    """
    n, k = indices.shape
    if table.device.type == "cpu" and table.dtype in (torch.float32, torch.float64):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(
                torch.arange(0, n * k + 1, k, device=indices.device), indices.reshape(-1),
                torch.zeros(n * k, dtype=table.dtype, device=table.device), size=(n, table.shape[0]),
                check_invariants=False,
            )
            return torch.sparse.sampled_addmm(pattern, rows, table.T, beta=0.0).values().view(n, k)
    v = table.shape[1]
    out = torch.empty(n, k, dtype=table.dtype, device=table.device)
    step = max(1, min(n, _GRAD_CHUNK_ELEMENTS // (k * v)))
    buf = table.new_empty(step * k, v)
    for s in range(0, n, step):
        e = min(n, s + step)
        gathered = torch.index_select(table, 0, indices[s:e].reshape(-1), out=buf[: (e - s) * k])
        torch.bmm(gathered.view(e - s, k, v), rows[s:e, :, None], out=out[s:e, :, None])
    return out


def _table_grad(weights: Tensor, indices: Tensor, grad_out: Tensor, table: Tensor) -> Tensor:
    """Sparse coalesced gradient of y[n] = Σ_k weights[n, k] · table[indices[n, k]]:
    row u is Σ weights[n, k] · grad_out[n] over the reads (n, k) of u. weights, indices: (N, K);
    grad_out: (N, v). Holds only the U unique rows read.

    Writing U fresh rows (140 MiB at 1M slots) costs mostly page faults. With huge pages, rows
    are written into an `empty_huge` buffer — weight · grad_out row for each row's first read
    (nearly every row is read once at 1M slots), then the few repeated reads added — 3x faster
    than the segment-sum below. Without them, that one-pass embedding_bag segment-sum is faster.
    """
    k = indices.shape[1]
    flat = indices.reshape(-1)
    sorted_idx, order = flat.sort()
    unique, counts = torch.unique_consecutive(sorted_idx, return_counts=True)
    token = order // k  # (N·K,) the token of each read, in row order
    w = weights.reshape(-1)[order].to(grad_out.dtype)
    starts = counts.cumsum(0) - counts  # first read of each unique row
    if huge_pages_granted():
        rows = _rows_by_first_read(grad_out, token, w, starts, counts)
    else:  # bag u sums the reads of row u
        rows = F.embedding_bag(token, grad_out, offsets=starts, per_sample_weights=w, mode="sum")  # (U, v)
    return torch.sparse_coo_tensor(
        unique[None], rows.to(table.dtype), table.shape, is_coalesced=True, check_invariants=False
    )


def _rows_by_first_read(grad_out: Tensor, token: Tensor, w: Tensor, starts: Tensor, counts: Tensor) -> Tensor:
    """The segment-sum of `_table_grad` into a huge-page buffer. token, w: (N·K,) in row order;
    starts, counts: (U,) where each row's reads begin and how many there are -> (U, v)."""
    u = starts.numel()
    first_token, first_w = token[starts], w[starts]
    rows = empty_huge((u, grad_out.shape[1]), grad_out.dtype, grad_out.device)
    for s in range(0, u, _GRAD_ROWS_CHUNK):
        e = min(u, s + _GRAD_ROWS_CHUNK)
        torch.index_select(grad_out, 0, first_token[s:e], out=rows[s:e])
        rows[s:e].mul_(first_w[s:e, None])
    if u < token.numel():  # repeated reads, added through one small reused buffer
        repeat = torch.ones_like(token, dtype=torch.bool)
        repeat[starts] = False
        pos = repeat.nonzero().squeeze(1)
        row_of = torch.repeat_interleave(torch.arange(u, device=token.device), counts)[pos]
        buf = grad_out.new_empty(min(pos.numel(), _GRAD_ROWS_CHUNK), grad_out.shape[1])
        for s in range(0, pos.numel(), _GRAD_ROWS_CHUNK):
            e = min(pos.numel(), s + _GRAD_ROWS_CHUNK)
            part = torch.index_select(grad_out, 0, token[pos[s:e]], out=buf[: e - s])
            rows.index_add_(0, row_of[s:e], part.mul_(w[pos[s:e], None]))
    return rows


class _SparseValueRead(torch.autograd.Function):
    """y[n] = Σ_k weights[n, k] · table[indices[n, k]], with a sparse gradient for `table`."""

    @staticmethod
    def forward(ctx, weights: Tensor, indices: Tensor, table: Tensor) -> Tensor:
        ctx.save_for_backward(weights, indices, table)
        return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")  # (N, v)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weights, indices, table = ctx.saved_tensors
        grad_weights = grad_table = None
        grad_out = grad_out.contiguous()
        if ctx.needs_input_grad[0]:
            grad_weights = _gathered_dots(table, indices, grad_out.to(table.dtype)).to(weights.dtype)
        if ctx.needs_input_grad[2]:
            grad_table = _table_grad(weights, indices, grad_out, table)
        return grad_weights, None, grad_table


def read_values(weights: Tensor, indices: Tensor, table: Tensor) -> Tensor:
    """Weighted sum of value rows. weights, indices: (N, K); table: (S, v) -> (N, v)."""
    return _SparseValueRead.apply(weights, indices, table)


def _gather_shard(module: ValueTable, state: dict, prefix: str, local_metadata) -> None:
    state[prefix + "weight"] = gather_columns(module.weight.detach(), module.shard)


def _take_shard(module: ValueTable, state: dict, prefix: str, *args) -> None:
    full = state.get(prefix + "weight")
    if full is not None and full.shape[1] == module.v_dim != module.weight.shape[1]:
        state[prefix + "weight"] = take_columns(full, module.shard)


def check_query_noise(sigma) -> None:
    """MemtuneError unless `sigma` is a number in [0, inf) (and not a bool)."""
    if not is_number(sigma) or not 0 <= sigma < float("inf"):
        raise MemtuneError(f"query_noise={sigma!r} is invalid: expected a number >= 0 (the noise's std in units "
                           "of the query's RMS)")


def check_slot_dropout(p) -> None:
    """MemtuneError unless `p` is a number in [0, 1) (and not a bool)."""
    if not is_number(p) or not 0 <= p < 1:
        raise MemtuneError(f"slot_dropout={p!r} is invalid: expected a probability in [0, 1) (the share of read "
                           "slots left out of each training read)")


class ProductKeyMemory(nn.Module):
    """One memory layer: query -> product-key lookup -> weighted value read -> Memory+ gate.

    The value table is not owned: it is passed to `forward`, so several layers can share one.
    """

    def __init__(self, config: MemoryConfig, hidden_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        c = config
        v_dim = c.v_dim or hidden_size
        self.query = nn.Linear(hidden_size, c.heads * c.k_dim, bias=False, dtype=dtype)
        self.query_norm = nn.RMSNorm(c.k_dim, dtype=dtype) if c.query_norm else nn.Identity()
        self.keys = nn.Parameter(torch.empty(c.heads, 2, c.n_keys, c.k_dim // 2, dtype=dtype))
        self.gate = nn.Linear(hidden_size, v_dim, bias=False, dtype=dtype) if c.gate else None
        self.out = nn.Linear(v_dim, hidden_size, bias=False, dtype=dtype)
        with torch.no_grad():
            bound = 1 / math.sqrt(c.k_dim // 2)
            self.keys.uniform_(-bound, bound)
        # Subtracted from the input before the query projection; zero until `calibrate_queries`
        # sets it to the mean input of representative data (see memtune.calibrate).
        self.register_buffer("query_center", torch.zeros(hidden_size, dtype=dtype))
        # When `record` is set, the slots read by the last forward are kept (detached) for
        # slot statistics and sparse finetuning: (B, T, heads * knn).
        self.record = False
        self.last_indices: Tensor | None = None
        # In training mode, the slots each head reads per token if set (>= knn): SMF's wider write
        # than read (`SMFConfig.write_knn`); eval mode always reads `config.knn`.
        self.write_knn: int | None = None
        # In training mode, the std of Gaussian noise added to each normalised query element
        # (`SMFConfig.query_noise`); eval mode reads with the exact query.
        self.query_noise = 0.0
        # In training mode, the probability that each read slot's weight is zeroed, without
        # rescaling the rest (`SMFConfig.slot_dropout`); eval mode reads every slot.
        self.slot_dropout = 0.0

    def lookup(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, d) -> softmax weights (B*T, H*knn) and slot indices (B*T, H*knn); in
        training mode with `write_knn` set, write_knn slots per head instead of knn, and with
        `query_noise` σ > 0, each query element plus N(0, σ²) noise (σ in units of the normalised
        query's RMS, 1 with `query_norm`), and with `slot_dropout` p > 0, each weight zeroed with
        probability p (the others are not rescaled: a read then sums only part of its slots; the
        dropped slots are still in the indices, so SMF counts and ranks them, but they get no
        gradient from this read)."""
        c = self.config
        knn = self.write_knn if self.training and self.write_knn else c.knn
        q = self.query_norm(self.query(x - self.query_center).view(-1, c.heads, c.k_dim))  # (N, H, k_dim)
        if self.training and self.query_noise:
            q = q + self.query_noise * torch.randn_like(q)
        q = q.view(-1, c.heads, 2, c.k_dim // 2)  # (N, H, 2, k_dim/2)
        scores, indices = product_key_topk(q, self.keys, knn)  # (N, H, knn)
        weights = scores.float().softmax(dim=-1).to(x.dtype)
        if self.training and self.slot_dropout:
            weights = weights * (torch.rand(weights.shape, device=weights.device) >= self.slot_dropout)  # (float32 draw)
        return weights.flatten(1), indices.flatten(1)

    def forward(self, x: Tensor, values: ValueTable) -> Tensor:
        """x: (B, T, d) -> (B, T, d)."""
        weights, indices = self.lookup(x)
        if self.record:
            self.last_indices = indices.detach().view(*x.shape[:-1], -1)
        y = values.read(weights.to(values.weight.dtype), indices).to(x.dtype).view(*x.shape[:-1], -1)  # (B, T, v)
        if self.gate is not None:
            y = y * F.silu(self.gate(x))
        return self.out(y)


class MemoryBank(nn.Module):
    """All memory parameters of a model: `layers` keyed by decoder-layer index, and `values`,
    one table shared by every layer or one per layer. Attached to the model as `memory`."""

    def __init__(self, config: MemoryConfig, hidden_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        v_dim = config.v_dim or hidden_size
        n_tables = 1 if config.share_values else len(config.layers)
        value_dtype = dtype if config.value_dtype == "auto" else getattr(torch, config.value_dtype)
        shard = column_shard(v_dim) if config.shard_values else None  # None in one process
        self.values = nn.ModuleList(
            ValueTable(config.n_slots, v_dim, config.resolved_value_init, value_dtype, shard) for _ in range(n_tables)
        )
        self.layers = nn.ModuleDict(
            {str(i): ProductKeyMemory(config, hidden_size, dtype) for i in config.layers}
        )
        self.ledger = Ledger()  # what learn calls changed and froze; saved with the checkpoint

    def state_shapes(self) -> dict[str, torch.Size]:
        """The shapes of `state_dict()`'s tensors, found without gathering sharded tables."""
        shapes = {k: t.shape for k, t in [*self.named_parameters(), *self.named_buffers()]}
        for i, table in enumerate(self.values):
            shapes[f"values.{i}.weight"] = torch.Size((table.n_slots, table.v_dim))
        return shapes

    def table_index(self, layer: int) -> int:
        """The index in `values` (and in the ledger) of the value table decoder layer `layer` reads."""
        return 0 if self.config.share_values else self.config.layers.index(layer)

    def table_for(self, layer: int) -> ValueTable:
        return self.values[self.table_index(layer)]

    def check_write_knn(self, knn: int | None) -> None:
        """MemtuneError unless `knn` is None or between this memory's knn and n_keys."""
        if knn is not None and not self.config.knn <= knn <= self.config.n_keys:
            raise MemtuneError(f"write_knn={knn} is invalid: expected between the memory's knn "
                               f"({self.config.knn}) and n_keys ({self.config.n_keys})")

    def set_write_knn(self, knn: int | None) -> None:
        """Slots each head reads per token in training mode (None: the config's knn); see
        `ProductKeyMemory.write_knn`. MemtuneError if below knn or above n_keys."""
        self.check_write_knn(knn)
        for m in self.layers.values():
            m.write_knn = knn

    def set_query_noise(self, sigma: float) -> None:
        """Noise added to each normalised query element in training mode: N(0, sigma²), sigma in
        units of the query's RMS (see `ProductKeyMemory.lookup`); 0 reads the exact query.
        MemtuneError unless 0 <= sigma < inf."""
        check_query_noise(sigma)
        for m in self.layers.values():
            m.query_noise = float(sigma)

    def set_slot_dropout(self, p: float) -> None:
        """The probability that each read slot's weight is zeroed in training mode, the others
        not rescaled (see `ProductKeyMemory.lookup`); 0 reads every slot. MemtuneError unless
        0 <= p < 1."""
        check_slot_dropout(p)
        for m in self.layers.values():
            m.slot_dropout = float(p)

    def set_record(self, on: bool) -> None:
        for m in self.layers.values():
            m.record = on
            m.last_indices = None
