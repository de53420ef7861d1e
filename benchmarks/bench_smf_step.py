"""One SMF training step versus one full-finetuning step (AdamW) on the same batch.

    .venv/bin/python benchmarks/bench_smf_step.py            # SmolLM2-135M, 8 x 64 tokens

Each configuration runs in its own subprocess so that its peak RSS is its own. Reported:
median step time over --steps steps (after one warm-up step), peak RSS of the process, and the
ratios SMF / full and SMF(1M slots) / SMF(64K slots), all from this one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def run_one(kind: str, n_keys: int, args: argparse.Namespace) -> dict:
    import torch

    from memtune.batches import collate, encode_documents, n_loss_tokens, token_loss_sum
    from memtune.config import MemoryConfig
    from memtune.data import load_documents
    from memtune.methods import FullFinetuning, SMFConfig, SparseMemoryFinetuning
    from memtune.models import load_base_model
    from memtune.retrofit import retrofit
    from memtune.stats import StepUsage
    from memtune.train import peak_rss_mb

    torch.manual_seed(0)
    model, tok = load_base_model(args.model)
    texts = [d.text for d in load_documents("prose:background", limit=200)]
    examples = [e for e in encode_documents(tok, texts, args.seq_len) if len(e.input_ids) == args.seq_len]
    batch = collate(examples[: args.batch_size], tok.pad_token_id, "all")
    if kind == "smf":
        retrofit(model, MemoryConfig(layers=[int(x) for x in args.layers.split(",")], n_keys=n_keys,
                                     heads=4, knn=32, k_dim=256, value_dtype=args.value_dtype))
        method = SparseMemoryFinetuning(SMFConfig("count", args.top_t, "adam", 0.1))
    else:
        method = FullFinetuning(2e-5)
    model = method.prepare(model)
    model.train()
    bank = getattr(method, "bank", None)
    n_tokens = n_loss_tokens(batch["labels"])
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        usage = StepUsage(bank) if bank is not None else None
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        (token_loss_sum(out.logits, batch["labels"]) / n_tokens).backward()
        if usage is not None:
            usage.add(batch["count_mask"])
        method.step(usage)
        times.append(time.perf_counter() - t0)
    return {"kind": kind, "n_keys": n_keys, "slots": n_keys**2 if kind == "smf" else 0,
            "step_s": statistics.median(times[1:]), "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="8,16,24")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top-t", type=int, default=500)
    p.add_argument("--value-dtype", default="auto", help="value table dtype: auto (float32), bfloat16")
    p.add_argument("--slots", default="256,1024", help="n_keys values for SMF (slots = n_keys²)")
    p.add_argument("--child", nargs=2, metavar=("KIND", "N_KEYS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]), args)))
        return
    configs = [("full", 0)] + [("smf", int(n)) for n in args.slots.split(",")]
    rows = []
    for kind, n_keys in configs:
        cmd = [sys.executable, __file__, "--child", kind, str(n_keys), *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{kind:5s} slots={r['slots']:>9,d}  step {r['step_s']:.3f} s  peak RSS {r['peak_rss_mb']:,.0f} MB", flush=True)
    full = rows[0]
    smf = {r["n_keys"]: r for r in rows[1:]}
    big, small = max(smf), min(smf)
    print(f"\nbatch {args.batch_size} x {args.seq_len} tokens, memory at layers {args.layers}, top-T {args.top_t}")
    print(f"SMF ({big**2:,} slots) / full step time: {smf[big]['step_s'] / full['step_s']:.2f}  (target <= 0.5)")
    print(f"SMF ({big**2:,} slots) / full peak RSS:  {smf[big]['peak_rss_mb'] / full['peak_rss_mb']:.2f}  (target < 1)")
    print(f"SMF step time {big**2:,} / {small**2:,} slots: {smf[big]['step_s'] / smf[small]['step_s']:.2f}  (target ~1, flat)")


if __name__ == "__main__":
    main()
