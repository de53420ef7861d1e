"""One chunk of an experiment's stream, learned by one of its methods with settings changed:
how much is learned, and how many known facts are kept? The quick proxy for choosing settings
before a whole stream (a chunk takes ~10 min of training on one core, a stream of 4 over an hour).

    .venv/bin/python benchmarks/bench_one_chunk.py configs/headline.yaml --run smf --set top_t=500
    .venv/bin/python benchmarks/bench_one_chunk.py configs/headline.yaml --run smf --set optimizer=sgd --set lr=3e6
    .venv/bin/python benchmarks/bench_one_chunk.py configs/headline.yaml --set background.calibrate=whiten
    .venv/bin/python benchmarks/bench_one_chunk.py configs/headline.yaml --set memory.knn=8 --sweep top_t=500,1000,2000
    .venv/bin/python benchmarks/bench_one_chunk.py configs/headline.yaml --set protect=null --set top_t=500

The model, calibration and background statistics are made as `memtune experiment` makes them
(background statistics are kept in --out/background and reused by later calls with the same
config; `--sweep` learns the chunk once per value, with the background and the chunk's examples
made once). Prints one markdown table row per setting: settings, final loss, learned %, known
kept % — of all known facts and of the robust ones, those whose base answer has a margin of at
least --margin (nats between the greedy token and the runner-up, smallest over the tokens up to
the answer): known facts the base model answers by a near-tie flip under the smallest update.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
import yaml


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--run", default="smf", help="the config's run (method) to learn with")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a learn setting of the run (top_t=500) or, with a dotted or top-level key, the "
                   "config (background.calibrate=whiten, protect=null); repeatable")
    p.add_argument("--sweep", metavar="KEY=V1,V2,...", help="learn the chunk once per value of this learn setting")
    p.add_argument("--chunk", type=int, default=1, help="which chunk of the stream (1-based)")
    p.add_argument("--out", default="runs/bench_one_chunk", help="cache of background statistics")
    p.add_argument("--margin", type=float, default=0.1, help="robust known facts: base margin at least this")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from memtune.experiment import Experiment, ExperimentConfig, load_config, load_stream, training_examples
    from memtune.probes import Prober, qa_accuracy
    from memtune.probes.qa import answers_with_margins
    from memtune.train import train

    top_level = {f.name for f in dataclasses.fields(ExperimentConfig)}
    dotted = [a for a in args.set if "." in a.partition("=")[0] or a.partition("=")[0] in top_level]
    cfg, _ = load_config(args.config, dotted)
    run = next((r for r in cfg.runs if r.name == args.run), None)
    if run is None:
        p.error(f"--run {args.run!r} names no run of {args.config}: expected one of {', '.join(r.name for r in cfg.runs)}")
    fields = {f.name for f in dataclasses.fields(run.learn)}
    changes = {}
    for assignment in (a for a in args.set if a not in dotted):
        key, sep, value = assignment.partition("=")
        if not sep or key not in fields:
            p.error(f"--set {assignment!r} is invalid: expected KEY=VALUE with KEY a learn setting")
        changes[key] = yaml.safe_load(value)
    variants = [changes]
    if args.sweep:
        key, sep, values = args.sweep.partition("=")
        if not sep or key not in fields or not values:
            p.error(f"--sweep {args.sweep!r} is invalid: expected KEY=V1,V2,... with KEY a learn setting")
        variants = [changes | {key: yaml.safe_load(v)} for v in values.split(",")]
    exp = Experiment(cfg, args.out, progress=False)
    stream = load_stream(cfg.stream, cfg.seed)
    chunk = stream.chunks[args.chunk - 1]
    robust = None
    for change in variants:
        learn = dataclasses.replace(run.learn, **change)
        model, tok, method = exp.start(learn)  # a fresh model each time; background made once
        if robust is None:
            prober = Prober(cfg.probes, tok, stream.eval_choices, cfg.stream.augment)
            margins = answers_with_margins(model, tok, prober.known, cfg.probes.max_new_tokens, progress=False)
            robust = [m >= args.margin for _, m in margins]
            examples = training_examples(chunk, stream.kind, cfg.stream, tok, model)
        start = time.perf_counter()
        model, history = train(model, tok, examples, learn, method, progress=False)
        minutes = (time.perf_counter() - start) / 60
        learned = prober.learning(model, [chunk.questions])
        known = qa_accuracy(model, tok, prober.known, max_new_tokens=cfg.probes.max_new_tokens,
                            batch_size=cfg.probes.batch_size, paraphrases=False, predictions=True, progress=False)
        right = [p["correct"] for p in known["predictions"]]
        kept_robust = sum(r for r, ok in zip(right, robust) if ok) / max(sum(robust), 1)
        settings = ", ".join([*dotted, *(f"{k}={v}" for k, v in change.items())]) or "as configured"
        print(f"| {args.run}: {settings} | {history[-1]['loss']:.2f} | {100 * learned:.0f} % "
              f"({len(chunk.questions)}) | {100 * known['contains']:.1f} % ({len(right)}) | {100 * kept_robust:.1f} % "
              f"({sum(robust)}) | {minutes:.1f} min |")
        print(json.dumps({"run": args.run, "set": [*dotted, *(f"{k}={v}" for k, v in change.items())],
                          "learn": learn.to_dict(), "chunk": args.chunk, "final_loss": history[-1]["loss"],
                          "learned": learned, "known": known["contains"], "known_robust": kept_robust,
                          "robust": sum(robust), "margin": args.margin, "train_minutes": round(minutes, 1)}),
              flush=True)
        del model, method


if __name__ == "__main__":
    main()
