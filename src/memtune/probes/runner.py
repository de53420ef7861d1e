"""The probe runner: the configured probes on a model, one number each, the data of each probe
loaded once.

*Learning* asks what the model was taught, passed as plain lists: the questions of each part it
learned (`retention`, `learning`, `paraphrases`), or a task's held-out items. *Forgetting* asks
what it was never taught (`forgetting`): known facts, held-out text (perplexity, drift from the
base model) and further QA, multiple-choice and answer-loss sources, all named in `ProbeConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedTokenizerBase

from memtune.data import QA, Choice, Source, load_choices, load_documents, load_qa
from memtune.errors import MemtuneError, is_int
from memtune.probes.drift import builtin_base, drift
from memtune.probes.likelihood import answer_loss, choice_accuracy, perplexity
from memtune.probes.qa import qa_accuracy


@dataclass
class ProbeConfig:
    """What is measured, and how often (`every` k chunks; the last chunk always)."""

    every: int = 1
    known: Source | None = None  # QA the model answers right before learning (forgetting)
    text: Source | None = None  # held-out text: perplexity and drift from the base model
    qa: list[Source] = field(default_factory=list)  # further QA forgetting probes (F1, contains)
    choices: list[Source] = field(default_factory=list)  # multiple-choice forgetting probes
    answers: list[Source] = field(default_factory=list)  # answer-loss forgetting probes
    paraphrases: bool = True  # learned facts asked in other words, at the end
    max_new_tokens: int = 24
    batch_size: int = 32
    max_length: int = 256  # perplexity / drift windows

    def __post_init__(self) -> None:
        for name in ("every", "max_new_tokens", "batch_size", "max_length"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise MemtuneError(f"probes.{name}={value!r} is invalid: expected a positive integer")


class Prober:
    """Runs the configured probes on a model; loads each probe's data once.

    `held_out`: a task's held-out multiple-choice items, when what was learned is a task rather
    than facts: learning is then their accuracy (there are no questions to ask back). `augment`:
    how many paraphrases of each learned question were trained on (`paraphrases` skips them).
    """

    def __init__(self, cfg: ProbeConfig, tokenizer: PreTrainedTokenizerBase, held_out: list[Choice] | None = None,
                 augment: int = 0):
        self.cfg, self.tokenizer, self.held_out, self.augment = cfg, tokenizer, held_out or [], augment
        self.known = load_qa(cfg.known.source, **cfg.known.kwargs()) if cfg.known else []
        self.text = load_documents(cfg.text.source, **cfg.text.kwargs()) if cfg.text else []
        self.qa = {s.source: load_qa(s.source, **s.kwargs()) for s in cfg.qa}
        self.choices = {s.source: load_choices(s.source, **s.kwargs()) for s in cfg.choices}
        self.answers = {s.source: load_qa(s.source, **s.kwargs()) for s in cfg.answers}

    def accuracy(self, model: nn.Module, items: list[QA]) -> float | None:
        """Contains-accuracy of generated answers to `items` (None when there are none)."""
        if not items:
            return None
        return qa_accuracy(model, self.tokenizer, items, max_new_tokens=self.cfg.max_new_tokens,
                           batch_size=self.cfg.batch_size, paraphrases=False, progress=False)["contains"]

    def learning(self, model: nn.Module, chunks: list[list[QA]]) -> float | None:
        """Accuracy on what `chunks` taught: their questions, or the task's held-out items."""
        return self.retention(model, chunks)[0]

    def retention(self, model: nn.Module, chunks: list[list[QA]]) -> tuple[float | None, list[float | None] | None]:
        """`learning`, and the accuracy on each chunk's questions (None for a chunk without
        questions, and instead of the list for a task): how much of each chunk is kept as later
        ones are learned. One pass over the questions."""
        if self.held_out:
            r = choice_accuracy(model, self.tokenizer, self.held_out, batch_size=max(1, self.cfg.batch_size // 4),
                                progress=False)
            return r["accuracy"], None
        items = [q for questions in chunks for q in questions]
        if not items:
            return None, None
        r = qa_accuracy(model, self.tokenizer, items, max_new_tokens=self.cfg.max_new_tokens,
                        batch_size=self.cfg.batch_size, paraphrases=False, predictions=True, progress=False)
        correct = iter(p["correct"] for p in r["predictions"])
        by_chunk = [sum(next(correct) for _ in questions) / len(questions) if questions else None
                    for questions in chunks]
        return r["contains"], by_chunk

    def paraphrases(self, model: nn.Module, items: list[QA]) -> float | None:
        """Learned questions asked in the words not trained on (after the `augment` that were)."""
        asked = [dataclasses.replace(q, question=p, paraphrases=[])
                 for q in items for p in q.paraphrases[self.augment :]]
        return self.accuracy(model, asked)

    def forgetting(self, model: nn.Module, base: nn.Module | None) -> dict:
        """Known-fact accuracy, held-out perplexity and drift (from `base`, or the model's own
        when it has one: `memtune.probes.drift`), and the extra probes."""
        c, out = self.cfg, {}
        if self.known:
            out["known"] = self.accuracy(model, self.known)
        if self.text:
            out["perplexity"] = perplexity(model, self.tokenizer, self.text, max_length=c.max_length,
                                           stride=c.max_length // 2, batch_size=max(1, c.batch_size // 8),
                                           progress=False)["perplexity"]
            if base is not None or builtin_base(model) is not None:
                out["drift"] = drift(model, self.tokenizer, self.text, base=base, max_length=c.max_length,
                                     batch_size=max(1, c.batch_size // 8), progress=False)["kl"]
        for name, items in self.qa.items():
            r = qa_accuracy(model, self.tokenizer, items, max_new_tokens=c.max_new_tokens,
                            batch_size=c.batch_size, paraphrases=False, progress=False)
            out[f"qa:{name}"] = {"f1": r["f1"], "contains": r["contains"]}
        for name, items in self.choices.items():
            out[f"choice:{name}"] = choice_accuracy(model, self.tokenizer, items, batch_size=max(1, c.batch_size // 4),
                                                    progress=False)["accuracy"]
        for name, items in self.answers.items():
            out[f"answer-loss:{name}"] = answer_loss(model, self.tokenizer, items, batch_size=max(1, c.batch_size // 4),
                                                     progress=False)["loss"]
        return out
