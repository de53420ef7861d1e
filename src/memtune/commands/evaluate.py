"""`memtune facts` and `memtune eval`: what a model knows, what it learned, what it lost."""

from __future__ import annotations

import argparse
import json
import logging
import time

from memtune.commands import (
    add_threads_argument,
    non_negative_float,
    non_negative_int,
    positive_int,
)

log = logging.getLogger("memtune")

PROBES = ("qa", "perplexity", "drift", "choice", "answer-loss", "lm-eval")
# What each probe reads when neither --data nor its own option names a source.
DEFAULT_SOURCES = {"qa": "countries", "perplexity": "prose:heldout", "drift": "prose:heldout",
                   "choice": "hellaswag", "answer-loss": "gsm8k"}
# The per-probe option that overrides --data.
PROBE_OPTIONS = {"qa": "qa", "perplexity": "text", "drift": "text", "choice": "choices", "answer-loss": "answers"}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--batch-size", type=positive_int, default=32, help="questions (or windows) per batch [default: 32]")
    add_threads_argument(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("facts", help="ask a model every packaged question; split facts into learn.jsonl, known.jsonl and unsure.jsonl")
    p.add_argument("--model", default="smollm2-135m", help="alias, folder, HF id, memory checkpoint or adapter")
    p.add_argument("--out", required=True, help="output folder: learn.jsonl, known.jsonl, unsure.jsonl, summary.json")
    p.add_argument("--data", default="countries",
                   help="QA source: countries, countries:RELATION[,...], a file or a hub name [default: countries]")
    p.add_argument("--limit", type=non_negative_int, default=None, help="ask only the first N questions")
    p.add_argument("--max-new-tokens", type=positive_int, default=24, help="tokens generated per answer [default: 24]")
    p.add_argument("--min-margin", type=non_negative_float, default=None,
                   help="known only if answered right by at least this many nats over the runner-up token; right "
                   "answers by less go to unsure.jsonl (0 keeps every right answer) [default: 0.1]")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_common(p)
    p.set_defaults(func=cmd_facts)

    p = sub.add_parser(
        "eval", help="probe a model: qa, perplexity, drift, choice, answer-loss, lm-eval (JSON results)",
        description="Run probes on a base model, a memory checkpoint, a LoRA adapter or a full finetuned model. "
        "Results are printed as JSON and, with --out, written to a file.",
    )
    p.add_argument("--model", default="smollm2-135m", help="alias, folder, HF id, memory checkpoint or adapter")
    p.add_argument("--probe", action="append", required=True, metavar="NAME",
                   help=f"probe to run, repeatable or comma-separated: {', '.join(PROBES)}")
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="what the probes read, as --data of learn: a .jsonl/.csv/.parquet/.txt file, a packaged "
                   "source or a hub dataset (QA for qa and answer-loss, text for perplexity and drift, multiple "
                   "choice for choice); a per-probe option below overrides it")
    p.add_argument("--qa", default=None, metavar="SOURCE",
                   help=f"qa only: countries[:REL], a file, trivia_qa, nq_open, simpleqa, gsm8k, oasst1 "
                   f"[default: --data or {DEFAULT_SOURCES['qa']}]")
    p.add_argument("--text", default=None, metavar="SOURCE",
                   help=f"perplexity and drift only: a file, prose[:background|heldout], wikitext, oasst1 "
                   f"[default: --data or {DEFAULT_SOURCES['perplexity']}]")
    p.add_argument("--choices", default=None, metavar="SOURCE",
                   help=f"choice only: a file, hellaswag, medmcqa [default: --data or {DEFAULT_SOURCES['choice']}]")
    p.add_argument("--answers", default=None, metavar="SOURCE",
                   help=f"answer-loss only: a QA source [default: --data or {DEFAULT_SOURCES['answer-loss']}]")
    p.add_argument("--data-file", default=None,
                   help="local copy (.jsonl/.csv/.parquet, the dataset's own schema) of the hub dataset named "
                   "by --qa/--text/--choices/--answers")
    p.add_argument("--split", default=None, help="hub dataset split [default: the dataset's evaluation split]")
    p.add_argument("--limit", type=non_negative_int, default=None, help="use only the first N items of each source")
    p.add_argument("--base", default=None,
                   help="base model for drift (not needed for memory checkpoints or LoRA adapters)")
    p.add_argument("--no-paraphrases", action="store_true", help="qa: skip the paraphrased questions")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="qa: tokens generated per answer [default: 32]")
    p.add_argument("--max-length", type=positive_int, default=512, help="perplexity/drift window in tokens [default: 512]")
    p.add_argument("--stride", type=positive_int, default=256, help="perplexity window stride in tokens [default: 256]")
    p.add_argument("--tasks", default=None, help="lm-eval: comma-separated harness task names")
    p.add_argument("--include-path", default=None, help="lm-eval: folder of local task YAML files")
    p.add_argument("--predictions", action="store_true", help="qa: include every question's generated answer")
    p.add_argument("--out", default=None, help="also write the results JSON to this file")
    _add_common(p)
    p.set_defaults(func=cmd_eval)


def cmd_facts(args: argparse.Namespace) -> int:
    from memtune.facts import run_facts

    summary = run_facts(
        args.model, args.out, source=args.data, limit=args.limit, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, dtype=args.dtype, overwrite=args.overwrite,
        **({} if args.min_margin is None else {"min_margin": args.min_margin}),
    )
    print(json.dumps(summary, indent=2))
    return 0


def parse_probes(values: list[str]) -> list[str]:
    from memtune.errors import MemtuneError

    probes = [p.strip() for v in values for p in v.split(",") if p.strip()]
    for p in probes:
        if p not in PROBES:
            raise MemtuneError(f"unknown probe {p!r}: expected one of {', '.join(PROBES)}")
    return list(dict.fromkeys(probes))


def probe_sources(args: argparse.Namespace) -> dict[str, str]:
    """probe -> the source it reads: its own option, else --data, else its default."""
    return {probe: getattr(args, option) or args.data or DEFAULT_SOURCES[probe]
            for probe, option in PROBE_OPTIONS.items()}


def _data_file_for(args: argparse.Namespace, probes: list[str]) -> dict[str, str | None]:
    """Attach --data-file to the one hub source the chosen probes read."""
    from memtune.data import hub
    from memtune.errors import MemtuneError

    used = probe_sources(args)
    sources = {used[p] for p in probes if p in used}
    if args.data_file is None:
        return {s: None for s in sources}
    hub_sources = sorted(s for s in sources if hub.is_hub_name(s))
    if len(hub_sources) != 1:
        raise MemtuneError(
            f"--data-file {args.data_file!r} is ambiguous: it needs exactly one hub dataset among the probes' "
            f"sources, got {hub_sources or 'none'}"
        )
    return {s: (args.data_file if s == hub_sources[0] else None) for s in sources}


def cmd_eval(args: argparse.Namespace) -> int:
    from memtune import data, probes as P
    from memtune.probes.drift import require_base
    from memtune.errors import MemtuneError
    from memtune.io import write_json
    from memtune.models import load_model

    from memtune.io import check_output_file

    probes = parse_probes(args.probe)
    if args.out:
        check_output_file(args.out)
    files = _data_file_for(args, probes)
    src = probe_sources(args)
    kw = {"limit": args.limit, "split": args.split}
    # Load the data first: a missing dataset fails before minutes of model loading.
    loaded: dict[str, list] = {}
    if "qa" in probes:
        loaded["qa"] = data.load_qa(src["qa"], data_file=files[src["qa"]], **kw)
    if {"perplexity", "drift"} & set(probes):
        loaded["text"] = data.load_documents(src["perplexity"], data_file=files[src["perplexity"]], **kw)
    if "choice" in probes:
        loaded["choice"] = data.load_choices(src["choice"], data_file=files[src["choice"]], **kw)
    if "answer-loss" in probes:
        loaded["answer-loss"] = data.load_qa(src["answer-loss"], data_file=files[src["answer-loss"]], **kw)
    if "lm-eval" in probes and not args.tasks:
        raise MemtuneError("the lm-eval probe needs --tasks NAME[,NAME]")

    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    base = load_model(args.base, dtype=args.dtype)[0] if args.base and "drift" in probes else None
    if "drift" in probes:
        require_base(model, base)
    results: dict = {"model": args.model, "probes": {}, "seconds": {"load": round(time.perf_counter() - start, 1)}}
    for name in probes:
        log.info("probe %s on %s", name, args.model)
        t = time.perf_counter()
        if name == "qa":
            r = P.qa_accuracy(model, tokenizer, loaded["qa"], max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, paraphrases=not args.no_paraphrases,
                              predictions=args.predictions)
            r["source"] = src["qa"]
        elif name == "perplexity":
            r = P.perplexity(model, tokenizer, loaded["text"], max_length=args.max_length, stride=args.stride,
                             batch_size=max(1, args.batch_size // 8))
            r["source"] = src["perplexity"]
        elif name == "drift":
            r = P.drift(model, tokenizer, loaded["text"], base=base, max_length=args.max_length,
                        batch_size=max(1, args.batch_size // 8))
            r["source"] = src["perplexity"]
        elif name == "choice":
            r = P.choice_accuracy(model, tokenizer, loaded["choice"], batch_size=max(1, args.batch_size // 4))
            r["source"] = src["choice"]
        elif name == "answer-loss":
            r = P.answer_loss(model, tokenizer, loaded["answer-loss"], batch_size=max(1, args.batch_size // 4))
            r["source"] = src["answer-loss"]
        else:
            r = P.lm_eval(model, tokenizer, [t.strip() for t in args.tasks.split(",") if t.strip()],
                          include_path=args.include_path, limit=args.limit, batch_size=max(1, args.batch_size // 4))
        results["probes"][name] = r
        results["seconds"][name] = round(time.perf_counter() - t, 1)
        log.info("probe %s done in %.1f s", name, results["seconds"][name])
    if args.out:
        write_json(args.out, results)
    print(json.dumps(results, indent=2, default=str))
    return 0
