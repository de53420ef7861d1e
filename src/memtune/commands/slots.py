"""`memtune slots`: which memory slots facts read at the answer, and how much their phrasings share."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from memtune.commands import add_output_arguments, add_threads_argument, non_negative_int, positive_int
from memtune.errors import MemtuneError
from memtune.targets import LOSSES, TARGETS

log = logging.getLogger("memtune")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slots", help="slots read at the answer per fact and phrasing: overlap of paraphrases, hubs "
                                     "(slots.json, slots.png)")
    p.add_argument("--model", required=True, help="a memory model: checkpoint of retrofit, heal or learn, or a run folder")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="facts: a .jsonl of {question, answer[, paraphrases, statement]}, countries[:REL] or a hub QA dataset")
    p.add_argument("--known", default=None, metavar="SOURCE",
                   help="a second set of facts (known or protected ones, e.g. known.jsonl of `memtune facts`): "
                   "the share of --data's reads that land in slots these read")
    p.add_argument("--limit", type=non_negative_int, default=None, help="use the first N facts of each source")
    add_output_arguments(p, "output folder: slots.json and slots.png")
    p.add_argument("--target", choices=TARGETS, default="statement",
                   help="what follows the question, as learn trains it: the statement when the fact has one, else "
                   "the answer; or always the answer [default: statement]")
    p.add_argument("--loss", choices=LOSSES, default="target",
                   help="which target tokens are answer positions, as --loss of learn [default: target]")
    p.add_argument("--pairs", type=positive_int, default=1000,
                   help="unrelated fact pairs sampled for the baseline overlap [default: 1000]")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the pair sample [default: 0]")
    p.add_argument("--batch-size", type=positive_int, default=16, help="[default: 16]")
    p.add_argument("--max-length", type=positive_int, default=256, help="tokens per example [default: 256]")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    add_threads_argument(p)
    p.set_defaults(func=cmd_slots)


def cmd_slots(args: argparse.Namespace) -> int:
    from memtune.data import load_qa
    from memtune.io import atomic_dir, check_output_free
    from memtune.models import load_model
    from memtune.retrofit import get_memory_bank
    from memtune.slot_access import plot_slot_access, slot_access

    check_output_free(args.out, args.overwrite)
    items = load_qa(args.data, limit=args.limit)
    if not items:
        raise MemtuneError(f"--data {args.data!r} holds no facts")
    known = load_qa(args.known, limit=args.limit) if args.known else None
    if known is not None and not known:
        raise MemtuneError(f"--known {args.known!r} holds no facts")
    if not any(q.paraphrases for q in items):
        log.warning("%s has no paraphrases: phrasing overlap is not measured (slots per fact and hubs are); "
                    'give facts a "paraphrases" list to measure it', args.data)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    bank = get_memory_bank(model)
    if bank is None:
        run_config = Path(args.model) / "config.json"
        method = json.loads(run_config.read_text()).get("learn", {}).get("method") if run_config.is_file() else None
        if method in ("full", "lora"):
            raise MemtuneError(f"{args.model!r} is a run of --method {method}: it has no memory layers to analyse "
                               "(pass the run folder of an SMF learn)")
        raise MemtuneError(f"{args.model!r} has no memory layers: pass a memory model — `memtune retrofit --model "
                           f"{args.model} --out DIR` makes one — or the run folder of `memtune learn` (its model/)")
    summary = slot_access(model, tokenizer, items, known, target=args.target, loss=args.loss, n_pairs=args.pairs,
                          seed=args.seed, batch_size=args.batch_size, max_length=args.max_length)
    c = bank.config
    summary = {"model": args.model, "data": args.data, "known": args.known,
               "memory": {"layers": c.layers, "n_slots": c.n_slots, "heads": c.heads, "knn": c.knn}, **summary}
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        (tmp / "slots.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_slot_access(summary, tmp / "slots.png")
    for name, s in summary["layers"].items():
        ph, un = s["phrasing"] or {}, s["unrelated"] or {}
        log.info("layer %s: %.1f slots per fact; phrasings share %s of reads (Jaccard %s), unrelated facts %s (%s); "
                 "hub share %.3f", name, s["slots_per_fact"], _f(ph.get("share")), _f(ph.get("jaccard")),
                 _f(un.get("share")), _f(un.get("jaccard")), s["hub_share"])
        if "written" in s:
            log.info("layer %s: reads in the %d rows learn calls wrote: questions %s, paraphrases %s", name,
                     s["written"]["rows"], _f(s["written"]["question"]), _f(s["written"]["paraphrases"]))
    log.info("wrote %s/slots.json and slots.png", args.out)
    return 0


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
