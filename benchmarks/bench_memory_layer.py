"""One product-key memory layer vs the SwiGLU FFN it sits beside (issue #2).

    .venv/bin/python benchmarks/bench_memory_layer.py

Forward + backward of one memory layer (512 tokens, d=576, 4 heads, knn 32, k_dim 256, values
randomly initialised so every gradient flows) at 256², 1024² and 2048² slots, against
SmolLM2-135M's FFN (576 -> 1536 -> 576, LlamaMLP), and against the naive read with a dense table
gradient (`nn.EmbeddingBag(mode="sum", sparse=False)` with per_sample_weights).

Timing: the FFN is re-measured right before every memory-layer step, so each layer's ratio is
taken against FFN samples from the same moments (the machine is 2 shared cores); medians.

Memory: "bwd peak" is the peak of bytes live in PyTorch's CPU allocator during `backward()`,
relative to the start of backward, from the allocation/free events that `torch.profiler`
records with profile_memory=True (one extra step, not a timed one). It includes the table's
gradient (sparse: unique rows read; naive: dense n_slots × d) but not the table itself.
"grad" is the size of the table gradient that backward leaves behind. "RSS" is the growth of
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) during backward:
an OS-level cross-check that under-counts memory the allocator reuses.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from memtune.config import MemoryConfig
from memtune.memory import ProductKeyMemory, ValueTable, thp_mode
from memtune.train import peak_rss_mb, reset_peak_rss

MiB = 2**20


class NaiveMemory(nn.Module):
    """The same lookup, but values read with nn.EmbeddingBag and a dense gradient."""

    def __init__(self, layer: ProductKeyMemory, table: ValueTable):
        super().__init__()
        self.layer = layer
        self.bag = nn.EmbeddingBag(*table.weight.shape, mode="sum", sparse=False, _weight=table.weight.data)

    def forward(self, x: Tensor) -> Tensor:
        weights, indices = self.layer.lookup(x)
        y = self.bag(indices, per_sample_weights=weights).view(*x.shape[:-1], -1)
        if self.layer.gate is not None:
            y = y * F.silu(self.layer.gate(x))
        return self.layer.out(y)


def _step(fn: Callable[[Tensor], Tensor], params: list[nn.Parameter], x: Tensor, g: Tensor) -> tuple[float, float]:
    for p in params:
        p.grad = None
    x.grad = None
    t0 = time.perf_counter()
    y = fn(x)
    t1 = time.perf_counter()
    y.backward(g)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def _grad_bytes(params: list[nn.Parameter], table: nn.Parameter) -> int:
    g = table.grad
    if g is None:
        return 0
    if g.is_sparse:
        return g._values().nbytes + g._indices().nbytes
    return g.nbytes


def measure_memory(fn, params, table, x, g) -> dict[str, float]:
    """Peak allocator bytes during backward (profiler events) and VmHWM growth."""
    for p in params:
        p.grad = None
    x.grad = None
    gc.collect()
    y = fn(x)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y.backward(g)
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    grad = _grad_bytes(params, table)
    del y
    # OS view, on a second un-profiled backward.
    for p in params:
        p.grad = None
    y = fn(x)
    gc.collect()
    rss0 = _rss_kib()
    measured = reset_peak_rss()  # VmHWM := the current RSS
    y.backward(g)
    rss = (peak_rss_mb() * 1024 - rss0) * 1024 if measured else float("nan")
    for p in params:
        p.grad = None
    return {"peak": peak / MiB, "grad": grad / MiB, "rss": rss / MiB}


def bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    d = args.dim
    ffn = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=args.ffn_dim, hidden_act="silu"))
    ffn_params = list(ffn.parameters())
    x = torch.randn(1, args.tokens, d, requires_grad=True)
    g = torch.randn(1, args.tokens, d)

    rows: list[dict] = []
    ffn_f: list[float] = []
    ffn_b: list[float] = []
    for _ in range(args.warmup):
        _step(ffn, ffn_params, x, g)
    ffn_mem = measure_memory(ffn, ffn_params, ffn_params[0], x, g)

    variants = [("memtune (sparse)", nk) for nk in args.n_keys]
    variants += [("naive EmbeddingBag", nk) for nk in args.naive_n_keys]
    for name, nk in sorted(variants, key=lambda v: (v[1], v[0])):
        config = MemoryConfig(layers=[0], n_keys=nk, heads=args.heads, knn=args.knn, k_dim=args.k_dim)
        layer = ProductKeyMemory(config, d)
        table = ValueTable(config.n_slots, d, init="normal")
        if name.startswith("naive"):
            module = NaiveMemory(layer, table)
            fn = module
            params = list(layer.parameters()) + [module.bag.weight]
            table_param = module.bag.weight
        else:
            fn = lambda inp, layer=layer, table=table: layer(inp, table)
            params = list(layer.parameters()) + list(table.parameters())
            table_param = table.weight
        for _ in range(args.warmup):
            _step(fn, params, x, g)
        mf, mb, rf, rb = [], [], [], []
        for _ in range(args.repeats):
            a, b = _step(ffn, ffn_params, x, g)  # interleaved: the same machine state
            rf.append(a)
            rb.append(b)
            a, b = _step(fn, params, x, g)
            mf.append(a)
            mb.append(b)
        ffn_f += rf
        ffn_b += rb
        mem = measure_memory(fn, params, table_param, x, g)
        med = statistics.median
        ratio_f = [m / r for m, r in zip(mf, rf)]
        ratio_b = [m / r for m, r in zip(mb, rb)]
        ratio_t = [(m1 + m2) / (r1 + r2) for m1, m2, r1, r2 in zip(mf, mb, rf, rb)]
        rows.append({
            "name": name, "slots": config.n_slots, "n_keys": nk,
            "fwd": med(mf) * 1e3, "bwd": med(mb) * 1e3, "tot": med([a + b for a, b in zip(mf, mb)]) * 1e3,
            "rf": med(ratio_f), "rb": med(ratio_b), "rt": med(ratio_t), **mem,
            "table": table.weight.nbytes / MiB,
        })
        print(f"  done: {name} {nk}² ({len(mf)} repeats)", flush=True)
        del layer, table, fn, params, table_param
        if name.startswith("naive"):
            del module
        gc.collect()

    med = statistics.median
    print()
    print(f"tokens={args.tokens} d={d} heads={args.heads} knn={args.knn} k_dim={args.k_dim} "
          f"threads={args.threads} repeats={args.repeats} (medians; ratios = median of per-repeat ratios "
          f"against the FFN step run just before); transparent huge pages: {thp_mode()}")
    print()
    hdr = (f"| {'layer':<20} | {'slots':>9} | {'fwd ms':>7} | {'bwd ms':>7} | {'f+b ms':>7} | {'fwd/FFN':>7} "
           f"| {'bwd/FFN':>7} | {'f+b/FFN':>7} | {'bwd peak MiB':>12} | {'grad MiB':>8} | {'RSS MiB':>7} | {'table MiB':>9} |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    ff, fb = med(ffn_f) * 1e3, med(ffn_b) * 1e3
    ft = med([a + b for a, b in zip(ffn_f, ffn_b)]) * 1e3
    print(f"| {'SwiGLU FFN':<20} | {'-':>9} | {ff:7.1f} | {fb:7.1f} | {ft:7.1f} | {1:7.2f} | {1:7.2f} | {1:7.2f} "
          f"| {ffn_mem['peak']:12.1f} | {ffn_mem['grad']:8.1f} | {ffn_mem['rss']:7.1f} | {'-':>9} |")
    for r in rows:
        slots = f"{r['n_keys']}²"
        print(f"| {r['name']:<20} | {slots:>9} | {r['fwd']:7.1f} | {r['bwd']:7.1f} | {r['tot']:7.1f} | {r['rf']:7.2f} "
              f"| {r['rb']:7.2f} | {r['rt']:7.2f} | {r['peak']:12.1f} | {r['grad']:8.1f} | {r['rss']:7.1f} "
              f"| {r['table']:9.0f} |")
    print()

    ours = {r["n_keys"]: r for r in rows if r["name"].startswith("memtune")}
    naive = {r["n_keys"]: r for r in rows if r["name"].startswith("naive")}
    if 1024 in ours:
        print(f"target memory f+b <= 2x FFN at 1024²: {ours[1024]['rt']:.2f}x -> "
              f"{'met' if ours[1024]['rt'] <= 2 else 'NOT met'}")
    if 1024 in ours and 2048 in ours:
        # The two sizes run ~30 s apart; under a changing load their times drift apart, their
        # ratios to the FFN steps interleaved with them much less.
        r = ours[2048]["rt"] / ours[1024]["rt"]
        raw = ours[2048]["tot"] / ours[1024]["tot"]
        print(f"target 2048² <= 1.3x the cost of 1024²: {r:.2f}x (f+b/FFN ratios; raw medians {raw:.2f}x) -> "
              f"{'met' if r <= 1.3 else 'NOT met'}")
    if ours:
        peaks = ", ".join(f"{k}²: {v['peak']:.1f}" for k, v in sorted(ours.items()))
        print(f"bwd peak beyond the table (MiB) by slot count: {peaks}")
    for nk, r in sorted(naive.items()):
        if nk in ours:
            o = ours[nk]
            print(f"naive EmbeddingBag at {nk}²: {r['rf']:.1f}x FFN fwd, {r['rb']:.1f}x FFN bwd; ours is "
                  f"{r['fwd'] / o['fwd']:.1f}x faster fwd, {r['bwd'] / o['bwd']:.1f}x faster bwd, "
                  f"{r['tot'] / o['tot']:.1f}x faster f+b, bwd peak {r['peak'] / max(o['peak'], 1e-9):.0f}x smaller")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512, help="tokens per step (one sequence)")
    p.add_argument("--dim", type=int, default=576, help="hidden size = value size")
    p.add_argument("--ffn-dim", type=int, default=1536, help="FFN intermediate size")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--knn", type=int, default=32)
    p.add_argument("--k-dim", type=int, default=256)
    p.add_argument("--n-keys", type=int, nargs="+", default=[256, 1024, 2048],
                   help="half-key counts; slots = n_keys²")
    p.add_argument("--naive-n-keys", type=int, nargs="*", default=[256, 1024],
                   help="slot sizes for the naive dense-gradient baseline (2048² needs ~19 GiB)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    bench(p.parse_args())


if __name__ == "__main__":
    main()
