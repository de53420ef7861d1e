"""Print a before/after table from `memtune eval --predictions` results (used by demo.sh).

    python examples/compare.py BEFORE AFTER [--calls K]

reads BEFORE.learned.json, BEFORE.known.json, AFTER.learned.json and AFTER.known.json; with
--calls K the learned facts are K equal consecutive parts, one per learn call, each also shown
on its own.
"""

import argparse
import json


def load(prefix: str, name: str) -> dict:
    with open(f"{prefix}.{name}.json") as f:
        return json.load(f)["probes"]["qa"]


def right(predictions: list[dict]) -> str:
    return f"{sum(p['correct'] for p in predictions) / len(predictions):.0%}" if predictions else "–"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--calls", type=int, default=1)
    args = p.parse_args()
    b_qa, a_qa = load(args.before, "learned"), load(args.after, "learned")
    n = a_qa["n"]  # predictions on the paraphrases follow the first n
    print("| answered right (contains) | before | after |\n|---|---|---|")
    size = n // args.calls
    for k in range(args.calls if args.calls > 1 else 0):
        part = slice(k * size, (k + 1) * size if k + 1 < args.calls else n)
        print(f"| facts of learn call {k + 1} (n={len(range(n)[part])}) | {right(b_qa['predictions'][part])} | "
              f"{right(a_qa['predictions'][part])} |")
    rows = [("learned facts", b_qa, a_qa), ("their paraphrases", b_qa["paraphrases"], a_qa["paraphrases"]),
            ("known facts, never trained", load(args.before, "known"), load(args.after, "known"))]
    for label, b, a in rows:
        print(f"| {label} (n={a['n']}) | {b['contains']:.0%} | {a['contains']:.0%} |")
    print("\n| question | before | after |\n|---|---|---|")
    for b, a in zip(b_qa["predictions"][:n], a_qa["predictions"][:n]):
        mark = "✓" if a["correct"] else "✗"
        print(f"| {a['question']} | {b['prediction'][:60]} | {mark} {a['prediction'][:60]} |")


if __name__ == "__main__":
    main()
