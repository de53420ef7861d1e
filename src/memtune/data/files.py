"""Local files in memtune's own schema.

=========  =====================================================================================
QA         ``question``, ``answer`` [, ``aliases``, ``paraphrases``, ``id``]; other keys ignored
documents  ``text`` [, ``id``]; a ``.txt`` file holds documents separated by blank lines
choices    ``question``, ``choices``, ``label`` [, ``id``]
=========  =====================================================================================

JSONL has one object per line; CSV has a header row, and list fields (``aliases``,
``paraphrases``, ``choices``) are a JSON list or ``|``-separated text; parquet has list columns.
`read_rows` (any of the three as plain dicts) is also how hub datasets read a ``--data-file``.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

from memtune.errors import MemtuneError, is_number

Row = tuple[str, dict[str, Any]]  # (where: "file.jsonl line 3", row)


def read_rows(path: str | Path) -> list[Row]:
    """Every row of a .jsonl/.json, .csv or .parquet file, each with where it came from."""
    path = Path(path)
    if not path.is_file():
        raise MemtuneError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = [(f"{path} line {i + 2}", dict(r)) for i, r in enumerate(csv.DictReader(f))]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise MemtuneError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        rows = [(f"{path} row {i + 1}", r) for i, r in enumerate(table.to_pylist())]
    else:
        raise MemtuneError(
            f"data file {str(path)!r} has an unsupported suffix {suffix!r}: expected .jsonl, .csv or .parquet"
        )
    if not rows:
        raise MemtuneError(f"data file {str(path)!r} is empty: expected at least one row")
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MemtuneError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
        return [(f"{path} item {i + 1}", _object(r, f"{path} item {i + 1}")) for i, r in enumerate(data)]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MemtuneError(f"{path} line {n}: malformed JSON ({e.msg} at column {e.colno})") from None
        rows.append((f"{path} line {n}", _object(row, f"{path} line {n}")))
    return rows


def _object(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise MemtuneError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def field(row: dict[str, Any], name: str, where: str, required: str) -> Any:
    """`row[name]`, or an error naming the place, the missing field and what a row needs."""
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise MemtuneError(f"{where}: missing field {name!r} (each row needs {required})")
    return value


def _text(value: Any, where: str, name: str) -> str:
    """A text value: a string, or a number (CSV and parquet cells, numeric answers)."""
    if isinstance(value, str):
        return value
    if is_number(value) and math.isfinite(value):
        return str(value)
    raise MemtuneError(f"{where}: field {name!r} must be text, got {type(value).__name__} {str(value)[:40]!r}")


def text_field(row: dict[str, Any], name: str, where: str, required: str) -> str:
    """A required text field (see `field` and `_text`)."""
    return _text(field(row, name, where, required), where, name)


def text_list(value: Any, where: str, name: str) -> list[str]:
    """A list field: a list, a JSON list in text, or `|`-separated text (CSV)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                raise MemtuneError(f"{where}: field {name!r} is not a valid JSON list: {s[:60]!r}") from None
        else:
            return [p.strip() for p in s.split("|") if p.strip()]
    if not isinstance(value, list | tuple):
        raise MemtuneError(f"{where}: field {name!r} must be a list of strings, got {type(value).__name__}")
    return [_text(v, where, name) for v in value]


def _id(row: dict[str, Any]) -> str | None:
    return None if row.get("id") in (None, "") else str(row["id"])


def read_qa(path: str | Path) -> list:
    from memtune.data import QA

    need = '"question" and "answer"'
    return [
        QA(
            question=text_field(row, "question", where, need),
            answer=text_field(row, "answer", where, need),
            aliases=text_list(row.get("aliases"), where, "aliases"),
            paraphrases=text_list(row.get("paraphrases"), where, "paraphrases"),
            id=_id(row),
            statement=None if row.get("statement") in (None, "") else _text(row["statement"], where, "statement"),
        )
        for where, row in read_rows(path)
    ]


def read_documents(path: str | Path) -> list:
    from memtune.data import Document

    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise MemtuneError(f"data file {str(path)!r} does not exist")
        # One document per blank-line-separated block: paragraphs of prose, one per record.
        blocks = [b.strip() for b in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
        docs = [Document(text=b, id=f"{path.name}#{i}") for i, b in enumerate(b for b in blocks if b)]
        if not docs:
            raise MemtuneError(f"data file {str(path)!r} is empty: expected text")
        return docs
    return [Document(text=text_field(row, "text", where, '"text"'), id=_id(row)) for where, row in read_rows(path)]


def read_choices(path: str | Path) -> list:
    from memtune.data import Choice

    need = '"question", "choices" and "label"'
    items = []
    for where, row in read_rows(path):
        choices = text_list(field(row, "choices", where, need), where, "choices")
        label = field(row, "label", where, need)
        try:
            label = int(label)
        except (TypeError, ValueError):
            raise MemtuneError(f"{where}: label {label!r} is not an integer index into choices") from None
        if not 0 <= label < len(choices):
            raise MemtuneError(f"{where}: label {label} is out of range: expected 0..{len(choices) - 1}")
        question = text_field(row, "question", where, need)
        items.append(Choice(question=question, choices=choices, label=label, id=_id(row)))
    return items
