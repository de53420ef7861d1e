"""Which memory slots a fact reads, and how much its phrasings share them.

SMF can only carry a fact from one phrasing to another through slots both phrasings read at
the answer. This module records, per fact, per phrasing (its question and each paraphrase) and
per memory layer, the slots read at the answer positions — the positions whose next token is a
loss token of the trained target, what SMF counts with `count_positions="loss"` — and measures:

- slots per fact: distinct slots its question reads;
- phrasing overlap: Jaccard of two phrasings' distinct slots, and their share of reads (below),
  against the same numbers for unrelated facts (fact i's question with fact j's question);
- hub share: the share of all reads taken by the top 1 % most-read slots;
- overlap with a second set (known or protected facts): the share of the first set's reads that
  land in slots the second set reads;
- written (a model that has learned: its checkpoint's ledger): the share of the questions'
  reads, and of the paraphrases' reads, that land in value rows a learn call updated — whether
  a rephrased question reads where its fact was written.

A *read* is one (answer position, head, knn) slot index: a position makes heads × knn reads,
so a phrasing whose target has n loss tokens makes n · heads · knn reads per layer. Reads are
kept as multisets: 1-D long tensors of slot ids, with repeats.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from memtune.batches import collate
from memtune.data import QA
from memtune.retrofit import forward_to_memory, require_memory_bank
from memtune.stats import read_slots
from memtune.targets import Loss, Target, fact_examples

log = logging.getLogger(__name__)

# reads[fact][phrasing][layer]: slot ids (n_reads,) read at that phrasing's answer positions
Reads = list[list[dict[str, Tensor]]]


@torch.no_grad()
def answer_reads(model: nn.Module, tokenizer: PreTrainedTokenizerBase, items: Sequence[QA],
                 target: Target = "statement", loss: Loss = "target", batch_size: int = 16,
                 max_length: int = 256) -> Reads:
    """The slots each phrasing of each fact reads at its answer positions, per memory layer.

    Each fact is encoded as `learn` trains it (`memtune.targets.fact_examples`: the question,
    then every paraphrase, each followed by the statement when `target="statement"` and the item
    has one, else the answer). Returns reads[i][p][layer], a long tensor (n_p · heads · knn,) of
    the slot ids read where phrasing p (0 = the question) of item i predicts a loss token;
    layers are named as in `model.memory.layers` (the decoder layer index)."""
    bank = require_memory_bank(model)
    items = list(items)
    augment = max((len(q.paraphrases) for q in items), default=0)
    examples = fact_examples(items, tokenizer, target, loss, augment=augment, max_length=max_length,
                             model=model if loss == "diverge" else None)
    device = next(model.parameters()).device
    flat: list[dict[str, Tensor]] = []  # one per example, in fact_examples' order
    was_training, recording = model.training, all(m.record for m in bank.layers.values())
    model.eval()
    bank.set_record(True)
    try:
        for s in range(0, len(examples), batch_size):
            b = collate(examples[s : s + batch_size], tokenizer.pad_token_id, count_positions="loss")
            forward_to_memory(model, input_ids=b["input_ids"].to(device),
                              attention_mask=b["attention_mask"].to(device), use_cache=False)
            for row in range(b["input_ids"].shape[0]):
                flat.append({name: read_slots(layer.last_indices[row], b["count_mask"][row]).cpu()
                             for name, layer in bank.layers.items()})
    finally:
        bank.set_record(recording)
        model.train(was_training)
    out, at = [], 0
    for q in items:
        n = 1 + len(q.paraphrases)
        out.append(flat[at : at + n])
        at += n
    return out


def jaccard(a: Tensor, b: Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of the distinct slots of the multisets a (n,) and b (m,); 0 when both
    are empty."""
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


def share_of_reads(a: Tensor, b: Tensor) -> float:
    """Symmetrised share of reads: ½ (s(a, b) + s(b, a)), where s(a, b) is the fraction of a's
    reads, counted with multiplicity, whose slot b reads at least once. a (n,), b (m,) slot
    ids; s of an empty multiset is 0. Unlike Jaccard, a slot read often weighs more."""
    return (_share(a, b) + _share(b, a)) / 2


def _share(a: Tensor, b: Tensor) -> float:
    return int(torch.isin(a, b).sum()) / a.numel() if a.numel() else 0.0


def hub_share(reads: Tensor, top: float = 0.01) -> tuple[float, int]:
    """(share, k): the fraction of all reads (n,) taken by the k = ⌈top · U⌉ most-read slots,
    U the number of distinct slots read (so at least one slot). 1 when every read falls on
    the top slots; ≈ top when reads are spread evenly."""
    if reads.numel() == 0:
        return 0.0, 0
    counts = torch.unique(reads, return_counts=True)[1]
    k = max(1, math.ceil(top * counts.numel()))
    return int(counts.topk(k).values.sum()) / reads.numel(), k


def unrelated_pairs(n: int, n_pairs: int, seed: int = 0) -> list[tuple[int, int]]:
    """Up to `n_pairs` pairs (i, j), i < j < n, of different facts: all of them when there are
    no more, else a sample drawn with `random.Random(seed)`."""
    total = n * (n - 1) // 2
    if total <= n_pairs:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    picked = random.Random(seed).sample(range(total), n_pairs)  # a range: never listed
    return sorted(_pair(k, n) for k in picked)


def _pair(k: int, n: int) -> tuple[int, int]:
    """The k-th pair (i, j), i < j < n, in the order (0, 1), (0, 2), ..., (1, 2), ..."""
    i = 0
    while k >= n - 1 - i:
        k -= n - 1 - i
        i += 1
    return i, i + 1 + k


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def layer_summary(reads: Reads, layer: str, known: Reads | None = None, n_pairs: int = 1000,
                  seed: int = 0, top: float = 0.01, written: Tensor | None = None) -> dict:
    """The numbers of one memory layer (each a mean over facts or pairs; None when undefined):

    - reads: all reads of every phrasing; slots_read: their distinct slots;
    - reads_per_fact, slots_per_fact: reads, and distinct slots, of a fact's question;
    - slots_per_fact_all_phrasings: distinct slots of the union of a fact's phrasings;
    - phrasing: {jaccard, share} — per fact with paraphrases, the mean over pairs of its
      phrasings of `jaccard` and `share_of_reads`, then the mean over those facts;
    - unrelated: {jaccard, share, pairs} — the same over `unrelated_pairs` of the facts'
      questions (the baseline: the overlap two facts of this form have anyway);
    - hub_share, hub_slots: `hub_share` of all reads, with top fraction `top`;
    - known: {share, slots_read} — the fraction of all reads of `reads` whose slot is read by
      some phrasing of `known`, and how many distinct slots `known` reads;
    - written (with `written`, the row ids (R,) learn calls updated in this layer's value table):
      {question, paraphrases, rows} — the fraction of the questions' reads, and of the
      paraphrases' reads (None without paraphrases), whose slot is among those rows.
    """
    questions = [fact[0][layer] for fact in reads]
    everything = torch.cat([p[layer] for fact in reads for p in fact])
    per_fact_j, per_fact_s = [], []
    for fact in reads:
        pairs = [(a[layer], b[layer]) for x, a in enumerate(fact) for b in fact[x + 1 :]]
        if pairs:
            per_fact_j.append(_mean([jaccard(a, b) for a, b in pairs]))
            per_fact_s.append(_mean([share_of_reads(a, b) for a, b in pairs]))
    others = unrelated_pairs(len(questions), n_pairs, seed)
    share, k = hub_share(everything, top)
    out = {
        "reads": everything.numel(),
        "slots_read": int(torch.unique(everything).numel()),
        "reads_per_fact": _mean([q.numel() for q in questions]),
        "slots_per_fact": _mean([len(set(q.tolist())) for q in questions]),
        "slots_per_fact_all_phrasings": _mean([len({s for p in fact for s in p[layer].tolist()}) for fact in reads]),
        "phrasing": {"jaccard": _mean(per_fact_j), "share": _mean(per_fact_s), "facts": len(per_fact_j)}
        if per_fact_j else None,
        "unrelated": {"jaccard": _mean([jaccard(questions[i], questions[j]) for i, j in others]),
                      "share": _mean([share_of_reads(questions[i], questions[j]) for i, j in others]),
                      "pairs": len(others)} if others else None,
        "hub_share": share,
        "hub_slots": k,
    }
    if known is not None:
        theirs = torch.unique(torch.cat([p[layer] for fact in known for p in fact]))
        out["known"] = {"share": _share(everything, theirs), "slots_read": int(theirs.numel())}
    if written is not None:
        rephrased = [p[layer] for fact in reads for p in fact[1:]]
        out["written"] = {"question": _share(torch.cat(questions), written),
                          "paraphrases": _share(torch.cat(rephrased), written) if rephrased else None,
                          "rows": int(written.numel())}
    return out


def slot_access(model: nn.Module, tokenizer: PreTrainedTokenizerBase, items: Sequence[QA],
                known: Sequence[QA] | None = None, target: Target = "statement", loss: Loss = "target",
                n_pairs: int = 1000, seed: int = 0, batch_size: int = 16, max_length: int = 256) -> dict:
    """`layer_summary` of every memory layer for `items` (and `known`), with the counts of
    facts and phrasings: the content of `memtune slots`' slots.json. When the memory has
    learned (its ledger lists learn calls), each layer also gets `written`: the share of reads
    in the rows those calls updated in the value table the layer reads."""
    if not items:
        raise ValueError("no facts to analyse")
    kw = dict(target=target, loss=loss, batch_size=batch_size, max_length=max_length)
    reads = answer_reads(model, tokenizer, items, **kw)
    known_reads = answer_reads(model, tokenizer, known, **kw) if known else None
    layers = list(reads[0][0])
    bank = require_memory_bank(model)
    written: dict[str, Tensor | None] = {name: None for name in layers}
    if bank.ledger.calls:
        written = {name: bank.ledger.learned_rows(bank.table_index(int(name))) for name in layers}
    return {
        "facts": len(items),
        "phrasings": sum(len(f) for f in reads),
        "facts_with_paraphrases": sum(len(f) > 1 for f in reads),
        "known_facts": len(known) if known else None,
        "target": target, "loss": loss, "seed": seed,
        "layers": {name: layer_summary(reads, name, known_reads, n_pairs, seed, written=written[name])
                   for name in layers},
    }


def plot_slot_access(summary: dict, path) -> None:
    """Per layer: Jaccard and share of reads of a fact's phrasings beside those of unrelated
    facts, the hub share, (with known facts) the share of reads in known facts' slots and (on
    a model that has learned) the questions' and paraphrases' share of reads in written rows."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    bars = [("phrasing", "jaccard", "phrasings: Jaccard"), ("unrelated", "jaccard", "unrelated: Jaccard"),
            ("phrasing", "share", "phrasings: share of reads"), ("unrelated", "share", "unrelated: share of reads"),
            ("hub_share", None, "hub share (top 1 % slots)"), ("known", "share", "share of reads in known slots"),
            ("written", "question", "questions: share of reads in written rows"),
            ("written", "paraphrases", "paraphrases: share of reads in written rows")]
    first = next(iter(summary["layers"].values()))
    bars = [b for b in bars if b[0] != "known" or summary.get("known_facts") is not None]
    bars = [b for b in bars if b[0] != "written" or "written" in first]
    layers = list(summary["layers"])
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(6, 2.5 * len(layers)), 4.5))
    for b, (key, sub, label) in enumerate(bars):
        values = []
        for name in layers:
            v = summary["layers"][name].get(key)
            values.append((v or {}).get(sub) if sub else v)
        xs = [x + (b - (len(bars) - 1) / 2) * width for x in range(len(layers))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=label, color=f"C{b}", alpha=1.0 if b < 2 else 0.8)
        for x, v in zip(xs, values):
            if v is None:
                ax.text(x, 0.01, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(layers)), [f"layer {n}" for n in layers])
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction")
    ax.set_title(f"slots read at the answer: {summary['facts']} facts, {summary['phrasings']} phrasings")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
