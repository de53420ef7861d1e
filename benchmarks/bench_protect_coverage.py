"""How much of what the model must keep do SMF's protected slots cover, and how much of what it
must learn do they lock away? Forward passes and greedy answers only, no training (~5 min).

    .venv/bin/python benchmarks/bench_protect_coverage.py configs/headline.yaml --out runs/headline
    .venv/bin/python benchmarks/bench_protect_coverage.py configs/headline.yaml --out runs/headline \\
        --extra facts/unsure.jsonl --extra facts/learn.jsonl

The model, calibration and protect statistics are those of `memtune experiment CONFIG --out OUT`
(made and kept there if missing). Per memory layer, of the reads at counted positions:
- *known covered*: the known-fact probe answered in the model's own words (every answer token),
  the share of reads on protected slots — what protection keeps exactly as it was;
- *stream locked*: the stream's facts as trained (positions whose loss counts, as SMF ranks
  them), the share on protected slots — reads whose rows SMF may not update.
`--extra SOURCE` adds the own-words reads of more questions (minus the probed and streamed ones)
to the protected set, one row per cumulative set: coverage against cost before a training run.
"""

from __future__ import annotations

import argparse

import torch


def read_share(reads, frozen: dict[str, torch.Tensor]) -> dict[str, float]:
    """layer -> share of `reads`' counted reads that fall on `frozen` slots."""
    return {k: float(reads.counts[k][frozen[k]].sum() / reads.counts[k].sum().clamp_min(1)) for k in reads.counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--out", required=True, help="the experiment's output folder (its kept statistics)")
    p.add_argument("--extra", action="append", default=[], metavar="SOURCE",
                   help="QA whose own-words reads also join the protected set (repeatable, cumulative)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from memtune.data import load_qa
    from memtune.experiment import Experiment, Source, load_config, load_stream, training_examples
    from memtune.stats import background_stats

    cfg, _ = load_config(args.config)
    if cfg.protect is None:
        p.error(f"{args.config} protects nothing: expected a top-level `protect: SOURCE`")
    exp = Experiment(cfg, args.out, progress=False)
    model, tokenizer = exp.load_memory_model()
    exp.calibrate(model, cfg.stream, tokenizer)
    protect = exp.protected(model, tokenizer)
    frozen = {k: df > 0 for k, df in protect.df.items()}

    known = [q.question for q in load_qa(cfg.probes.known.source, **cfg.probes.known.kwargs())]
    known_reads = exp.own_answer_stats(model, tokenizer, known)
    examples = [e for chunk in load_stream(cfg.stream, cfg.seed).chunks
                for e in training_examples(chunk, "facts", cfg.stream, tokenizer, model)]
    stream_reads = background_stats(model, examples, tokenizer.pad_token_id, len(examples), 10, progress=False)

    layers = sorted(frozen, key=int)
    print(f"| protected set | questions | {' | '.join(f'slots {k}' for k in layers)} | "
          f"{' | '.join(f'known covered {k}' for k in layers)} | {' | '.join(f'stream locked {k}' for k in layers)} |")
    print("|---|---:|" + "---:|" * 3 * len(layers))
    name, n = cfg.protect.source, protect.meta["questions"]
    for extra in [None, *args.extra]:
        if extra is not None:
            questions = exp.protect_questions(Source(extra))
            reads = exp.own_answer_stats(model, tokenizer, questions)
            frozen = {k: frozen[k] | (reads.df[k] > 0) for k in layers}
            name, n = f"{name} + {extra}", n + len(questions)
        covered, locked = read_share(known_reads, frozen), read_share(stream_reads, frozen)
        print(f"| {name} | {n} | {' | '.join(f'{int(frozen[k].sum()):,}' for k in layers)} | "
              f"{' | '.join(f'{100 * covered[k]:.1f} %' for k in layers)} | "
              f"{' | '.join(f'{100 * locked[k]:.1f} %' for k in layers)} |", flush=True)


if __name__ == "__main__":
    main()
