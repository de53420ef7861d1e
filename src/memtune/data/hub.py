"""Hugging Face datasets by name, each with its field mapping built in.

Every dataset is read the same two ways: `datasets.load_dataset` (from the local cache when
huggingface.co is unreachable), or a local copy of its rows in the dataset's own schema
(``data_file=``: .jsonl, .csv or .parquet). Both go through one mapping function per dataset,
so the tests' fixture files exercise exactly the code the hub path runs.

Reachability is checked first with a 2-second TCP connect (skipped when ``HF_HUB_OFFLINE`` or
``HF_DATASETS_OFFLINE`` is set); without a network the load runs in offline mode, so a dataset
that is not cached fails at once with a one-line error instead of minutes of retries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any
from urllib.parse import urlparse

from memtune.data import QA, Choice, Document
from memtune.data.files import Row, read_rows
from memtune.errors import MemtuneError

log = logging.getLogger(__name__)

Mapper = Callable[[Iterable[Row]], Iterator[Any]]


@dataclass(frozen=True)
class HubDataset:
    """Where a dataset lives on the hub and how its rows become memtune items."""

    path: str  # hub repository id
    config: str | None  # dataset configuration (subset)
    split: str  # default split
    schema: str  # the row fields the mapping reads, for error messages
    mappers: dict[str, Mapper]  # kind ("qa" | "documents" | "choices") -> mapping


def _rowwise(name: str, fn: Callable[[dict[str, Any], int], Any]) -> Mapper:
    """A mapping applied row by row; a row missing a field is an error naming where it is."""

    def mapper(rows: Iterable[Row]) -> Iterator[Any]:
        for i, (where, row) in enumerate(rows):
            try:
                item = fn(row, i)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                raise MemtuneError(
                    f"{where}: row does not match the {name} schema ({type(e).__name__}: {e}); "
                    f"expected fields {DATASETS[name].schema}"
                ) from None
            if item is not None:
                yield item

    return mapper


# --- question answering ------------------------------------------------------------------------


def _trivia_qa(row: dict[str, Any], i: int) -> QA:
    answer = row["answer"]
    value = answer["value"]
    aliases = [a for a in dict.fromkeys(answer.get("aliases") or []) if a != value]
    return QA(question=row["question"], answer=value, aliases=aliases, id=row.get("question_id") or f"trivia_qa/{i}")


def _question(text: str) -> str:
    text = text.strip()
    return text if text.endswith("?") else text + "?"  # nq_open questions come without one


def _nq_open(row: dict[str, Any], i: int) -> QA:
    answers = list(row["answer"])
    return QA(question=_question(row["question"]), answer=answers[0], aliases=answers[1:], id=f"nq_open/{i}")


def _simpleqa(row: dict[str, Any], i: int) -> QA:
    return QA(question=row["problem"], answer=str(row["answer"]), id=f"simpleqa/{i}")


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$")


def _gsm8k(row: dict[str, Any], i: int) -> QA:
    """The answer is the whole reference solution (for answer loss); the final number after
    ``####`` is an alias, so a generation containing it counts as right."""
    solution = row["answer"].strip()
    final = _GSM8K_FINAL.search(solution)
    if final is None:
        raise ValueError("answer has no '#### <number>' final line")
    return QA(question=row["question"], answer=solution, aliases=[final.group(1).replace(",", "")], id=f"gsm8k/{i}")


# --- multiple choice ---------------------------------------------------------------------------


def _medmcqa(row: dict[str, Any], i: int) -> Choice | None:
    label = row["cop"]
    if label is None or int(label) < 0:  # the test split hides its answers
        return None
    choices = [str(row[k]) for k in ("opa", "opb", "opc", "opd")]
    question = f"Question: {row['question'].strip()}\nAnswer:"
    return Choice(question=question, choices=choices, label=int(label), id=str(row.get("id") or f"medmcqa/{i}"))


def _hellaswag_clean(text: str) -> str:
    """The preprocessing of lm-evaluation-harness (WikiHow's ``[title]`` markers and the like),
    stripped at the end too since every choice is scored as ``" " + choice``."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def _hellaswag(row: dict[str, Any], i: int) -> Choice | None:
    if row["label"] in (None, ""):  # the test split hides its answers
        return None
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return Choice(
        question=_hellaswag_clean(row["activity_label"] + ": " + context),
        choices=[_hellaswag_clean(e) for e in row["endings"]],
        label=int(row["label"]),
        id=str(row.get("ind", f"hellaswag/{i}")),
    )


# --- documents ---------------------------------------------------------------------------------

_WIKITEXT_TITLE = re.compile(r"^ = ([^=].*?) = \s*$")


def _wikitext(rows: Iterable[Row]) -> Iterator[Document]:
    """WikiText rows are lines; an article starts at a top-level ``= Title =`` heading."""
    title, lines = None, []
    for where, row in rows:
        if "text" not in row:
            raise MemtuneError(f"{where}: row does not match the wikitext schema: missing field 'text'")
        line = row["text"] or ""
        m = _WIKITEXT_TITLE.match(line)
        if m and lines:
            text = "".join(lines).strip()
            if text:
                yield Document(text=text, id=f"wikitext/{title}")
            lines = []
        if m:
            title = m.group(1).strip()
        lines.append(line if line.endswith("\n") else line + "\n")
    text = "".join(lines).strip()
    if text:
        yield Document(text=text, id=f"wikitext/{title}")


def _oasst_messages(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """English, not deleted messages of the OpenAssistant trees."""
    out = []
    for where, row in rows:
        missing = [k for k in ("message_id", "parent_id", "text", "role") if k not in row]
        if missing:
            raise MemtuneError(f"{where}: row does not match the oasst1 schema: missing field {missing[0]!r}")
        if row.get("lang", "en") == "en" and not row.get("deleted", False):
            out.append(row)
    return out


def _oasst_qa(rows: Iterable[Row]) -> Iterator[QA]:
    """A prompter message and its best-ranked assistant reply (rank 0, or the only reply)."""
    messages = _oasst_messages(rows)
    by_id = {m["message_id"]: m for m in messages}
    best: dict[str, dict[str, Any]] = {}
    for m in messages:
        parent = by_id.get(m["parent_id"])
        if m["role"] != "assistant" or parent is None or parent["role"] != "prompter":
            continue
        rank = m.get("rank")
        current = best.get(parent["message_id"])
        if current is None or _rank(rank) < _rank(current.get("rank")):
            best[parent["message_id"]] = m
    for m in messages:  # in the dataset's order
        reply = best.get(m["message_id"])
        if reply is not None:
            yield QA(question=m["text"].strip(), answer=reply["text"].strip(), id=f"oasst1/{m['message_id']}")


def _rank(rank: Any) -> float:
    return float("inf") if rank is None else float(rank)


def _oasst_documents(rows: Iterable[Row]) -> Iterator[Document]:
    for m in _oasst_messages(rows):
        yield Document(text=m["text"].strip(), id=f"oasst1/{m['message_id']}")


DATASETS: dict[str, HubDataset] = {
    "trivia_qa": HubDataset(
        "mandarjoshi/trivia_qa", "rc.nocontext", "validation",
        '"question", "question_id", "answer" {"value", "aliases"}', {"qa": _rowwise("trivia_qa", _trivia_qa)},
    ),
    "nq_open": HubDataset(
        "google-research-datasets/nq_open", "nq_open", "validation",
        '"question", "answer" (a list)', {"qa": _rowwise("nq_open", _nq_open)},
    ),
    "simpleqa": HubDataset(
        "basicv8vc/SimpleQA", None, "test", '"problem", "answer"', {"qa": _rowwise("simpleqa", _simpleqa)},
    ),
    "gsm8k": HubDataset(
        "openai/gsm8k", "main", "test", '"question", "answer" (ending "#### <number>")',
        {"qa": _rowwise("gsm8k", _gsm8k)},
    ),
    "medmcqa": HubDataset(
        "openlifescienceai/medmcqa", None, "validation", '"id", "question", "opa".."opd", "cop"',
        {"choices": _rowwise("medmcqa", _medmcqa)},
    ),
    "hellaswag": HubDataset(
        "Rowan/hellaswag", None, "validation", '"ind", "activity_label", "ctx_a", "ctx_b", "endings", "label"',
        {"choices": _rowwise("hellaswag", _hellaswag)},
    ),
    "wikitext": HubDataset(
        "Salesforce/wikitext", "wikitext-2-raw-v1", "test", '"text" (one line per row)', {"documents": _wikitext},
    ),
    "oasst1": HubDataset(
        "OpenAssistant/oasst1", None, "validation", '"message_id", "parent_id", "text", "role", "lang", "rank"',
        {"qa": _oasst_qa, "documents": _oasst_documents},
    ),
}
ALIASES = {"triviaqa": "trivia_qa", "nq": "nq_open", "natural_questions": "nq_open", "simple_qa": "simpleqa",
           "wikitext2": "wikitext", "oasst": "oasst1"}


def canonical(name: str) -> str | None:
    name = name.lower()
    name = ALIASES.get(name, name)
    return name if name in DATASETS else None


def is_hub_name(name: str) -> bool:
    return canonical(name) is not None


def names(kind: str | None = None) -> list[str]:
    return [n for n, d in DATASETS.items() if kind is None or kind in d.mappers]


def load(name: str, kind: str, limit: int | None = None, split: str | None = None, data_file: str | None = None) -> list:
    """Items of `kind` from hub dataset `name`, or from `data_file` (its rows, same schema)."""
    key = canonical(name)
    if key is None:
        raise MemtuneError(f"unknown hub dataset {name!r}: expected one of {', '.join(names())}")
    spec = DATASETS[key]
    if kind not in spec.mappers:
        raise MemtuneError(f"dataset {name!r} has no {kind} items: it provides {', '.join(spec.mappers)}")
    if limit is not None and limit < 0:
        raise MemtuneError(f"limit={limit} is invalid: expected a non-negative number or none")
    rows: Iterable[Row] = read_rows(data_file) if data_file else _hub_rows(key, split or spec.split)
    items = list(islice(spec.mappers[kind](rows), limit))
    if not items and limit != 0:
        source = data_file or f"{spec.path} [{split or spec.split}]"
        raise MemtuneError(f"dataset {name!r} from {source} has no usable {kind} items (labelled rows in its schema)")
    return items


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub endpoint answers a TCP connect within `timeout` seconds (never hangs)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE"):
            return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:  # getaddrinfo ignores socket timeouts, hence the thread
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def _offline(on: bool) -> Iterator[None]:
    """Force the hub libraries' offline mode (read once at import time) for one call."""
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if on:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _hub_rows(key: str, split: str) -> Iterator[Row]:
    import datasets

    spec = DATASETS[key]
    ref = spec.path + (f" ({spec.config})" if spec.config else "")
    online = hub_reachable()
    log.info("loading %s [%s]%s", ref, split, "" if online else " from the local cache (hub unreachable)")
    try:
        with _offline(not online):
            ds = datasets.load_dataset(spec.path, spec.config, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
        if not online:
            raise MemtuneError(
                f"dataset {key!r} ({ref}, split {split}) is not in the local Hugging Face cache and "
                f"the hub is unreachable: pass a local copy of its rows with --data-file FILE (.jsonl/.csv/.parquet)"
            ) from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MemtuneError(
            f"cannot load dataset {key!r} ({ref}, split {split}): {first}; "
            "or pass a local copy of its rows with --data-file FILE"
        ) from None
    return ((f"{spec.path} [{split}] row {i + 1}", row) for i, row in enumerate(ds))
