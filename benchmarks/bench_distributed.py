"""One memory layer and one SMF step at 1 and 2 processes on CPU (gloo): replicated table (data
parallel) and value table sharded by columns.

    .venv/bin/python benchmarks/bench_distributed.py              # 1M slots x 576, 8 x 64 tokens
    .venv/bin/python benchmarks/bench_distributed.py --n-keys 256 # a quick look

The global batch (B x T tokens) is the same in every configuration; each of N ranks takes B/N
sequences. A step = memory-layer forward + backward + slot counts summed over ranks + top-T
selection + (replicated only) the selected rows' gradients summed + sparse Adam on those rows.
Reported per rank: bytes of the value table and of its optimizer state after the last step,
median step time (one torch thread per process; the machine's 2 cores are shared, so time is
indicative), and bytes sent per step by this rank, counted by wrapping the torch.distributed
calls: all_reduce as a ring (2(N-1)/N of the buffer), all_gather as N-1 copies of the input,
all_to_all as everything not kept locally.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time


class _Traffic:
    """Counts the bytes this rank sends through torch.distributed, per collective kind."""

    def __init__(self):
        self.sent: dict[str, int] = {}

    def wrap(self, dist) -> None:
        n = dist.get_world_size()
        orig_reduce, orig_gather, orig_a2a = dist.all_reduce, dist.all_gather, dist.all_to_all_single

        def all_reduce(t, *a, **k):
            self._add("all_reduce", int(2 * (n - 1) / n * t.nbytes))
            return orig_reduce(t, *a, **k)

        def all_gather(out, t, *a, **k):
            self._add("all_gather", (n - 1) * t.nbytes)
            return orig_gather(out, t, *a, **k)

        def all_to_all_single(out, inp, output_split_sizes=None, input_split_sizes=None, *a, **k):
            mine = input_split_sizes[dist.get_rank()] if input_split_sizes else inp.numel() // n
            self._add("all_to_all", (inp.numel() - mine) * inp.element_size())
            return orig_a2a(out, inp, output_split_sizes, input_split_sizes, *a, **k)

        dist.all_reduce, dist.all_gather, dist.all_to_all_single = all_reduce, all_gather, all_to_all_single

    def _add(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + nbytes

    def total(self) -> int:
        return sum(self.sent.values())


def worker(rank: int, world: int, port: int, mode: str, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    from memtune import distributed
    from memtune.config import MemoryConfig
    from memtune.memory import MemoryBank
    from memtune.rankers import select_top
    from memtune.sparse_optim import SparseAdam
    from memtune.train import peak_rss_mb

    distributed.init_from_env()
    traffic = _Traffic()
    if world > 1:
        traffic.wrap(dist)
    d = args.hidden
    config = MemoryConfig(layers=[0], n_keys=args.n_keys, heads=4, knn=32, k_dim=256, shard_values=mode == "sharded",
                          hidden_size=d)
    torch.manual_seed(0)
    bank = MemoryBank(config, d)
    layer, table = bank.layers["0"], bank.values[0]
    layer.requires_grad_(False)
    layer.record = True
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, args.seq_len, d, generator=g)
    r = torch.randn(args.batch_size, args.seq_len, d, generator=g)
    share = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)
    x, r = x[share], r[share]
    optimizer = SparseAdam(lr=1.0)
    times, sent = [], []
    for _ in range(args.steps + 1):
        before = traffic.total()
        t0 = time.perf_counter()
        (layer(x, table) * r).sum().backward()
        slots, counts = torch.unique(layer.last_indices, return_counts=True)
        slots, counts = distributed.sum_counts({"0": (slots, counts)})["0"]
        rows = select_top(slots, counts.double(), args.top_t)
        distributed.reduce_row_grads(table, rows)
        optimizer.step(table.weight, rows)
        table.weight.grad = None
        times.append(time.perf_counter() - t0)
        sent.append(traffic.total() - before)
    state = optimizer.state[id(table.weight)]
    result = {
        "mode": mode, "world": world, "rank": rank, "slots": config.n_slots, "v_dim": d,
        "tokens_per_rank": x.shape[0] * x.shape[1],
        "table_mb": table.weight.nbytes / 2**20,
        "optimizer_state_mb": (state.exp_avg.nbytes + state.exp_avg_sq.nbytes + state.steps.nbytes
                               + state.rows.nbytes) / 2**20,
        "step_s": statistics.median(times[1:]), "sent_mb_per_step": statistics.median(sent[1:]) / 2**20,
        "sent_by_kind_mb_per_step": {k: v / 2**20 / (args.steps + 1) for k, v in traffic.sent.items()},
        "peak_rss_mb": peak_rss_mb(),
    }
    with open(f"{out}/{mode}-{world}-{rank}.json", "w") as f:
        json.dump(result, f)
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, world: int, args: argparse.Namespace) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(worker, args=(world, free_port(), mode, args, out), nprocs=world, start_method="spawn")
        return [json.load(open(f"{out}/{mode}-{world}-{r}.json")) for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-keys", type=int, default=1024, help="slots = n_keys² [default: 1024]")
    p.add_argument("--hidden", type=int, default=576, help="model and value size [default: 576, SmolLM2-135M]")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--top-t", type=int, default=2000)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print raw results as JSON lines")
    args = p.parse_args()
    results = run("replicated", 1, args) + run("replicated", 2, args) + run("sharded", 2, args)
    if args.json:
        for res in results:
            print(json.dumps(res))
    one = results[0]
    print(f"{one['slots']:,} slots x {one['v_dim']}, {args.batch_size} x {args.seq_len} tokens per step "
          f"(global), heads 4, knn 32, top-T {args.top_t}; per rank:")
    print(f"{'config':<22}{'rank':>5}{'table MB':>10}{'opt state MB':>14}{'table+state':>13}{'step s':>9}"
          f"{'sent MB/step':>14}{'peak RSS MB':>13}")
    for res in results:
        name = f"{res['mode']} x{res['world']}"
        both = res["table_mb"] + res["optimizer_state_mb"]
        print(f"{name:<22}{res['rank']:>5}{res['table_mb']:>10.1f}{res['optimizer_state_mb']:>14.1f}"
              f"{both / (one['table_mb'] + one['optimizer_state_mb']):>12.3f}x{res['step_s']:>9.3f}"
              f"{res['sent_mb_per_step']:>14.2f}{res['peak_rss_mb']:>13.0f}")
    for res in results[1:]:
        if res["rank"] == 0:
            print(f"  {res['mode']} x{res['world']}, rank 0 bytes by collective (MB per step): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in res["sent_by_kind_mb_per_step"].items()))


if __name__ == "__main__":
    main()
