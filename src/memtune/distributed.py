"""Several processes: data-parallel learning over one torch.distributed process group.

`torchrun --nproc-per-node N -m memtune learn ...` starts N processes and sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address; `init_from_env` joins the group — gloo on CPU, nccl on
GPUs with the device cuda:LOCAL_RANK — so the same command runs on a laptop and a GPU node.
In a single process every function here is the identity, and nothing else in memtune changes.

Data parallelism, as the training loop uses it:
- each optimizer step's examples (batch_size x grad_accum, the *global* batch, so a config learns
  the same at any N) are split into contiguous shares, one per rank (`local_micro_batches`);
- the loss is normalised by the step's global loss-token count, so gradients *summed* over ranks
  equal the one-process gradient: dense methods (full, LoRA) sum them through DDP with a sum
  hook; SMF sums its slot counts (`sum_counts`, so every rank selects the same rows) and then
  only the selected rows' gradients (`reduce_row_grads`) — bytes per step are |S| x v, not
  n_slots x v, and every rank applies the same update to the same rows;
- only rank 0 writes the run folder (`main_process_dir`), logs and shows progress bars; a rank
  that fails exits non-zero with a one-line error, the others' next collective fails (gloo) or
  torchrun stops them (nccl), and rank 0's folder is never committed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)

T = TypeVar("T")


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """The rank that writes outputs, logs and progress bars (rank 0; the only one alone)."""
    return rank() == 0


def local_device() -> torch.device:
    """cuda:LOCAL_RANK when the group runs on GPUs (nccl), else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _stop_on_sigterm(signum, frame):
    # torchrun sends SIGTERM to the other ranks when one fails: unwind (temporary folders are
    # removed by their context managers) instead of dying mid-write.
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1); returns
    whether this process is one of several. Ranks other than 0 log warnings and errors only."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return active()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)
        _no_progress_bars()
    return True


def _no_progress_bars() -> None:
    """Every tqdm bar of this process (the library's and its dependencies') is disabled: only
    rank 0 shows progress. tqdm reads TQDM_DISABLE only when imported, hence the wrapper."""
    from tqdm import std

    init = std.tqdm.__init__

    def disabled(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    std.tqdm.__init__ = disabled


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def describe_rank() -> str:
    """'rank 1/2: ' in a group of several processes, else ''."""
    return f"rank {rank()}/{world_size()}: " if active() else ""


def describe_failure(e: BaseException) -> str:
    """One line for an exception on this rank; a collective broken by another rank's exit says so."""
    lines = str(e).strip().splitlines()
    first = f"{type(e).__name__}: {lines[0] if lines else ''}"
    peer_gone = isinstance(e, dist.DistError) or "closed by peer" in first or "Connection reset" in first
    return f"stopped because another rank failed ({first})" if peer_gone else first


# --- splitting a step's examples ------------------------------------------------------------


def local_micro_batches(chunk: Sequence[T], batch_size: int, stand_in: T | None = None) -> list[tuple[list[T], bool]]:
    """This rank's contiguous share of one optimizer step's examples, in micro-batches of at most
    `batch_size`: [(examples, real)]. Every rank gets the same number of micro-batches (collectives
    in forward and DDP's gradient sync need that); one with nothing to do gets `stand_in`
    (chunk[0] by default) with real=False, which the loop must weight by zero."""
    n, world, r = len(chunk), world_size(), rank()
    share = list(chunk[r * n // world : (r + 1) * n // world])
    largest = -(-n // world)
    n_micro = -(-largest // batch_size)
    out = [(share[m * batch_size : (m + 1) * batch_size], True) for m in range(n_micro)]
    filler = [stand_in if stand_in is not None else chunk[0]]
    return [(part, True) if part else (filler, False) for part, _ in out]


# --- collectives ---------------------------------------------------------------------------


def sum_over_ranks(*values: float) -> list[float]:
    """Scalars summed over ranks (float64): token counts and loss sums for logging."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=local_device())
    dist.all_reduce(t)
    return t.tolist()


def all_gather_rows(t: Tensor) -> tuple[Tensor, list[int]]:
    """Concatenation over ranks of tensors whose first dimension differs by rank: (rows of rank
    0, rows of rank 1, ...) and each rank's row count. Padded to the longest for the collective."""
    if not active():
        return t, [t.shape[0]]
    sizes = torch.zeros(world_size(), dtype=torch.long, device=t.device)
    sizes[rank()] = t.shape[0]
    dist.all_reduce(sizes)
    counts = sizes.tolist()
    return _gather_padded(t, counts), counts


def _gather_padded(t: Tensor, counts: list[int]) -> Tensor:
    longest = max(counts)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def sum_counts(counts: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-layer slot read counts (slots (U,) sorted, counts (U,)) summed over ranks: every rank
    gets the same sorted slots and counts, so every rank ranks and selects the same rows. Sparse:
    one gather of (layer, slot, count) triples, O(reads), never O(n_slots)."""
    if not active():
        return counts
    names = list(counts)
    triples = torch.cat([torch.stack([torch.full_like(s, i), s, c.to(s.dtype)], 1)
                         for i, (s, c) in enumerate(counts[n] for n in names)]) if names else torch.empty(0, 3, dtype=torch.long)
    everything, _ = all_gather_rows(triples.to(local_device()))
    everything = everything.cpu()
    out = {}
    for i, name in enumerate(names):
        mine = everything[everything[:, 0] == i]
        slots, inverse = torch.unique(mine[:, 1], return_inverse=True)
        out[name] = (slots, torch.zeros_like(slots).index_add_(0, inverse, mine[:, 2]))
    return out


@torch.no_grad()
def reduce_row_grads(table: nn.Module, rows: Tensor) -> None:
    """Sum over ranks the gradient of a value table's `rows` (sorted, the same on every rank):
    afterwards table.weight.grad is a sparse gradient holding exactly those rows, summed, on every
    rank. Rows a rank did not read contribute zeros. Bytes moved: |rows| x v. A column-sharded
    table needs nothing: its shard's gradient already covers every rank's tokens."""
    if not active() or getattr(table, "shard", None) is not None or rows.numel() == 0:
        return
    from memtune.sparse_optim import sparse_rows

    weight = table.weight
    buf = torch.zeros(rows.numel(), weight.shape[1], dtype=torch.float32, device=weight.device)
    if weight.grad is not None:
        ids, grads = sparse_rows(weight.grad, rows)
        buf[torch.searchsorted(rows, ids)] = grads.float()
    dist.all_reduce(buf)
    weight.grad = torch.sparse_coo_tensor(rows[None], buf.to(weight.dtype), weight.shape, is_coalesced=True,
                                          check_invariants=False)


def from_main(obj: T) -> T:
    """Rank 0's value of a small picklable object, on every rank: for decisions each rank makes
    from its own computation (e.g. which examples a pass still trains), which must not split."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_synced: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@torch.no_grad()
def sync_memory(model: nn.Module) -> None:
    """Copy rank 0's memory parameters and buffers to every rank, once per model, so that ranks
    that retrofitted or loaded without a common seed still read the same slots. Sharded tables
    are left alone (each rank holds other columns)."""
    if not active() or model in _synced:
        return
    bank = getattr(model, "memory", None)
    if bank is not None:
        for name, t in [*bank.named_parameters(), *bank.named_buffers()]:
            owner = bank.get_submodule(name.rsplit(".", 1)[0]) if "." in name else bank
            if getattr(owner, "shard", None) is None:
                dist.broadcast(t.data, src=0)
    _synced.add(model)


# --- dense methods: DDP -----------------------------------------------------------------------


def _allreduce_sum_hook(state, bucket):
    """DDP averages gradients by default; the loss is already normalised by the global token
    count, so the one-process gradient is the *sum* over ranks. (No annotations: DDP checks
    them, and postponed annotations are strings.)"""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


_wrapped: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def data_parallel(model: nn.Module) -> nn.Module:
    """The module to run forward through: DDP over `model` when several ranks train dense
    parameters (full finetuning, LoRA); `model` itself in one process or when the only trainable
    parameters are value tables (SMF reduces their sparse rows itself). One wrapper per model,
    so a stream of `train` calls keeps it."""
    if not active():
        return model
    dense = [n for n, p in model.named_parameters() if p.requires_grad and ".values." not in f".{n}"]
    if not dense:
        sync_memory(model)  # DDP would broadcast rank 0's parameters; SMF does it here
        return model
    ddp = _wrapped.get(model)
    if ddp is None:
        from torch.nn.parallel import DistributedDataParallel

        device = local_device()
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        ddp.register_comm_hook(None, _allreduce_sum_hook)
        _wrapped[model] = ddp
    return ddp


def sync_gradients(forward_model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Inside, a backward syncs DDP gradients only for the step's last micro-batch."""
    if last or not hasattr(forward_model, "no_sync"):
        return contextlib.nullcontext()
    return forward_model.no_sync()


def holds_shards(model: nn.Module) -> bool:
    """Whether `model` has a value table split over ranks (memtune.sharding): its reads and its
    state_dict are collectives, so every rank must run them."""
    return any(getattr(m, "shard", None) is not None for m in model.modules())


# Subcommands that run under torchrun; the others refuse, rather than write the same outputs N times.
COMMANDS = ("learn", "background")


def check_command(command: str) -> None:
    if active() and command not in COMMANDS:
        from memtune.errors import MemtuneError

        raise MemtuneError(f"`memtune {command}` runs in one process: under torchrun use one of {', '.join(COMMANDS)}")


# --- outputs -------------------------------------------------------------------------------


@contextlib.contextmanager
def main_process_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """`memtune.io.atomic_dir` on rank 0; on other ranks a private temporary folder that is
    thrown away, so the code inside runs unchanged on every rank (its collectives included).
    Rank 0 commits only after every rank has left the block without error."""
    from memtune.io import atomic_dir

    if not active():
        with atomic_dir(path, overwrite=overwrite) as tmp:
            yield tmp
        return
    if is_main():
        with atomic_dir(path, overwrite=overwrite) as tmp:
            yield tmp
            dist.barrier()  # a rank that failed never gets here: the barrier raises or torchrun stops us
    else:
        with tempfile.TemporaryDirectory(prefix="memtune-rank") as tmp:
            yield Path(tmp)
            dist.barrier()
