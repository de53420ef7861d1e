"""Which packaged facts does a model not know yet? Ask it every question once and split.

`memtune facts` asks each country question (greedy, batched) and writes

- ``learn.jsonl``: the facts the model answers wrongly — what a learning run should teach;
- ``known.jsonl``: the facts it answers rightly — held out to measure forgetting;
- ``summary.json``: counts overall and per relation, the decision rule, model and timing.

"Answered right" is `memtune.probes.is_correct`: any alias of the answer appears in the
generation (normalised, whole words), since chat models answer in sentences. Each line is a
`memtune.data.QA` plus the model's ``prediction``, loadable again with `load_qa`.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from memtune.data import QA, save_jsonl
from memtune.probes.qa import answer_questions, is_correct

log = logging.getLogger(__name__)


@dataclass
class FactSplit:
    learn: list[QA]
    known: list[QA]
    predictions: dict[str, str]  # item id -> the model's answer

    def rows(self, items: list[QA]) -> list[dict]:
        return [{**q.to_dict(), "prediction": self.predictions[q.id or q.question]} for q in items]


def split_facts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: list[QA],
    max_new_tokens: int = 24,
    batch_size: int = 32,
    progress: bool = True,
) -> FactSplit:
    """Ask every question once (greedy) and split the items into wrong (learn) and right (known)."""
    answers = answer_questions(
        model, tokenizer, [q.question for q in items], max_new_tokens=max_new_tokens,
        batch_size=batch_size, progress=progress,
    )
    learn, known, predictions = [], [], {}
    for item, answer in zip(items, answers):
        predictions[item.id or item.question] = answer
        (known if is_correct(answer, item.answers) else learn).append(item)
    return FactSplit(learn, known, predictions)


def _relation(item: QA) -> str:
    return (item.id or "").rsplit("/", 1)[-1] if (item.id or "").startswith("countries/") else "other"


def write_fact_split(split: FactSplit, out: str | Path, info: dict) -> dict:
    """Write learn.jsonl, known.jsonl and summary.json into the folder `out` (which must be new
    or empty — the caller wraps it in `atomic_dir`). Returns the summary."""
    from memtune.io import write_json

    out = Path(out)
    save_jsonl(split.rows(split.learn), out / "learn.jsonl")
    save_jsonl(split.rows(split.known), out / "known.jsonl")
    per_relation: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"learn": 0, "known": 0})
    for name, items in (("learn", split.learn), ("known", split.known)):
        for q in items:
            per_relation[_relation(q)][name] += 1
    summary = {
        **info,
        "facts": len(split.learn) + len(split.known),
        "learn": len(split.learn),
        "known": len(split.known),
        "per_relation": dict(sorted(per_relation.items())),
        "decision": "known = the greedy answer contains the answer or an alias (memtune.probes.is_correct)",
    }
    write_json(out / "summary.json", summary)
    return summary


def run_facts(
    model_name: str,
    out: str | Path,
    source: str = "countries",
    limit: int | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 32,
    dtype: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Load `model_name`, split the facts of `source` and write them to the folder `out`."""
    from memtune.data import load_qa
    from memtune.io import atomic_dir
    from memtune.models import load_model

    items = load_qa(source, limit=limit)
    model, tokenizer = load_model(model_name, dtype=dtype)
    log.info("asking %s %d questions from %s", model_name, len(items), source)
    start = time.perf_counter()
    split = split_facts(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    seconds = time.perf_counter() - start
    info = {"model": model_name, "source": source, "limit": limit, "max_new_tokens": max_new_tokens,
            "seconds": round(seconds, 1)}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        summary = write_fact_split(split, tmp, info)
    log.info("%d facts: %d to learn, %d known (%.0f s); written to %s",
             summary["facts"], summary["learn"], summary["known"], seconds, out)
    return summary
