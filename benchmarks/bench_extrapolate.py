"""A learn call's update scaled by several factors (`--extrapolate`, without the facts learned
again after it), on a run that `memtune learn` made in one call on a base model: its learned
facts, their held-out paraphrases and known facts, asked as `memtune eval --probe qa` asks them.

    .venv/bin/python benchmarks/bench_extrapolate.py --model runs/levers13/states-smf/smf/call1/model \\
        --facts facts.jsonl --known runs/domains/states/known.jsonl --factors 1,1.25,1.5 --threads 1

`--facts` holds the learned facts with their paraphrases (a `learn.jsonl` of `memtune facts`, or
the lines of it that were learned); `--known` the first --limit facts are asked. A fresh memory's
rows were zero before the call, so a factor F sets each row the call updated (the ledger's) to F
times its value; every other row is zero or frozen and is left as it is. Reported per factor:
the share right of the learned facts, of their paraphrases and of the known facts.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the memory checkpoint of a one-call learn run")
    parser.add_argument("--facts", required=True)
    parser.add_argument("--known", required=True)
    parser.add_argument("--limit", type=int, default=50, help="known facts asked")
    parser.add_argument("--factors", default="1,1.25,1.5")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from memtune.data import load_qa
    from memtune.models import load_model
    from memtune.probes.qa import qa_accuracy
    from memtune.retrofit import get_memory_bank

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    bank = get_memory_bank(model)
    if bank is None or len(bank.ledger.calls) != 1:
        raise SystemExit(f"{args.model}: expected the memory checkpoint of one learn call on a base model")
    facts, known = load_qa(args.facts), load_qa(args.known)[: args.limit]
    tables = [(table.weight, bank.ledger.learned[0][t]) for t, table in enumerate(bank.values) if t in bank.ledger.learned[0]]
    written = [weight[rows].clone() for weight, rows in tables]
    for factor in (float(f) for f in args.factors.split(",")):
        with torch.no_grad():
            for (weight, rows), values in zip(tables, written):
                weight[rows] = factor * values
        learned = qa_accuracy(model, tokenizer, facts, batch_size=32, paraphrases=True, progress=False)
        kept = qa_accuracy(model, tokenizer, known, batch_size=32, paraphrases=False, progress=False)
        print(json.dumps({"factor": factor, "learned": learned["contains"],
                          "paraphrases": learned["paraphrases"]["contains"], "known": kept["contains"],
                          "known_right": round(kept["contains"] * len(known)), "known_asked": len(known)}), flush=True)


if __name__ == "__main__":
    main()
