"""`memtune heal`: train a retrofitted model's memory on general text so it recovers."""

from __future__ import annotations

import argparse

from memtune.commands import (
    add_data_arguments,
    add_dataclass_arguments,
    add_output_arguments,
    add_threads_argument,
    dataclass_kwargs,
)
from memtune.heal import HealConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heal", help="train the memory parameters (base frozen) so a retrofitted model recovers")
    p.add_argument("--model", required=True, help="a memory checkpoint (from retrofit), typically replace mode")
    add_data_arguments(p, "general text or instruction data: a .jsonl/.txt file, a Hugging Face dataset name "
                          "(wikitext, oasst1 ...), or prose:background", default="prose:background")
    add_output_arguments(p, "run folder to create")
    add_dataclass_arguments(p, HealConfig)
    add_threads_argument(p)
    p.set_defaults(func=cmd_heal)


def cmd_heal(args: argparse.Namespace) -> int:
    from memtune.heal import HealRun, run_heal

    config = HealConfig(**dataclass_kwargs(HealConfig, args))
    run_heal(HealRun(model=args.model, out=args.out, config=config, data=args.data, format=args.format,
                     limit=args.limit, overwrite=args.overwrite))
    return 0
