"""Where a fact's phrasings read alike: the slots its question and its held-out paraphrases read
at the subject's tokens and at the prompt's last position, against unrelated facts, and the
share of those reads in rows the learn call wrote (issue 17, tenth round in BENCHMARKS.md).

`memtune slots` measures reads at the answer positions. This asks the prompt only (the chat
template with the question, as `memtune learn` trains it), at two places:

- `subject`: the tokens that name the fact's subject, found by the recipe's rule
  (`memtune.recipe.question_forms` on the learned questions, then `subject_span` in each
  phrasing; a phrasing that does not name it is left out);
- `last`: the prompt's last token, which predicts the answer's first.

    python benchmarks/subject_reads.py --run runs/levers9/states-pp/pp/call1 \
        --facts runs/levers9/states-pp/facts1.jsonl --domain runs/domains/states/learn.jsonl

`--facts` are the learned facts (their paraphrases are looked up by question in `--domain`).
Prints per memory layer and place: the phrasings' `share_of_reads` with their question, the
same between unrelated facts' questions, and the share of the questions' and paraphrases'
reads in written rows.
"""

from __future__ import annotations

import argparse

import torch
from ablate_written_rows import load_run, prompt_ids  # benchmarks/, beside this script

from memtune.data import load_qa
from memtune.recipe import question_forms, subject_span
from memtune.slot_access import share_of_reads, unrelated_pairs

PLACES = ("subject", "last")


def prompt_reads(model, tokenizer, bank, text: str, words: set[str]) -> dict[str, dict[str, torch.Tensor]] | None:
    """reads[place][layer] of one phrasing's prompt; None when it does not name its subject."""
    [ids] = prompt_ids(tokenizer, [text])
    prompt = tokenizer.decode(ids)
    begin = prompt.rfind(text)  # the subject in the question, not in the template
    span = subject_span(prompt[begin:], words)
    if span is None:
        return None
    start, end = begin + span[0], begin + span[1]
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    if encoded["input_ids"] != ids:  # the offsets must be those of the ids the model reads
        raise SystemExit(f"the prompt of {text!r} does not tokenize back to the ids learn trains; "
                         "subject positions cannot be found")
    at = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > start]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), use_cache=False)
    return {"subject": {n: layer.last_indices[0, at].reshape(-1) for n, layer in bank.layers.items()},
            "last": {n: layer.last_indices[0, -1].reshape(-1) for n, layer in bank.layers.items()}}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a learn call's folder (model/)")
    p.add_argument("--facts", required=True, help="the facts the call learned (JSONL)")
    p.add_argument("--domain", required=True, help="the same facts with their paraphrases (JSONL)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    model, tokenizer, bank = load_run(args.run, args.threads)
    full = {q.question: q for q in load_qa(args.domain)}
    facts = [full[q.question] for q in load_qa(args.facts)]
    subjects = [words for _, words in question_forms([q.question for q in facts])]
    bank.set_record(True)
    reads = [[prompt_reads(model, tokenizer, bank, t, words) for t in (q.question, *q.paraphrases)]
             for q, words in zip(facts, subjects)]
    bank.set_record(False)
    named = [r for r in reads if r[0] is not None]
    print(f"{len(named)} of {len(facts)} questions name their subject; "
          f"{sum(p is not None for r in named for p in r[1:])} of {sum(len(r) - 1 for r in named)} paraphrases")
    pairs = unrelated_pairs(len(named), 300)
    for place in PLACES:
        for name in bank.layers:
            written = bank.ledger.learned_rows(bank.table_index(int(name)))
            phrasings = [(r[0][place][name], p[place][name]) for r in named for p in r[1:] if p is not None]
            same = mean([share_of_reads(a, b) for a, b in phrasings])
            unrelated = mean([share_of_reads(named[i][0][place][name], named[j][0][place][name]) for i, j in pairs])
            in_q = mean([torch.isin(r[0][place][name], written).float().mean().item() for r in named])
            in_p = mean([torch.isin(b, written).float().mean().item() for _, b in phrasings])
            print(f"{place:8s} layer {name}: phrasings share {same:.3f}, unrelated {unrelated:.3f}; in written rows: "
                  f"questions {in_q:.3f}, paraphrases {in_p:.3f}")


if __name__ == "__main__":
    main()
