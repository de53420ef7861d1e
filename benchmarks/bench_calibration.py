"""How much do held-out facts read the slots SMF updates for learned facts — with and without
query calibration? Forward passes only; no training.

    .venv/bin/python benchmarks/bench_calibration.py            # SmolLM2-135M, 1M slots at 8,16,24
    .venv/bin/python benchmarks/bench_calibration.py --calibrations standardize --knn 4 --top-t 500

Packaged country facts, phrased as statements ("The capital of Chad is N'Djamena."), shuffled
(seed 0): N learned facts, 200 held-out facts, 800 background facts, disjoint. Slot reads count
at the answer positions. For each calibration the background statistics are recomputed, the
learned facts are grouped in batches of 10, and each batch's top-T slots by tfidf (what one SMF
step updates) are collected. Reported per memory layer: the share of the softmax read weight of
the learned facts and of the held-out facts that falls on those slots. Interference is the
held-out share; the ratio learned / held-out is how selectively SMF can write. Also: the
held-out facts' mean weight on the best of the knn slots of a head (1/knn if the softmax is flat).
"""

from __future__ import annotations

import argparse
import random

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="8,16,24")
    p.add_argument("--n-keys", type=int, default=1024)
    p.add_argument("--facts", type=int, default=100, help="learned facts")
    p.add_argument("--knn", type=int, default=32, help="slots read per head and token")
    p.add_argument("--top-t", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calibrations", default="none,standardize,whiten")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from memtune.batches import first_batches
    from memtune.calibrate import calibrate_queries
    from memtune.config import MemoryConfig
    from memtune.data import load_qa
    from memtune.experiment import StreamConfig, fact_examples
    from memtune.stats import background_stats
    from memtune.methods import SMFConfig, SparseMemoryFinetuning
    from memtune.models import load_base_model
    from memtune.retrofit import memory_ffns, retrofit
    from memtune.stats import StepUsage

    model, tok = load_base_model(args.model)
    torch.manual_seed(0)
    retrofit(model, MemoryConfig(layers=[int(x) for x in args.layers.split(",")], n_keys=args.n_keys,
                                 heads=4, knn=args.knn, k_dim=256))
    model.eval()
    bank = model.memory
    items = [q for q in load_qa("countries") if q.statement]
    random.Random(0).shuffle(items)
    n = args.facts
    cfg = StreamConfig(data="countries", target="statement", loss="answer", max_length=128)
    learn, held_out, background = (fact_examples(part, cfg, tok) for part in
                                   (items[:n], items[n : n + 200], items[n + 200 : n + 1000]))
    pad = tok.pad_token_id

    # The memory layers' inputs at the counted positions do not depend on the lookup (parallel
    # mode, zero values): record them once.
    names = {id(m): name for name, m in bank.layers.items()}
    inputs: dict[str, dict[str, list]] = {"learned": {}, "held-out": {}}
    current: dict = {}
    hooks = [w.register_forward_pre_hook(
        lambda _, a, name=names[id(w.memory)]: current["store"].setdefault(name, []).append(a[0][current["mask"]]))
        for w in memory_ffns(model)]
    with torch.no_grad():
        for part, examples in (("learned", learn), ("held-out", held_out)):
            current["store"] = inputs[part]
            for b in first_batches(examples, pad, len(examples), 16)[1]:
                current["mask"] = b["count_mask"]
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    for h in hooks:
        h.remove()
    inputs = {part: {k: torch.cat(v) for k, v in d.items()} for part, d in inputs.items()}

    original = {k: (m.query.weight.detach().clone(), m.query_center.clone()) for k, m in bank.layers.items()}
    print(f"# {args.model}, {args.n_keys ** 2:,} slots at layers {args.layers}; {n} learned facts in batches of 10, "
          f"top-T {args.top_t} per layer and step, knn {args.knn}; 200 held-out, 800 background facts")
    print("| calibration | layer | learned facts' read weight on updated slots | held-out facts' | ratio "
          "| held-out weight on the best slot |")
    print("|---|---:|---:|---:|---:|---:|")
    for calibration in args.calibrations.split(","):
        with torch.no_grad():
            for k, m in bank.layers.items():
                m.query.weight.copy_(original[k][0])
                m.query_center.copy_(original[k][1])
        if calibration != "none":
            calibrate_queries(model, first_batches(background, pad, 100, 8)[1], calibration, progress=False)
        stats = background_stats(model, background, pad, 100, 8, progress=False)
        smf = SparseMemoryFinetuning(SMFConfig("tfidf", args.top_t, "sgd", 1.0), stats)
        selected = {k: torch.zeros(bank.config.n_slots, dtype=torch.bool) for k in bank.layers}
        bank.set_record(True)
        with torch.no_grad():
            for b in first_batches(learn, pad, len(learn), 10)[1]:
                usage = StepUsage(bank)
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
                usage.add(b["count_mask"])
                for k, slots in smf.select(usage).items():
                    selected[k][slots] = True
        bank.set_record(False)
        for k, m in bank.layers.items():
            shares = []
            for part in ("learned", "held-out"):
                with torch.no_grad():
                    w, idx = m.lookup(inputs[part][k][None])
                shares.append(float((w * selected[k][idx]).sum() / w.sum()))
            best = float(w.view(len(w), m.config.heads, -1).max(-1).values.mean())
            print(f"| {calibration} | {k} | {shares[0]:.3f} | {shares[1]:.3f} | {shares[0] / shares[1]:.1f} "
                  f"| {best:.3f} |", flush=True)


if __name__ == "__main__":
    main()
