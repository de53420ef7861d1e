"""Print a before/after table from `memtune eval --predictions` results (used by demo.sh).

    python examples/compare.py BEFORE AFTER

reads BEFORE.learned.json, BEFORE.known.json, AFTER.learned.json and AFTER.known.json.
"""

import json
import sys


def load(prefix: str, name: str) -> dict:
    with open(f"{prefix}.{name}.json") as f:
        return json.load(f)["probes"]["qa"]


def main(before: str, after: str) -> None:
    rows = [("learned facts", "learned", None), ("their paraphrases", "learned", "paraphrases"),
            ("known facts", "known", None)]
    print("| answered right (contains) | before | after |\n|---|---|---|")
    for label, name, sub in rows:
        b, a = load(before, name), load(after, name)
        if sub:
            b, a = b[sub], a[sub]
        print(f"| {label} (n={a['n']}) | {b['contains']:.0%} | {a['contains']:.0%} |")
    print("\n| question | before | after |\n|---|---|---|")
    b_qa, a_qa = load(before, "learned"), load(after, "learned")
    n = a_qa["n"]  # predictions on the paraphrases follow the first n
    for b, a in zip(b_qa["predictions"][:n], a_qa["predictions"][:n]):
        mark = "✓" if a["correct"] else "✗"
        print(f"| {a['question']} | {b['prediction'][:60]} | {mark} {a['prediction'][:60]} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
