"""Prose from Python's own reference documentation (`pydoc_data.topics`): offline general text.

Each topic (``assert``, ``calls``, ``class`` ...) is cut into passages of whole paragraphs of at
most ~1,500 characters, and each topic goes to one part by a hash of its name (so the split does
not depend on which topics a Python version ships): about a fifth of the topics are
``heldout`` (perplexity and drift probes), the rest ``background`` (e.g. replay text during
training). Passages that several topics repeat are kept once — in ``heldout`` if any of their
topics is held out — so no text appears in both parts.
"""

from __future__ import annotations

import hashlib
import re

from memtune.data import Document
from memtune.errors import MemtuneError

PARTS = ("background", "heldout")
HELDOUT_PERCENT = 20
MAX_CHARS = 1500


def part_of(topic: str) -> str:
    bucket = int(hashlib.sha256(topic.encode()).hexdigest(), 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "background"


def _passages(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Consecutive paragraphs joined up to `max_chars` (a longer paragraph stays whole)."""
    out, current = [], ""
    for para in (p.strip("\n") for p in re.split(r"\n\s*\n", text)):
        if not para.strip():
            continue
        if current and len(current) + len(para) + 2 > max_chars:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


def prose_documents(part: str | None = None) -> list[Document]:
    """Passages of the Python reference: all of them, or one part (`background` | `heldout`)."""
    if part is not None and part not in PARTS:
        raise MemtuneError(f"unknown prose source {'prose:' + part!r}: expected prose, prose:background or prose:heldout")
    from pydoc_data.topics import topics

    passages = {name: [(topic, i, text) for topic in sorted(topics) if part_of(topic) == name
                       for i, text in enumerate(_passages(topics[topic]))] for name in PARTS}
    # Some topics repeat passages of others: a passage held out anywhere is held out everywhere.
    heldout_texts = {text for _, _, text in passages["heldout"]}
    seen: set[str] = set()
    docs = []
    for name in PARTS if part is None else (part,):
        for topic, i, text in passages[name]:
            if text in seen or (name == "background" and text in heldout_texts):
                continue
            seen.add(text)
            docs.append(Document(text=text, id=f"prose/{topic}#{i}"))
    return docs
