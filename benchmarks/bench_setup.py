"""Slot statistics (`memtune.stats.compute_background`) stopped at the deepest memory layer
(`forward_to_memory`, as query calibration and the slot analysis also run) against a whole
forward pass, on the same batches, in one process.

    .venv/bin/python benchmarks/bench_setup.py --threads 1       # SmolLM2-135M, the default memory

The memory is `memtune.recipe.default_memory_config` (layers 8 / 16 / 24 of 30 on SmolLM2-135M),
calibrated as the recipe does; the batches are the chat questions and answers of --facts packaged
country facts, 16 per batch, slot reads counted at every position. Each pass is timed --repeats
times, alternating; reported: the median seconds of each, their ratio, and whether the slot
statistics of the two are identical (they must be).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    import memtune.stats as stats
    from memtune.batches import encode_qa, first_batches
    from memtune.calibrate import calibrate_queries
    from memtune.data import load_qa
    from memtune.models import load_base_model
    from memtune.recipe import default_memory_config
    from memtune.retrofit import retrofit

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_base_model(args.model)
    retrofit(model, default_memory_config(model, args.model))
    examples = encode_qa(tok, [(q.question, q.answer) for q in load_qa("countries", limit=args.facts)])
    n, batches = first_batches(examples, tok.pad_token_id, len(examples), 16, "all")
    batches = list(batches)
    calibrate_queries(model, batches, n_batches=n, progress=False)

    def whole(model, **inputs):
        model(**inputs)

    def run(forward):
        stats.forward_to_memory = forward
        t = time.perf_counter()
        result = stats.compute_background(model, batches, n_batches=n, progress=False)
        return time.perf_counter() - t, result

    stop_at_memory = stats.forward_to_memory
    times = {"to_memory": [], "whole": []}
    results = {}
    try:
        for _ in range(args.repeats):
            for name, forward in (("to_memory", stop_at_memory), ("whole", whole)):
                seconds, results[name] = run(forward)
                times[name].append(seconds)
    finally:
        stats.forward_to_memory = stop_at_memory
    same = all(torch.equal(results["to_memory"].counts[k], results["whole"].counts[k]) for k in results["whole"].counts)
    a, b = statistics.median(times["to_memory"]), statistics.median(times["whole"])
    print(f"{args.model}: memory at layers {list(model.memory.layers)}, {n} batches of 16 ({len(examples)} examples), "
          f"{torch.get_num_threads()} thread(s)")
    print(f"slot statistics, stopped at the deepest memory layer: {a:.2f} s; whole forward: {b:.2f} s; "
          f"ratio {a / b:.2f}; identical statistics: {same}")
    if not same:
        raise SystemExit("the statistics differ: forward_to_memory must read what a whole pass reads")


if __name__ == "__main__":
    main()
