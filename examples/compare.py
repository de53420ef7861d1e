"""Print a before/after table from `memtune eval --predictions` results (used by demo.sh).

    python examples/compare.py BEFORE AFTER [--parts 10,10]

reads BEFORE.learned.json, BEFORE.known.json, AFTER.learned.json and AFTER.known.json; with
--parts the learned facts are consecutive parts of these sizes, one per learn call, each also
shown on its own.
"""

import argparse
import json


def load(prefix: str, name: str) -> dict:
    with open(f"{prefix}.{name}.json") as f:
        return json.load(f)["probes"]["qa"]


def cell(text: str, width: int = 100) -> str:
    """`text` as one Markdown table cell: one line, no column breaks, at most `width` characters
    (a longer text cut, ending in "…"; an answer is often named late in a sentence)."""
    text = " ".join(text.split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|")


def right(predictions: list[dict]) -> str:
    return f"{sum(p['correct'] for p in predictions) / len(predictions):.0%}" if predictions else "–"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--parts", default=None, help="sizes of the learn calls' parts, comma-separated")
    args = p.parse_args()
    b_qa, a_qa = load(args.before, "learned"), load(args.after, "learned")
    n = a_qa["n"]  # predictions on the paraphrases follow the first n
    sizes = [int(x) for x in args.parts.split(",")] if args.parts else [n]
    if sum(sizes) != n or min(sizes) <= 0:
        raise SystemExit(f"--parts {args.parts}: expected positive sizes adding up to the {n} learned facts")
    print("| answered right (contains) | before | after |\n|---|---|---|")
    start = 0
    for k, size in enumerate(sizes if len(sizes) > 1 else []):
        part = slice(start, start + size)
        start += size
        print(f"| facts of learn call {k + 1} (n={size}) | {right(b_qa['predictions'][part])} | "
              f"{right(a_qa['predictions'][part])} |")
    rows = [("learned facts", b_qa, a_qa), ("their paraphrases", b_qa["paraphrases"], a_qa["paraphrases"]),
            ("known facts, never trained", load(args.before, "known"), load(args.after, "known"))]
    for label, b, a in rows:
        if a is not None and b is not None:
            print(f"| {label} (n={a['n']}) | {b['contains']:.0%} | {a['contains']:.0%} |")
    print("\n| question | before | after |\n|---|---|---|")
    for b, a in zip(b_qa["predictions"][:n], a_qa["predictions"][:n]):
        mark = "✓" if a["correct"] else "✗"
        print(f"| {cell(a['question'])} | {cell(b['prediction'])} | {mark} {cell(a['prediction'])} |")


if __name__ == "__main__":
    main()
