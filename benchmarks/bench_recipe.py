"""`memtune learn` with its defaults, on a domain, as a user runs it: learned facts, their
paraphrases and the same domain's known facts, before and after; optionally two calls.

    python benchmarks/domains.py --out runs/domains       # then `memtune facts` per domain (see there)
    python benchmarks/bench_recipe.py --domain runs/domains/states --facts 20 --known 20 --out runs/recipe/states
    python benchmarks/bench_recipe.py --domain runs/domains/states --set related=0 --out runs/recipe/states-norelated

A domain folder is the output of `memtune facts` (learn.jsonl: facts the model gets wrong,
known.jsonl: facts it answers right by a margin). `--set FIELD=VALUE` overrides a LearnConfig
or RecipeConfig field (the alternatives BENCHMARKS.md compares). `--calls 2` learns the facts
in two halves, the second call continuing the first's checkpoint (as `memtune learn --model
RUN/model` does). Prints and writes `summary.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domain", required=True)
    p.add_argument("--facts", type=int, default=20)
    p.add_argument("--known", type=int, default=40)
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch
    import yaml

    from memtune.commands import setup_logging
    from memtune.data import load_qa, save_jsonl
    from memtune.runs import LearnRun, run_learn
    from memtune.models import load_model
    from memtune.probes import qa_accuracy
    from memtune.recipe import RecipeConfig
    from memtune.train import LearnConfig

    torch.set_num_threads(args.threads)
    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    learn_items = load_qa(f"{args.domain}/learn.jsonl")
    known = load_qa(f"{args.domain}/known.jsonl")
    rng = random.Random(args.seed)
    rng.shuffle(learn_items)
    rng.shuffle(known)
    learn_items, known = learn_items[: args.facts], known[: args.known]
    overrides = {}
    for s in args.set:
        k, _, v = s.partition("=")
        overrides[k.replace("-", "_")] = yaml.safe_load(v)
    fields = {f.name for f in dataclasses.fields(LearnConfig)}
    config = {k: v for k, v in overrides.items() if k in fields}
    recipe = {k: v for k, v in overrides.items() if k not in fields}

    parts = [learn_items[round(i * len(learn_items) / args.calls): round((i + 1) * len(learn_items) / args.calls)]
             for i in range(args.calls)]
    model_name, runs, start = args.model, [], time.perf_counter()
    for i, part in enumerate(parts):
        data = out / f"facts{i + 1}.jsonl"
        save_jsonl([{"question": q.question, "answer": q.answer, "aliases": q.aliases} for q in part], data)
        run = out / f"call{i + 1}"
        results = run_learn(LearnRun(model=model_name, data=str(data), out=str(run), overwrite=True,
                                     config=LearnConfig(**config, seed=args.seed), recipe=RecipeConfig(**recipe)))
        runs.append(results)
        model_name = str(run / "model")
    seconds = time.perf_counter() - start

    summary = {"domain": args.domain, "facts": len(learn_items), "known": len(known), "calls": args.calls,
               "overrides": overrides, "seconds": round(seconds, 1),
               "steps": sum(r["steps"] for r in runs), "train_time_s": sum(r["train_time_s"] for r in runs),
               "setup_time_s": sum(r["setup_time_s"] for r in runs)}
    for label, name in (("base", args.model), ("after", model_name)):
        model, tok = load_model(name)
        learned = qa_accuracy(model, tok, learn_items, max_new_tokens=24, progress=False)
        kept = qa_accuracy(model, tok, known, max_new_tokens=24, paraphrases=False, progress=False)
        summary[label] = {"learned": learned["contains"],
                          "paraphrases": (learned["paraphrases"] or {}).get("contains"),
                          "known": kept["contains"]}
        if label == "after" and args.calls > 1:
            first = qa_accuracy(model, tok, parts[0], max_new_tokens=24, paraphrases=False, progress=False)
            summary[label]["first_call"] = first["contains"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
