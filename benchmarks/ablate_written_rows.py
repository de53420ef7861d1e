"""Which reads of a known question make it lost: un-write (zero) the rows a learn call wrote that
a set of prompts reads, then ask the known facts and the learned facts again (issue 17, ninth
round in BENCHMARKS.md).

A parallel memory starts with zero values, so zeroing a written row gives it back its base
value: whatever a known fact recovers was lost through reads of those rows. The prompts
(`--prompts`, each ended where its answer would start, every position's reads counted):

- `known`: the known facts' own questions (an oracle: a recipe cannot know them);
- `known-answers`: the same, each followed by the base model's own answer to it (the base
  answers from the memory with every value zeroed): what a known question reads while it is
  answered as before (an oracle too; sixteenth round);
- `related`: the related questions the run wrote (`config.json`, `steps.related_questions`);
- `prefix`: the chat template and words the known questions share ("... user\\nIn which country
  is the city of");
- `system`: the chat template up to the user's question only;
- `neighbours`: the learned facts' questions about 5 other subjects each (`memtune.recipe.
  neighbourhood_prompts`, subjects from the related questions) whose answer's first sentence
  the call changed (`memtune.recipe.AnswersKept`; the base answers from the memory with every
  value zeroed), their reads where their base answer is predicted only: what
  `memtune learn --neighbourhood-check` un-writes in its first round.

    python benchmarks/ablate_written_rows.py --run runs/levers7/cities-default/smf/call1 \
        --known runs/domains/cities/known.jsonl --facts runs/levers7/cities-default/facts1.jsonl \
        --prompts prefix

Prints the known and learned facts answered right (as `memtune learn`'s until-learned check
asks them) before and after, and per memory layer the rows zeroed and the share of the
prompts' reads (every position, every head's top-k) that land in written rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memtune.batches import IGNORE, encode_qa
from memtune.checkpoint import load_memory_model
from memtune.data import load_qa
from memtune.recipe import AnswerCheck, AnswersKept, neighbourhood_prompts
from memtune.stats import background_stats
from memtune.retrofit import get_memory_bank

PROMPTS = ("known", "known-answers", "related", "prefix", "system", "neighbours")


def prompt_ids(tokenizer, questions: list[str]) -> list[list[int]]:
    """Each question's chat prompt, up to where its answer starts."""
    return [e.input_ids[: next(i for i, y in enumerate(e.labels) if y != IGNORE)]
            for e in encode_qa(tokenizer, [(q, "x") for q in questions])]


def load_run(run: str, threads: int):
    """A learn call's model (eval mode), tokenizer and memory bank, on `threads` CPU threads."""
    torch.set_num_threads(threads)
    model, tokenizer = load_memory_model(Path(run) / "model")
    model.eval()
    return model, tokenizer, get_memory_bank(model)


def base_answers(model, tokenizer, bank, questions: list[str]) -> AnswersKept:
    """The base model's greedy answers to `questions`: a parallel memory's values start at zero,
    so they are asked with every value zeroed, then the trained values are put back."""
    trained = [v.weight.detach().clone() for v in bank.values]
    with torch.no_grad():
        for v in bank.values:
            v.weight.zero_()
    kept = AnswersKept(model, tokenizer, questions, progress=False)
    with torch.no_grad():
        for v, w in zip(bank.values, trained):
            v.weight.copy_(w)
    return kept


def common_prefix(sequences: list[list[int]]) -> list[int]:
    shared = sequences[0]
    for ids in sequences[1:]:
        shared = shared[: next((i for i, (a, b) in enumerate(zip(shared, ids)) if a != b), len(shared))]
    return shared


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a learn call's folder (model/ and config.json)")
    p.add_argument("--known", required=True, help="known facts (JSONL); the first --limit are asked")
    p.add_argument("--facts", required=True, help="the facts the call learned (JSONL)")
    p.add_argument("--prompts", choices=PROMPTS, required=True)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    model, tokenizer, bank = load_run(args.run, args.threads)
    known, facts = load_qa(args.known)[: args.limit], load_qa(args.facts)
    check_known, check_facts = AnswerCheck(tokenizer, known), AnswerCheck(tokenizer, facts)
    before = sum(check_known(model)), sum(check_facts(model))

    asked = [q.question for q in known]
    if args.prompts in ("related", "neighbours"):
        config = json.loads((Path(args.run) / "config.json").read_text())
        asked = config["steps"]["related_questions"]["questions"]
    if args.prompts == "neighbours":
        neighbours = list(dict.fromkeys(q for q, _ in neighbourhood_prompts(facts, asked, 5, statements=False)))
        kept = base_answers(model, tokenizer, bank, neighbours)
        changed = kept(model)
        print(f"neighbours: {len(changed)} of {len(kept.questions)} answered otherwise")
        stats = background_stats(model, [kept.examples[i] for i in changed], tokenizer.pad_token_id,
                                 len(changed), 8, "loss", progress=False)
        prompts = changed  # each slot as often as it was read, where the base answers are predicted
        reads = {name: [torch.repeat_interleave(torch.arange(len(c)), c)] for name, c in stats.counts.items()}
    else:
        prompts = prompt_ids(tokenizer, asked)
        if args.prompts == "known-answers":  # every position of the question and its base answer
            prompts = [e.input_ids for e in base_answers(model, tokenizer, bank, asked).examples]
        elif args.prompts == "prefix":
            prompts = [common_prefix(prompts)]
        elif args.prompts == "system":  # two one-word questions share the template only
            prompts = [common_prefix(prompt_ids(tokenizer, ["Who?", "Why?"]))]
        reads = {name: [] for name in bank.layers}
        bank.set_record(True)
        with torch.no_grad():
            for ids in prompts:
                model(input_ids=torch.tensor([ids]), use_cache=False)
                for name, layer in bank.layers.items():
                    reads[name].append(layer.last_indices.reshape(-1))
        bank.set_record(False)
    zeroed, shares = {}, {}  # per layer: (rows zeroed, rows read); the prompts' reads in written rows
    with torch.no_grad():
        for name in bank.layers:
            table = bank.table_index(int(name))
            read = torch.cat(reads[name]).unique()
            written = bank.ledger.learned_rows(table)
            rows = read[torch.isin(read, written)]
            shares[name] = torch.isin(torch.cat(reads[name]), written).float().mean().item()
            bank.values[table].weight[rows] = 0
            zeroed[name] = (int(rows.numel()), int(read.numel()))
    after = sum(check_known(model)), sum(check_facts(model))
    print(f"prompts: {args.prompts} ({len(prompts)})")
    for name, (rows, read) in zeroed.items():
        print(f"layer {name}: {rows} written rows zeroed of {read} read; {100 * shares[name]:.1f} % of the "
              "prompts' reads are in written rows")
    print(f"known right: {before[0]} -> {after[0]} of {len(known)}; learned right: {before[1]} -> {after[1]} of {len(facts)}")


if __name__ == "__main__":
    main()
