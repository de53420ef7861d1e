"""`memtune retrofit`, `memtune generate`, `memtune inspect`: models with memory layers."""

from __future__ import annotations

import argparse
import json
import logging

from memtune.commands import (
    add_dataclass_arguments,
    add_output_arguments,
    add_threads_argument,
    dataclass_kwargs,
    non_negative_int,
    positive_float,
    positive_int,
)
from memtune.config import CALIBRATIONS, MemoryConfig
from memtune.errors import MemtuneError

log = logging.getLogger("memtune")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrofit", help="add memory layers to a model and save them (memory weights only)")
    p.add_argument("--model", default="smollm2-135m", help="base model: alias, folder or HF id [default: smollm2-135m]")
    add_output_arguments(p, "output folder for the memory checkpoint")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed for the memory's initial weights [default: 0]")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    add_dataclass_arguments(p, MemoryConfig, exclude=("base_model", "hidden_size", "query_calibration"))
    # One name for one idea, as in `memtune learn`: --calibrate is how, the data is named apart.
    p.add_argument("--calibrate", "--calibration", dest="calibrate", choices=[*CALIBRATIONS, "none"], default=None,
                   help="calibrate the queries (lookups of similar inputs overlap less): per-dimension or full "
                        "whitening of the memory input, as --calibrate of learn [default: standardize with "
                        "--calibration-data, else none]")
    p.add_argument("--calibration-data", metavar="SOURCE", default=None,
                   help="the data to calibrate on (like the data to learn; QA is measured at the answer positions). "
                        "Same sources as --data of learn")
    p.add_argument("--calibration-batches", type=positive_int, default=100, help="batches of 8 examples [default: 100]")
    add_threads_argument(p)
    p.set_defaults(func=cmd_retrofit)

    p = sub.add_parser("generate", help="answer prompts with a base model or a saved memory model")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--model", default="smollm2-135m", help="alias, folder, HF id, or memory checkpoint")
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=0.7)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", action="store_true", help="print a JSON list of {prompt, answer}")
    add_threads_argument(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="architecture, memory layers, parameter counts and bytes")
    p.add_argument("--model", default="smollm2-135m", help="alias, folder, HF id, or memory checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)


def cmd_retrofit(args: argparse.Namespace) -> int:
    import torch

    from memtune.checkpoint import save_memory
    from memtune.io import check_output_free
    from memtune.models import load_base_model
    from memtune.retrofit import parameter_counts, retrofit

    config = MemoryConfig(**dataclass_kwargs(MemoryConfig, args), base_model=args.model)
    if args.calibration_batches <= 0:
        raise MemtuneError(f"--calibration-batches={args.calibration_batches} is invalid: expected a positive integer")
    mode = args.calibrate or ("standardize" if args.calibration_data else "none")
    if mode != "none" and not args.calibration_data:
        raise MemtuneError(f"--calibrate {mode} needs --calibration-data SOURCE: the data to calibrate on")
    check_output_free(args.out, args.overwrite)
    model, tokenizer = load_base_model(args.model, dtype=args.dtype)
    config.base_model = model.config.name_or_path  # a run folder's model/, local folders absolute
    torch.manual_seed(args.seed)
    retrofit(model, config)
    if mode != "none" and args.calibration_data:
        calibrate_on(model, tokenizer, args.calibration_data, mode, args.calibration_batches)
    save_memory(model, args.out, overwrite=args.overwrite)
    counts = parameter_counts(model)
    log.info(
        "memory at layers %s (%s mode): %d slots, %.1fM memory parameters (%.0f MB); saved to %s",
        config.layers, config.mode, config.n_slots, counts["memory"] / 1e6, counts["memory_bytes"] / 2**20, args.out,
    )
    return 0


def calibrate_on(model, tokenizer, source: str, mode: str, n_batches: int, batch_size: int = 8) -> None:
    """Calibrate the memory queries on the first `n_batches` batches of `source`."""
    from memtune.batches import first_batches
    from memtune.calibrate import calibrate_queries
    from memtune.runs import load_examples

    _, examples = load_examples(source, tokenizer, max_length=128)
    n, batches = first_batches(examples, tokenizer.pad_token_id, n_batches, batch_size)
    calibrate_queries(model, batches, mode, n_batches=n)


def cmd_generate(args: argparse.Namespace) -> int:
    from memtune.generation import generate
    from memtune.models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    answers = generate(
        model, tokenizer, args.prompts, max_new_tokens=args.max_new_tokens,
        chat=False if args.no_chat else None, do_sample=args.sample, temperature=args.temperature,
    )
    if args.json:
        print(json.dumps([{"prompt": p, "answer": a} for p, a in zip(args.prompts, answers)], indent=2))
    else:
        for p, a in zip(args.prompts, answers):
            print(f"> {p}\n{a}\n" if len(args.prompts) > 1 else a)
    return 0


def describe(model) -> dict:
    """A JSON-able summary of a model and its memory layers."""
    from memtune.retrofit import decoder_layers, get_memory_bank, parameter_counts

    layers = decoder_layers(model)
    info = {
        "architecture": type(model).__name__,
        "base_model": getattr(model.config, "name_or_path", None),
        "decoder_layers": len(layers),
        "hidden_size": model.config.hidden_size,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "parameters": parameter_counts(model),
        "memory": None,
    }
    bank = get_memory_bank(model)
    if bank is not None:
        c = bank.config
        info["memory"] = {
            **c.to_dict(),
            "n_slots": c.n_slots,
            "value_tables": len(bank.values),
            "slots_read_per_token": c.heads * c.knn,
            "learn_calls": bank.ledger.calls,
            "frozen_rows": sum(int(r.numel()) for r in bank.ledger.frozen.values()),
        }
    return info


def cmd_inspect(args: argparse.Namespace) -> int:
    from memtune.models import load_model

    model, _ = load_model(args.model)
    info = describe(model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["parameters"]
    print(f"architecture   {info['architecture']} ({info['base_model']}), {info['decoder_layers']} decoder layers, "
          f"hidden {info['hidden_size']}, {info['dtype']}")
    print(f"parameters     {p['total'] / 1e6:,.1f}M total ({p['total_bytes'] / 2**20:,.0f} MB): "
          f"base {p['base'] / 1e6:,.1f}M, memory {p['memory'] / 1e6:,.1f}M ({p['memory_bytes'] / 2**20:,.0f} MB)")
    m = info["memory"]
    if m is None:
        print("memory         none (run `memtune retrofit`)")
    else:
        print(f"memory         layers {m['layers']} ({m['mode']} mode), {m['n_slots']:,} slots "
              f"({m['n_keys']}²) in {m['value_tables']} value table(s) of dim {m['v_dim'] or m['hidden_size']}, "
              f"{m['heads']} heads × knn {m['knn']} = {m['slots_read_per_token']} slots read per token, k_dim {m['k_dim']}")
        calls = m["learn_calls"]
        print(f"learned        {len(calls)} learn call(s); {m['frozen_rows']:,} rows frozen for later calls")
        for c in calls:
            right = c.get("learned") or {}
            score = f", {right['right']}/{right['items']} right after" if right else ""
            print(f"  {c['call']:>3}. {c.get('time', '?')}  {c.get('data')}: {c.get('items')} {c.get('kind', 'items')} "
                  f"items, {c.get('steps')} steps{score}; {c['rows_updated']:,} rows updated, "
                  f"{c.get('rows_kept', 0):,} kept")
    return 0
