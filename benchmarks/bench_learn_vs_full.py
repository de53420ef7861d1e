"""`memtune learn` with its defaults against `memtune learn --method full`, side by side in one
run: the same facts in the same calls, each call a `memtune learn` command exactly as a user
types it (the second continues the first's checkpoint), then learned facts, their paraphrases,
the domain's known facts and held-out perplexity for the base model and both results.

    python benchmarks/bench_learn_vs_full.py --domain runs/domains/elements --facts 200 --calls 2 \
        --out runs/learn-vs-full/elements

`--variant NAME ARGS` adds a run whose calls get further `memtune learn` arguments (a lever of
issue 17, say); the learned facts' paraphrases are never in the files learn sees, so they are
held out of every augmentation.

A domain folder is the output of `memtune facts` (learn.jsonl: facts the model gets wrong,
known.jsonl: facts it answers right by a margin). The only option either command gets besides
`--model/--data/--out` is `--threads` (and `--method full`): defaults only. Wall time is per
command, model loading included. Prints a Markdown table and writes `summary.json`. Run
again with the same --out, it reuses the calls that finished.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path


def learn_calls(method: str, parts: list[Path], out: Path, model: str, threads: int,
                extra: list[str] = ()) -> tuple[str, list[float]]:
    """Run one `memtune learn` per part, each continuing the previous, into `out/method`; returns
    the final model and the wall seconds per call. `method` is smf, full or the name of a
    variant whose `extra` arguments are added to each command."""
    finished, seconds = finished_calls(method, out, len(parts))  # in an earlier run of this script
    model = finished or model
    for i, data in enumerate(parts[len(seconds):], len(seconds) + 1):
        run = out / method / f"call{i}"
        cmd = [sys.executable, "-m", "memtune", "learn", "--model", model, "--data", str(data), "--out", str(run),
               "--threads", str(threads), "--overwrite", *(["--method", method] if method in ("full", "lora") else []),
               *extra]
        print("$", " ".join(cmd[2:]), flush=True)
        t = time.perf_counter()
        with open(out / f"{method}-call{i}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        seconds.append(round(time.perf_counter() - t, 1))
        (out / method / f"call{i}.seconds").write_text(f"{seconds[-1]}\n")
        print(f"  {seconds[-1]} s", flush=True)
        model = str(run / "model")
    return model, seconds


def finished_calls(method: str, out: Path, calls: int) -> tuple[str | None, list[float]]:
    """The model of the last call of `method` that finished in an earlier run, and the seconds of
    each finished call."""
    model, seconds = None, []
    for i in range(1, calls + 1):
        done = out / method / f"call{i}.seconds"
        if not (done.exists() and (out / method / f"call{i}" / "model").is_dir()):
            break
        model, seconds = str(out / method / f"call{i}" / "model"), [*seconds, float(done.read_text())]
    return model, seconds


def evaluate(name: str, parts, known, texts, max_new_tokens: int, paraphrases: bool = True) -> dict:
    from memtune.models import load_model
    from memtune.probes import ProbeConfig, Prober, perplexity

    model, tok = load_model(name)
    prober = Prober(ProbeConfig(max_new_tokens=max_new_tokens), tok)
    learned, per_call = prober.retention(model, parts)
    kept = prober.accuracy(model, known) or 0.0  # none asked: none kept
    return {"learned": learned, "per_call": per_call,
            "paraphrases": prober.paraphrases(model, [q for part in parts for q in part]) if paraphrases else None,
            "known": kept, "known_right": round(kept * len(known)),
            "perplexity": perplexity(model, tok, texts, progress=False)["perplexity"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domain", required=True)
    p.add_argument("--facts", type=int, default=200)
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--known", type=int, default=None, help="known facts asked (default: all)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="smf,full")
    p.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "ARGS"),
                   help='a further run NAME whose calls add ARGS to `memtune learn`, e.g. '
                        '--variant smf-wide "--write-knn 16" (repeatable; ARGS one quoted string with a space: '
                        '" --overwrite" for a lone flag)')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--eval-only", action="store_true",
                   help="learn nothing: evaluate each method's last call that finished in an earlier run")
    p.add_argument("--no-paraphrases", action="store_true", help="do not ask the learned facts' paraphrases")
    p.add_argument("--text-docs", type=int, default=None, help="held-out passages for perplexity (default: all)")
    args = p.parse_args()
    variants = {name: shlex.split(extra) for name, extra in args.variant}
    names = [*filter(None, args.methods.split(",")), *(name for name, _ in args.variant)]
    if len(set(names)) < len(names) or not names:
        p.error(f"run names must be distinct and at least one: {names} (a variant needs its own NAME)")

    import torch

    from memtune.data import load_qa, save_jsonl
    from memtune.data.prose import prose_documents

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items, known = load_qa(f"{args.domain}/learn.jsonl"), load_qa(f"{args.domain}/known.jsonl")
    rng = random.Random(args.seed)
    rng.shuffle(items)
    items, known = items[: args.facts], known[: args.known]
    chunks = [items[round(i * len(items) / args.calls): round((i + 1) * len(items) / args.calls)]
              for i in range(args.calls)]
    parts = []
    for i, chunk in enumerate(chunks, 1):  # only what a user's file would hold
        parts.append(out / f"facts{i}.jsonl")
        save_jsonl([{"question": q.question, "answer": q.answer} for q in chunk], parts[-1])
    texts = [d.text for d in prose_documents("heldout")][: args.text_docs]

    summary = {"domain": args.domain, "facts": len(items), "calls": args.calls, "known": len(known),
               "model": args.model, "threads": args.threads, "methods": {}}
    finals = {}
    for method in names:
        if args.eval_only:
            model, seconds = finished_calls(method, out, args.calls)
            if model is None:
                continue
            finals[method] = model
        else:
            finals[method], seconds = learn_calls(method, parts, out, args.model, args.threads,
                                                  variants.get(method, []))
        summary["methods"][method] = {"calls": len(seconds), "seconds": seconds, "total_s": round(sum(seconds), 1)}
        if method in variants:
            summary["methods"][method]["args"] = " ".join(variants[method])
    for name, model in [("base", args.model), *finals.items()]:
        print(f"evaluating {name}", flush=True)
        result = evaluate(model, chunks, known, texts, 24, paraphrases=not args.no_paraphrases)
        summary["methods"].setdefault(name, {}).update(result)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    base = summary["methods"]["base"]
    print(f"\n{summary['facts']} facts in {args.calls} calls, {len(known)} known; {args.domain}\n")
    print("| | learned | per call | paraphrases | known kept | known lost | perplexity Δ | wall time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in summary["methods"].items():
        lost = base["known_right"] - r["known_right"]
        ppl = 100 * (r["perplexity"] / base["perplexity"] - 1)
        para = "–" if r["paraphrases"] is None else f"{100 * r['paraphrases']:.1f} %"
        print(f"| {name} | {100 * r['learned']:.1f} % | {' / '.join(f'{100 * x:.0f}' for x in r['per_call'])} | "
              f"{para} | {100 * r['known']:.1f} % | {lost} | {ppl:+.2f} % | "
              f"{r.get('total_s', '–')} s |")
    if "smf" in finals and "full" in finals and len(summary["methods"]["smf"]["seconds"]) == len(
            summary["methods"]["full"]["seconds"]):
        ratio = summary["methods"]["smf"]["total_s"] / summary["methods"]["full"]["total_s"]
        summary["time_ratio_smf_over_full"] = round(ratio, 2)
        print(f"\nwall time, smf / full: {ratio:.2f}x")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
