"""`memtune background` and `memtune learn`."""

from __future__ import annotations

import argparse

from memtune.commands import (
    add_data_arguments,
    add_dataclass_arguments,
    add_output_arguments,
    add_threads_argument,
    dataclass_kwargs,
    positive_int,
)
from memtune.recipe import RECIPE_SMF_ONLY, RecipeConfig
from memtune.train import SMF_ONLY, LearnConfig, check_options

DATA_HELP = ("a .jsonl file of {question, answer} or {text}, a .txt file, a Hugging Face dataset name, "
             "or a built-in source: countries, prose, prose:background")



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("background", help="record how often general text reads each memory slot (for SMF rankers)")
    p.add_argument("--model", required=True, help="a memory checkpoint (from retrofit, heal or learn)")
    add_data_arguments(p, f"background text: {DATA_HELP}", default="prose:background", limit=False)
    p.add_argument("--batches", type=positive_int, default=200, help="number of background batches N [default: 200]")
    p.add_argument("--batch-size", type=positive_int, default=8, help="[default: 8]")
    p.add_argument("--max-length", type=positive_int, default=128, help="tokens per sequence [default: 128]")
    p.add_argument("--count-positions", default="loss", choices=["loss", "all"],
                   help="positions whose reads count; use the same as for learn [default: loss]")
    add_output_arguments(p, "output folder")
    add_threads_argument(p)
    p.set_defaults(func=cmd_background)

    p = sub.add_parser("learn", help="learn new facts or documents (SMF with the recipe, or the baselines full / lora)")
    p.add_argument("--model", required=True,
                   help="a base model (alias, folder or HF id: smf retrofits it) or, for smf, a memory checkpoint or "
                   "run folder to continue")
    add_data_arguments(p, DATA_HELP)
    add_output_arguments(p, "run folder to create")
    add_dataclass_arguments(p, LearnConfig)
    add_dataclass_arguments(p, RecipeConfig)
    add_threads_argument(p)
    p.set_defaults(func=cmd_learn)


def cmd_background(args: argparse.Namespace) -> int:
    from memtune.runs import run_background

    run_background(args.model, args.data, args.out, n_batches=args.batches, batch_size=args.batch_size,
                   max_length=args.max_length, kind=args.format, count_positions=args.count_positions,
                   overwrite=args.overwrite)
    return 0


def cmd_learn(args: argparse.Namespace) -> int:
    from memtune.runs import LearnRun, run_learn

    given = {**dataclass_kwargs(LearnConfig, args), **dataclass_kwargs(RecipeConfig, args)}
    check_options(given.get("method", "smf"), given, SMF_ONLY + RECIPE_SMF_ONLY)
    config = LearnConfig(**dataclass_kwargs(LearnConfig, args))
    recipe = RecipeConfig(**dataclass_kwargs(RecipeConfig, args))
    run_learn(LearnRun(model=args.model, data=args.data, out=args.out, config=config, recipe=recipe,
                       format=args.format, limit=args.limit, overwrite=args.overwrite))
    return 0
