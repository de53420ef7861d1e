"""Which packaged facts does a model not know yet? Ask it every question once and split.

`memtune facts` asks each country question (greedy, batched) and writes

- ``learn.jsonl``: the facts the model answers wrongly — what a learning run should teach;
- ``known.jsonl``: the facts it answers rightly, and surely — held out to measure forgetting;
- ``unsure.jsonl``: the facts it answers rightly by a near-tie (margin under ``min_margin``):
  neither to learn nor a fair test of forgetting, since the smallest change flips them;
- ``summary.json``: counts overall and per relation, the decision rule, model and timing.

"Answered right" is `memtune.probes.is_correct`: the generation names the answer or an alias
(folded and normalised, whole words, not inside a longer name, not negated), since chat models
answer in sentences. The margin is
`memtune.probes.qa.answers_with_margins`: the smallest gap in log-probability (nats) between the
greedy token and the runner-up, up to the token that completes the answer. Each line is a
`memtune.data.QA` plus the model's ``prediction`` and ``margin``, loadable again with `load_qa`.
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
from memtune.errors import MemtuneError
from memtune.probes.qa import answers_with_margins, is_correct

log = logging.getLogger(__name__)


# Of SmolLM2-135M-Instruct's right answers to the country questions, 138 of 651 have a margin
# under 0.1 nats; the smallest update, learning unrelated facts, flips such answers (BENCHMARKS.md).
MIN_MARGIN = 0.1


@dataclass
class FactSplit:
    learn: list[QA]
    known: list[QA]
    unsure: list[QA]
    predictions: dict[str, tuple[str, float]]  # item id -> the model's answer, its margin

    def rows(self, items: list[QA]) -> list[dict]:
        rows = []
        for q in items:
            answer, margin = self.predictions[q.id or q.question]
            rows.append({**q.to_dict(), "prediction": answer, "margin": round(margin, 4)})
        return rows


def split_facts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: list[QA],
    max_new_tokens: int = 24,
    batch_size: int = 32,
    min_margin: float = MIN_MARGIN,
    progress: bool = True,
) -> FactSplit:
    """Ask every question once (greedy) and split the items into wrong (learn), right with a
    margin of at least `min_margin` nats (known) and right by less (unsure)."""
    answers = answers_with_margins(model, tokenizer, items, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress)
    split = FactSplit([], [], [], {})
    for item, (answer, margin) in zip(items, answers):
        split.predictions[item.id or item.question] = answer, margin
        if not is_correct(answer, item.answers, item.question):
            split.learn.append(item)
        else:
            (split.known if margin >= min_margin else split.unsure).append(item)
    return split


def _relation(item: QA) -> str:
    return (item.id or "").rsplit("/", 1)[-1] if (item.id or "").startswith("countries/") else "other"


def write_fact_split(split: FactSplit, out: str | Path, info: dict) -> dict:
    """Write learn.jsonl, known.jsonl, unsure.jsonl and summary.json into the folder `out`
    (which must be new or empty — the caller wraps it in `atomic_dir`). Returns the summary."""
    from memtune.io import write_json

    out = Path(out)
    parts = {"learn": split.learn, "known": split.known, "unsure": split.unsure}
    for name, items in parts.items():
        save_jsonl(split.rows(items), out / f"{name}.jsonl")
    per_relation: dict[str, dict[str, int]] = collections.defaultdict(lambda: dict.fromkeys(parts, 0))
    for name, items in parts.items():
        for q in items:
            per_relation[_relation(q)][name] += 1
    summary = {
        **info,
        "facts": sum(len(items) for items in parts.values()),
        **{name: len(items) for name, items in parts.items()},
        "per_relation": dict(sorted(per_relation.items())),
        "decision": "right = the greedy answer names the answer or an alias: whole words, not inside a longer name, not negated (memtune.probes.is_correct); "
                    f"known = right with a margin of at least {info.get('min_margin', MIN_MARGIN)} nats, unsure = right by less",
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
    min_margin: float = MIN_MARGIN,
    overwrite: bool = False,
) -> dict:
    """Load `model_name`, split the facts of `source` and write them to the folder `out`."""
    from memtune.data import load_qa
    from memtune.io import atomic_dir
    from memtune.models import load_model

    from memtune.io import check_output_free

    if not min_margin >= 0:
        raise MemtuneError(f"--min-margin {min_margin} is invalid: expected a number of nats >= 0")
    check_output_free(out, overwrite)  # before minutes of generation
    items = load_qa(source, limit=limit)
    model, tokenizer = load_model(model_name, dtype=dtype)
    log.info("asking %s %d questions from %s", model_name, len(items), source)
    start = time.perf_counter()
    split = split_facts(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        min_margin=min_margin)
    seconds = time.perf_counter() - start
    info = {"model": model_name, "source": source, "limit": limit, "max_new_tokens": max_new_tokens,
            "min_margin": min_margin, "seconds": round(seconds, 1)}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        summary = write_fact_split(split, tmp, info)
    log.info("%d facts: %d to learn, %d known, %d unsure (%.0f s); written to %s",
             summary["facts"], summary["learn"], summary["known"], summary["unsure"], seconds, out)
    return summary
