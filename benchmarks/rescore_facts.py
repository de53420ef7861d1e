"""Rescore the generations a `memtune facts` folder kept with today's answer scoring
(`memtune.probes.is_correct`) and today's packaged answers and aliases, and count the facts whose
label (learn / known / unsure) changes. No model is run: the margins are the saved ones.

    memtune facts --model smollm2-135m --out FACTS --threads 1     # once, ~15-30 min on 2 cores
    .venv/bin/python benchmarks/rescore_facts.py FACTS [--show 20]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from memtune.data.countries import country_facts
from memtune.facts import MIN_MARGIN
from memtune.probes import is_correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("facts", help="a folder written by `memtune facts`")
    parser.add_argument("--show", type=int, default=20, help="changed facts to print [default: 20]")
    args = parser.parse_args()
    folder = Path(args.facts)
    margin = json.loads((folder / "summary.json").read_text()).get("min_margin", MIN_MARGIN)
    packaged = {q.id: q for q in country_facts()}
    changed, by_relation, totals = collections.Counter(), collections.Counter(), collections.Counter()
    shown = []
    n = 0
    for part in ("learn", "known", "unsure"):
        for line in (folder / f"{part}.jsonl").read_text().splitlines():
            row = json.loads(line)
            n += 1
            item = packaged.get(row.get("id"))
            answers = item.answers if item else [row["answer"], *row.get("aliases", [])]
            right = is_correct(row["prediction"], answers, row["question"])
            now = "learn" if not right else "known" if row["margin"] >= margin else "unsure"
            totals[now] += 1
            if now != part:
                changed[f"{part} -> {now}"] += 1
                by_relation[(row.get("id") or "").rsplit("/", 1)[-1]] += 1
                shown.append(f"{part:>6} -> {now:<6} {row['question']} [{row['answer']}] {row['prediction'][:90]!r}")
    print(json.dumps({"facts": n, "labels_changed": sum(changed.values()), "changes": dict(changed),
                      "by_relation": dict(by_relation), "now": dict(totals)}, indent=2))
    print("\n".join(shown[: args.show]))


if __name__ == "__main__":
    main()
