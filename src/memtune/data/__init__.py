"""Data sources: QA pairs, documents and multiple-choice items from files, the Hugging Face
hub, or the offline packaged sets.

A *source* is one string:

- a file path — ``.jsonl``, ``.csv``, ``.parquet`` (and ``.txt`` for documents) in memtune's own
  schema (see `memtune.data.files`);
- a hub dataset name — ``trivia_qa``, ``nq_open``, ``simpleqa``, ``gsm8k``, ``medmcqa``,
  ``hellaswag``, ``wikitext``, ``oasst1`` (see `memtune.data.hub`); pass ``data_file=`` to read a
  local copy of its rows, in the dataset's own schema, through the same field mapping;
- ``countries`` (optionally ``countries:capital,currency``): country facts from `countryinfo`;
- ``prose``, ``prose:background``, ``prose:heldout``: Python's reference documentation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from memtune.errors import MemtuneError


@dataclass
class QA:
    """A question with its reference answer; any of `answer` + `aliases` counts as right.
    `paraphrases` ask the same thing in other words (generalisation tests); `statement`, when
    known, states the fact as a sentence ("The capital of Chad is N'Djamena."), the way a chat
    model answers — a training target that changes less of the model than the bare answer."""

    question: str
    answer: str
    aliases: list[str] = field(default_factory=list)
    paraphrases: list[str] = field(default_factory=list)
    id: str | None = None
    statement: str | None = None

    @property
    def answers(self) -> list[str]:
        """The reference answer first, then the aliases, without duplicates."""
        return list(dict.fromkeys([self.answer, *self.aliases]))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Document:
    """A piece of running text (perplexity, drift, background training text)."""

    text: str
    id: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Choice:
    """A multiple-choice item: `question` is the context each choice continues; `label` indexes
    the right choice."""

    question: str
    choices: list[str]
    label: int
    id: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.label < len(self.choices):
            raise MemtuneError(
                f"label={self.label} is invalid for item {self.id!r}: expected 0..{len(self.choices) - 1}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Source:
    """A source string (see above) with its options: only the first `limit` items, a hub
    `split`, a local copy of a hub dataset (`data_file`)."""

    source: str
    limit: int | None = None
    split: str | None = None
    data_file: str | None = None

    def kwargs(self) -> dict:
        """The options of `load_qa`, `load_documents` and `load_choices`."""
        return {"limit": self.limit, "split": self.split, "data_file": self.data_file}


FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def _is_file_source(source: str) -> bool:
    return Path(source).suffix.lower() in FILE_SUFFIXES or Path(source).exists()


def _limit(items: list, limit: int | None) -> list:
    if limit is not None and limit < 0:
        raise MemtuneError(f"limit={limit} is invalid: expected a non-negative number or none")
    return items if limit is None else items[:limit]


def load_qa(source: str, limit: int | None = None, split: str | None = None, data_file: str | None = None) -> list[QA]:
    """QA pairs from a file, a hub dataset, or ``countries[:relation,...]``."""
    from memtune.data import files, hub

    name, _, arg = source.partition(":")
    if name == "countries":
        from memtune.data.countries import country_facts

        return _limit(country_facts(arg.split(",") if arg else None), limit)
    if hub.is_hub_name(source):
        return hub.load(source, "qa", limit=limit, split=split, data_file=data_file)
    if _is_file_source(source):
        return _limit(files.read_qa(source), limit)
    raise MemtuneError(_unknown(source, "QA", hub.names("qa"), "countries, countries:capital,currency"))


def load_documents(
    source: str, limit: int | None = None, split: str | None = None, data_file: str | None = None
) -> list[Document]:
    """Documents from a file, a hub dataset (``wikitext``, ``oasst1``), or ``prose[:part]``."""
    from memtune.data import files, hub

    name, _, arg = source.partition(":")
    if name == "prose":
        from memtune.data.prose import prose_documents

        return _limit(prose_documents(arg or None), limit)
    if hub.is_hub_name(source):
        return hub.load(source, "documents", limit=limit, split=split, data_file=data_file)
    if _is_file_source(source):
        return _limit(files.read_documents(source), limit)
    raise MemtuneError(_unknown(source, "documents", hub.names("documents"), "prose, prose:background, prose:heldout"))


def load_choices(
    source: str, limit: int | None = None, split: str | None = None, data_file: str | None = None
) -> list[Choice]:
    """Multiple-choice items from a file or a hub dataset (``medmcqa``, ``hellaswag``)."""
    from memtune.data import files, hub

    if hub.is_hub_name(source):
        return hub.load(source, "choices", limit=limit, split=split, data_file=data_file)
    if _is_file_source(source):
        return _limit(files.read_choices(source), limit)
    raise MemtuneError(_unknown(source, "multiple-choice", hub.names("choices"), ""))


def _unknown(source: str, kind: str, hub_names: list[str], packaged: str) -> str:
    accepted = ", ".join(hub_names) + (f", {packaged}" if packaged else "")
    return (
        f"unknown {kind} source {source!r}: expected an existing .jsonl/.csv/.parquet file "
        f"or one of: {accepted}"
    )


def save_jsonl(items: list[QA | Document | Choice] | list[dict], path: str | Path) -> Path:
    """Write items (or plain dicts) one JSON object per line, atomically."""
    from memtune.io import atomic_write_text

    rows = [i if isinstance(i, dict) else i.to_dict() for i in items]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return Path(path)


__all__ = ["QA", "Choice", "Document", "Source", "load_choices", "load_documents", "load_qa", "save_jsonl"]
