"""Continual-learning experiments: a stream of data learned chunk by chunk, by several methods
from the same base model, with learning and forgetting probed along the way.

An experiment is one YAML (or JSON) file::

    model: smollm2-135m
    memory: {layers: [8, 16, 24], n_keys: 1024}     # retrofit for SMF runs (parallel mode)
    background: {data: prose:background}            # slot statistics for tfidf / kl
    protect: facts/known.jsonl                      # SMF never updates the slots these answers read
    stream: {kind: facts, data: facts/learn.jsonl, size: 200, chunks: 4, target: statement}
    probes: {known: {source: facts/known.jsonl, limit: 200}, text: prose:heldout, every: 1}
    methods:
      - {name: smf, method: smf, top_t: [500, 2000], lr: 1.0, epochs: 10}
      - {name: full, method: full, lr: 1.0e-5, epochs: 5}

A list value in a method expands into one run per value (a sweep). Each run writes its own
folder under the output root — ``config.json``, ``metrics.jsonl`` (training steps and probe
events) and, last, ``results.json`` — atomically: an interrupted run leaves nothing behind and
rerunning the same command skips every run that has its ``results.json``. What the SMF runs
share is made once and kept in the output root: ``base.json`` (the base model's probes),
``calibration/``, ``background/`` and ``protect/``.

Two protocols, both recorded: *immediate* probes the chunk just learned right after learning
it; *final* probes everything at the end of the stream (and ``every`` k chunks on the way).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from memtune import targets
from memtune.batches import IGNORE, Example, encode_documents, first_batches
from memtune.config import CALIBRATIONS, MemoryConfig
from memtune.data import QA, Choice, Document, Source
from memtune.errors import MemtuneError, is_int
from memtune.io import RESULTS, remove_stale_temporaries, run_folder, write_json
from memtune.probes.runner import ProbeConfig, Prober
from memtune.rankers import NEEDS_BACKGROUND
from memtune.targets import mask_predicted, mask_prefix  # noqa: F401 (re-exported)
from memtune.train import LearnConfig, check_options, make_method, peak_rss_mb, reset_peak_rss, train

log = logging.getLogger(__name__)

STREAM_KINDS = ("facts", "documents", "task")
# A method entry learns each chunk for its `epochs`, nothing frozen between chunks, unless it says
# otherwise: the recorded runs were made so (`memtune learn` defaults to the recipe instead).
EXPERIMENT_DEFAULTS = {"until_learned": False, "freeze_learned": False, "protect_learned": False}


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class StreamConfig:
    """What arrives, in which order. `size` items (after a seeded shuffle) in `chunks` parts."""

    kind: Literal["facts", "documents", "task"] = "facts"
    data: Source | None = None
    size: int | None = None
    chunks: int = 1
    shuffle: bool = True
    # facts: train on the bare answer or on the fact stated as a sentence (QA.statement)
    target: Literal["answer", "statement"] = "answer"
    # facts: the loss covers the whole target ("target"), only the answer inside a statement
    # ("answer"; the words before it are teacher-forced context), or the target from its first
    # token that the model being trained does not already predict ("diverge": greedy decoding
    # follows the model's own words up to there, so that is where the answer must be taught)
    loss: Literal["target", "answer", "diverge"] = "target"
    # facts: also train on the first N paraphrases of each question (they then leave the probe)
    augment: int = 0
    # facts: also train K variants of each question with one or two words left out
    # (memtune.paraphrases.word_dropout, as `memtune learn` does by default; paraphrases stay held out)
    word_dropout: int = 0
    # task: held-out items whose accuracy is the learning probe (default: items after `size`)
    eval_data: Source | None = None
    eval_size: int = 200
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.kind not in STREAM_KINDS:
            raise MemtuneError(f"stream.kind={self.kind!r} is invalid: expected one of {', '.join(STREAM_KINDS)}")
        if self.data is None:
            raise MemtuneError("stream.data is missing: name the data to learn")
        if self.target not in ("answer", "statement"):
            raise MemtuneError(f"stream.target={self.target!r} is invalid: expected answer or statement")
        if self.loss not in ("target", "answer", "diverge"):
            raise MemtuneError(f"stream.loss={self.loss!r} is invalid: expected target, answer or diverge")
        for name in ("chunks", "eval_size", "max_length"):
            _positive(f"stream.{name}", getattr(self, name))
        if self.size is not None:
            _positive("stream.size", self.size)
        for name in ("augment", "word_dropout"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise MemtuneError(f"stream.{name}={getattr(self, name)!r} is invalid: expected an integer >= 0")


@dataclass
class BackgroundConfig:
    """Slot statistics for tfidf / kl, computed once per experiment on the retrofitted model."""

    data: Source | None = None
    batches: int = 100
    batch_size: int = 8
    max_length: int = 128
    # calibrate SMF's memory queries on the same data first (memtune.calibrate): standardize, whiten
    calibrate: str | None = None

    def __post_init__(self) -> None:
        if self.calibrate is not None and self.calibrate not in CALIBRATIONS:
            raise MemtuneError(f"background.calibrate={self.calibrate!r} is invalid: expected one of "
                               f"{', '.join(CALIBRATIONS)} (or leave it out)")


@dataclass
class Run:
    name: str
    learn: LearnConfig
    sweep: dict[str, Any]  # the values this run took from a method's lists
    protect: bool = True  # SMF: freeze the slots of the experiment's `protect` questions, if any


@dataclass
class ExperimentConfig:
    model: str
    stream: StreamConfig
    methods: list[dict]
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    memory: dict = field(default_factory=dict)  # MemoryConfig fields for SMF's retrofit
    memory_model: str | None = None  # or: a saved memory checkpoint (then `memory` is unused)
    background: BackgroundConfig | None = None
    # QA whose answers SMF must keep: the slots the model reads answering them (in its own words)
    # are never updated. The probe's known facts and the stream's facts are left out.
    protect: Source | None = None
    seed: int = 0
    name: str | None = None
    description: str | None = None
    save_models: bool = False
    runs: list[Run] = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.methods, list) or not self.methods:
            raise MemtuneError("methods is missing or empty: list at least one method")
        self.runs = expand_methods(self.methods)
        if any(r.learn.method == "smf" for r in self.runs):
            if self.memory_model is None:
                self.memory_config()  # validate now, not after the first run
            ranked = any(r.learn.ranker in NEEDS_BACKGROUND for r in self.runs if r.learn.method == "smf")
            if ranked and (self.background is None or self.background.data is None):
                raise MemtuneError("an SMF run ranks slots with tfidf or kl: add background: {data: SOURCE}")

    def memory_config(self) -> MemoryConfig:
        fields = {"mode": "parallel", **self.memory, "base_model": self.model}
        return _build(MemoryConfig, fields, "memory")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return json.loads(json.dumps(out, default=lambda o: asdict(o)))


def _positive(name: str, value: Any) -> None:
    if not is_int(value) or value <= 0:
        raise MemtuneError(f"{name}={value!r} is invalid: expected a positive integer")


def _build(cls: type, values: dict, where: str):
    """`cls(**values)` with a clear error for an unknown or missing key."""
    if not isinstance(values, dict):
        raise MemtuneError(f"{where} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MemtuneError(f"{where}: unknown key {unknown[0]!r}: expected one of {', '.join(sorted(known))}")
    try:
        return cls(**values)
    except (TypeError, MemtuneError) as e:  # a bad value: say which entry holds it
        raise MemtuneError(f"{where}: {e}") from None


def _parse_source(value: Any, where: str) -> Source:
    """A source name, or a mapping of `Source` fields."""
    if isinstance(value, str):
        return Source(value)
    if isinstance(value, dict):
        return _build(Source, value, where)
    raise MemtuneError(f"{where}={value!r} is invalid: expected a source name or a mapping with 'source'")


def expand_methods(methods: list[dict]) -> list[Run]:
    """Method entries -> runs; every list value is swept (the product of all lists)."""
    runs: list[Run] = []
    for i, entry in enumerate(methods):
        if not isinstance(entry, dict):
            raise MemtuneError(f"methods[{i}] must be a mapping of learn options, got {entry!r}")
        entry = dict(entry)
        base_name = str(entry.pop("name", entry.get("method", "smf")))
        protect = _flag(entry, "protect", True, i)
        for key in ("until_learned", "consolidate"):
            if entry.get(key):
                raise MemtuneError(f"methods[{i}].{key}={entry[key]!r} is for `memtune learn`: an experiment trains "
                                   "each chunk for its epochs (and probes every chunk)")
        given = dict(entry)
        entry = {**EXPERIMENT_DEFAULTS, **entry}
        swept = {k: v for k, v in entry.items() if isinstance(v, list)}
        for values in itertools.product(*swept.values()):
            choice = dict(zip(swept, values))
            try:  # each run's own method (a swept method list has several)
                check_options(str({**given, **choice}.get("method", "smf")), given)
            except MemtuneError as e:
                raise MemtuneError(f"methods[{i}]: {e}") from None
            name = base_name + "".join(f"-{k}={v}" for k, v in choice.items())
            learn = _build(LearnConfig, {**entry, **choice}, f"methods[{i}] ({name})")
            runs.append(Run(name, learn, choice, protect))
    names = [r.name for r in runs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise MemtuneError(f"two runs are named {dup!r}: give each method entry its own name")
    return runs


def _flag(entry: dict, key: str, default: bool, i: int) -> bool:
    value = entry.pop(key, default)
    if not isinstance(value, bool):
        raise MemtuneError(f"methods[{i}].{key}={value!r} is invalid: expected true or false")
    return value


def parse_config(raw: dict, where: str = "config") -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise MemtuneError(f"{where}: expected a mapping at the top level")
    raw = dict(raw)
    if "model" not in raw or "stream" not in raw or "methods" not in raw:
        missing = [k for k in ("model", "stream", "methods") if k not in raw]
        raise MemtuneError(f"{where}: missing key {missing[0]!r} (an experiment needs model, stream and methods)")
    stream = dict(raw["stream"] or {})
    for key in ("data", "eval_data"):
        if stream.get(key) is not None:
            stream[key] = _parse_source(stream[key], f"stream.{key}")
    raw["stream"] = _build(StreamConfig, stream, "stream")
    probes = dict(raw.get("probes") or {})
    for key in ("known", "text"):
        if probes.get(key) is not None:
            probes[key] = _parse_source(probes[key], f"probes.{key}")
    for key in ("qa", "choices", "answers"):
        value = probes.get(key) or []
        value = value if isinstance(value, list) else [value]
        probes[key] = [_parse_source(v, f"probes.{key}") for v in value]
    raw["probes"] = _build(ProbeConfig, probes, "probes")
    if raw.get("background") is not None:
        bg = dict(raw["background"])
        if bg.get("data") is not None:
            bg["data"] = _parse_source(bg["data"], "background.data")
        raw["background"] = _build(BackgroundConfig, bg, "background")
    if raw.get("protect") is not None:
        raw["protect"] = _parse_source(raw["protect"], "protect")
    return _build(ExperimentConfig, raw, where)


def set_option(raw: dict, assignment: str) -> None:
    """Apply ``a.b.c=VALUE`` (VALUE read as YAML) to a raw config, in place."""
    import yaml

    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise MemtuneError(f"--set {assignment!r} is invalid: expected KEY=VALUE, e.g. stream.size=50")
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        if p.isdigit() and isinstance(node, list) and int(p) < len(node):
            node = node[int(p)]
            continue
        if not isinstance(node, dict):
            raise MemtuneError(f"--set {assignment!r}: {p!r} is not a mapping in the config")
        node = node.setdefault(p, {})
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = yaml.safe_load(value)
    elif isinstance(node, dict):
        node[last] = yaml.safe_load(value)
    else:
        raise MemtuneError(f"--set {assignment!r}: cannot set {last!r} there")


def load_config(path: str | Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, dict]:
    """Read and validate an experiment file; returns the config and the raw (overridden) mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MemtuneError(f"experiment config {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MemtuneError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise MemtuneError(f"{path}: expected a mapping at the top level")
    for o in overrides:
        set_option(raw, o)
    return parse_config(raw, str(path)), raw


# --------------------------------------------------------------------------------------------
# The stream


@dataclass
class Chunk:
    """One part of the stream: what is trained on and what probes that it was learned."""

    train: list[Any]  # QA (facts), Document (documents) or Choice (task)
    questions: list[QA]  # facts and documents: the learning probe (empty for task)


@dataclass
class Stream:
    kind: str
    chunks: list[Chunk]
    eval_choices: list[Choice] = field(default_factory=list)  # task: held-out items

    @property
    def questions(self) -> list[QA]:
        return [q for c in self.chunks for q in c.questions]

    @property
    def questions_by_chunk(self) -> list[list[QA]]:
        """What the probe runner asks back (`memtune.probes.Prober.retention`)."""
        return [c.questions for c in self.chunks]


def _split(items: list, n: int) -> list[list]:
    if len(items) < n:
        raise MemtuneError(f"stream.chunks={n} is more than the {len(items)} items in the stream")
    bounds = [round(i * len(items) / n) for i in range(n + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(n)]


def _ordered(items: list, cfg: StreamConfig, seed: int) -> list:
    items = list(items)
    if cfg.shuffle:
        random.Random(seed).shuffle(items)
    return items


def read_document_stream(path: str) -> list[tuple[Document, list[QA]]]:
    """A JSONL/CSV/parquet file of documents, each with the questions it answers::

        {"id": "d1", "text": "...", "questions": [{"question": "...", "answer": "...", "aliases": [...]}]}
    """
    from memtune.data.files import field as required
    from memtune.data.files import read_rows, text_list

    out = []
    for where, row in read_rows(path):
        text = str(required(row, "text", where, '"text" and "questions"'))
        questions = required(row, "questions", where, '"text" and "questions"')
        if not isinstance(questions, list):
            raise MemtuneError(f"{where}: field 'questions' must be a list of {{question, answer}} objects")
        qas = []
        for j, q in enumerate(questions):
            if not isinstance(q, dict) or "question" not in q or "answer" not in q:
                raise MemtuneError(f"{where}: questions[{j}] needs 'question' and 'answer'")
            qas.append(QA(str(q["question"]), str(q["answer"]), text_list(q.get("aliases"), where, "aliases"),
                          text_list(q.get("paraphrases"), where, "paraphrases"), q.get("id")))
        out.append((Document(text, None if row.get("id") is None else str(row["id"])), qas))
    return out


def load_stream(cfg: StreamConfig, seed: int) -> Stream:
    from memtune.data import load_choices, load_qa

    src = cfg.data
    if cfg.kind == "facts":
        items = _ordered(load_qa(src.source, **src.kwargs()), cfg, seed)[: cfg.size]
        if cfg.target == "statement":
            missing = next((q for q in items if not q.statement), None)
            if missing is not None:
                raise MemtuneError(f"stream.target=statement but fact {missing.id or missing.question!r} has no "
                                   "statement: add a 'statement' field to the data or use target: answer")
        return Stream("facts", [Chunk(part, part) for part in _split(items, cfg.chunks)])
    if cfg.kind == "documents":
        if src.split or src.data_file or src.limit:
            raise MemtuneError("stream.data of a document stream is a file: split/data_file/limit do not apply")
        docs = _ordered(read_document_stream(src.source), cfg, seed)[: cfg.size]
        return Stream("documents", [Chunk([d for d, _ in part], [q for _, qs in part for q in qs])
                                    for part in _split(docs, cfg.chunks)])
    items = _ordered(load_choices(src.source, **src.kwargs()), cfg, seed)
    size = cfg.size or max(len(items) - cfg.eval_size, 1)
    if cfg.eval_data is not None:
        held_out = load_choices(cfg.eval_data.source, **cfg.eval_data.kwargs())[: cfg.eval_size]
    else:
        held_out = items[size : size + cfg.eval_size]
    if not held_out:
        raise MemtuneError(f"stream.data {src.source!r} leaves no held-out items after stream.size={size}: "
                           "lower stream.size or give stream.eval_data")
    return Stream("task", [Chunk(part, []) for part in _split(items[:size], cfg.chunks)], held_out)


def fact_examples(items: list[QA], cfg: StreamConfig, tokenizer, model: nn.Module | None = None) -> list[Example]:
    """Each fact as the stream trains it (`memtune.targets.fact_examples` with the stream's
    target, loss, augment and max_length; with word_dropout, each question's variants among
    `items`, `memtune.paraphrases.word_dropout`, after it). `loss: diverge` needs the `model` that
    will learn them."""
    from memtune.paraphrases import word_dropout

    more = word_dropout(items, cfg.word_dropout) if cfg.word_dropout else None
    return targets.fact_examples(items, tokenizer, cfg.target, cfg.loss, cfg.augment, cfg.max_length, model,
                                 more_questions=more)


def training_examples(chunk: Chunk, kind: str, cfg: StreamConfig, tokenizer,
                      model: nn.Module | None = None) -> list[Example]:
    from memtune.probes.likelihood import split_encode, truncate_left

    if kind == "facts":
        return fact_examples(chunk.train, cfg, tokenizer, model)
    if kind == "documents":
        return encode_documents(tokenizer, [d.text for d in chunk.train], cfg.max_length)
    out = []  # task: the right choice continues the question, scored as the choice probe scores it
    for item in chunk.train:
        ids, start = truncate_left(*split_encode(tokenizer, item.question, " " + item.choices[item.label]),
                                    cfg.max_length, f"the right choice of {item.question[:60]!r}")
        out.append(Example(ids, [IGNORE] * start + ids[start:]))
    return out


# --------------------------------------------------------------------------------------------
# Running


def select_runs(config: ExperimentConfig, only: list[str] | None) -> list[Run]:
    """The runs `only` names (`--only`), in config order; all when it is empty."""
    runs = [r for r in config.runs if not only or r.name in only]
    if only and len(runs) < len(set(only)):
        missing = sorted(set(only) - {r.name for r in runs})
        raise MemtuneError(f"--only {missing[0]!r} names no run: expected one of {', '.join(r.name for r in config.runs)}")
    return runs


class Experiment:
    """Runs every method of a config over the same stream, one run folder each, resumably."""

    def __init__(self, config: ExperimentConfig, out: str | Path, progress: bool = True):
        self.config, self.out, self.progress = config, Path(out), progress
        self._base: nn.Module | None = None
        self._background = None
        self._protect = None
        self._background_examples: list[Example] | None = None

    # -- models ------------------------------------------------------------------------------
    def load_base(self):
        from memtune.models import load_model

        return load_model(self.config.model)

    def load_memory_model(self):
        from memtune.models import load_model
        from memtune.retrofit import retrofit

        if self.config.memory_model:
            return load_model(self.config.memory_model)
        model, tokenizer = self.load_base()
        torch.manual_seed(self.config.seed)  # the same keys in every SMF run: one background fits all
        retrofit(model, self.config.memory_config())
        return model, tokenizer

    def reference(self) -> nn.Module:
        """The untouched base model, for drift of full finetuning (loaded once)."""
        if self._base is None:
            self._base = self.load_base()[0].eval()
        return self._base

    def background_examples(self, model: nn.Module, stream_cfg: StreamConfig, tokenizer) -> list[Example]:
        """The background data, formatted as the stream trains it, in a seeded order (made once:
        `loss: diverge` asks the untrained model, which every SMF run starts from). Facts of the
        stream itself are left out: the background stands for what the model must keep. Of a
        fact file, only the facts the statistics' batches can read are formatted (a fact's
        paraphrases together)."""
        from memtune.data import load_documents, load_qa
        from memtune.runs import detect_kind

        if self._background_examples is not None:
            return self._background_examples
        cfg = self.config.background
        src = cfg.data
        order = random.Random(self.config.seed)
        if detect_kind(src.source) == "qa":  # formatted as the stream trains facts
            items = load_qa(src.source, **src.kwargs())
            if stream_cfg.kind == "facts":
                learned = {q.question for q in load_stream(stream_cfg, self.config.seed).questions}
                items = [q for q in items if q.question not in learned]
            order.shuffle(items)
            # each fact gives one example or more: the first batches x batch_size facts are all the
            # statistics read, and `loss: diverge` need not ask the model about the rest
            examples = fact_examples(items[: cfg.batches * cfg.batch_size], stream_cfg, tokenizer, model)
        else:
            examples = encode_documents(tokenizer, [d.text for d in load_documents(src.source, **src.kwargs())],
                                        cfg.max_length)
            order.shuffle(examples)
        self._background_examples = examples
        return examples

    def calibrate(self, model: nn.Module, stream_cfg: StreamConfig, tokenizer) -> None:
        """Calibrate the memory queries on the background data, when the config asks for it:
        once, kept in `out/calibration` for every later SMF run (all start from the same retrofit)."""
        from memtune.calibrate import calibrate_queries, load_calibration, save_calibration

        cfg = self.config.background
        if cfg is None or cfg.calibrate is None or self.config.memory_model:
            return
        path = self.out / "calibration"
        if path.is_dir():
            load_calibration(model, path)
            return
        examples = self.background_examples(model, stream_cfg, tokenizer)
        n, batches = first_batches(examples, tokenizer.pad_token_id, cfg.batches, cfg.batch_size)
        calibrate_queries(model, batches, cfg.calibrate, n_batches=n, progress=self.progress)
        save_calibration(model, path)

    def background(self, model: nn.Module, stream_cfg: StreamConfig, tokenizer):
        """Slot statistics of the background data, computed once and kept in `out/background`."""
        from memtune.stats import background_stats
        from memtune.stats import Background

        path = self.out / "background"
        if (path / "background.json").is_file():
            if self._background is None:
                self._background = Background.load(path)
            return self._background
        cfg = self.config.background
        examples = self.background_examples(model, stream_cfg, tokenizer)
        stats = background_stats(model, examples, tokenizer.pad_token_id, cfg.batches, cfg.batch_size,
                                 progress=self.progress)
        stats.meta |= {"source": cfg.data.source, "batch_size": cfg.batch_size, "max_length": cfg.max_length}
        stats.save(path, overwrite=True)
        self._background = stats
        log.info("background: %d batches of %s saved to %s", stats.n_batches, cfg.data.source, path)
        return stats

    def protect_questions(self, src: Source) -> list[str]:
        """The questions of `src` that are neither streamed nor probed as known facts."""
        from memtune.data import load_qa

        c = self.config
        held_out = {q.question for q in load_stream(c.stream, c.seed).questions}
        if c.probes.known is not None:
            held_out |= {q.question for q in load_qa(c.probes.known.source, **c.probes.known.kwargs())}
        return [q.question for q in load_qa(src.source, **src.kwargs()) if q.question not in held_out]

    def protected(self, model: nn.Module, tokenizer):
        """Slot reads of the model answering the `protect` questions (`protect_questions`) in its
        own words: made once and kept in `out/protect`. `model` must answer as the base model
        does (SMF's starting point: retrofitted, values still zero)."""
        from memtune.stats import Background

        path = self.out / "protect"
        if self._protect is None and (path / "background.json").is_file():
            self._protect = Background.load(path)
        if self._protect is not None:
            return self._protect
        src = self.config.protect
        questions = self.protect_questions(src)
        if not questions:
            raise MemtuneError(f"protect={src.source!r} holds no questions besides the probed and streamed ones")
        from memtune.recipe import own_answer_stats

        stats = own_answer_stats(model, tokenizer, questions, self.config.probes.max_new_tokens,
                                 self.config.background.batch_size if self.config.background else 8, self.progress)
        stats.meta |= {"source": src.source, "questions": len(questions)}
        stats.save(path, overwrite=True)
        self._protect = stats
        log.info("protect: %d questions of %s; slots frozen per layer %s", len(questions), src.source,
                 {k: int((v > 0).sum()) for k, v in stats.df.items()})
        return stats

    # -- runs --------------------------------------------------------------------------------
    def run_all(self, only: list[str] | None = None) -> list[dict]:
        c = self.config
        runs = select_runs(c, only)
        stream = load_stream(c.stream, c.seed)  # every input is checked before anything is written
        model, tokenizer = self.load_base()
        self.prober = Prober(c.probes, tokenizer, stream.eval_choices, c.stream.augment)
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)  # left by a killed run; not those of a running one
        self._check_same_config()
        log.info("%s stream: %d chunks, %d items; %d runs: %s", stream.kind, len(stream.chunks),
                 sum(len(ch.train) for ch in stream.chunks), len(runs), ", ".join(r.name for r in runs))
        base = self.base_results(model, stream)
        del model
        for run in runs:  # before anything trains: a finished run is reused only as it was run
            if (self.out / run.name / RESULTS).is_file():
                self._check_same_run(run)
        results = []
        for i, run in enumerate(runs):
            done = self.out / run.name / RESULTS
            if done.is_file():
                log.info("[%d/%d] %s: done already, skipped", i + 1, len(runs), run.name)
                results.append(json.loads(done.read_text()))
                continue
            log.info("[%d/%d] %s", i + 1, len(runs), run.name)
            results.append(self.run_one(run, stream, base))
        return results

    def _check_same_config(self) -> None:
        """Resuming into a folder made by a different config would mix incomparable runs."""
        path = self.out / "experiment.json"
        mine = self.config.to_dict()
        if path.is_file():
            theirs = json.loads(path.read_text())
            if theirs != mine:
                # Adding (or dropping) methods is fine: each run folder records its own method.
                changed = [k for k in _changed(mine, theirs) if k != "methods"]
                if changed:
                    raise MemtuneError(f"{self.out} holds an experiment with a different {changed[0]!r}: "
                                       "use another --out, or the same config to resume")
        write_json(path, mine)

    def _check_same_run(self, run: Run) -> None:
        """A finished run is reused only if it ran with the options `run` has now."""
        path = self.out / run.name / "config.json"
        try:
            theirs = json.loads(path.read_text()).get("learn")
        except (OSError, ValueError, AttributeError):  # missing, not JSON, not an object
            theirs = None
        if not isinstance(theirs, dict):
            raise MemtuneError(f"{path} is missing or holds no run options: remove {self.out / run.name} to rerun "
                               "it, or use another --out")
        mine = json.loads(json.dumps(run.learn.to_dict()))  # as config.json holds it (tuples as lists)
        # an option added since that run was made ran as its default then
        added = {f.name: f.default for f in dataclasses.fields(LearnConfig)
                 if f.name not in theirs and f.default is not dataclasses.MISSING}
        theirs = {**json.loads(json.dumps(added)), **theirs}
        changed = _changed(mine, theirs)
        if changed:
            raise MemtuneError(f"{self.out / run.name} ran with {changed[0]}={theirs.get(changed[0])!r}, the config "
                               f"now says {mine.get(changed[0])!r}: remove that folder to rerun it, or use another --out")

    def base_results(self, model: nn.Module, stream: Stream) -> dict:
        """Every probe on the base model before learning (kept in `out/base.json`)."""
        path = self.out / "base.json"
        if path.is_file():
            return json.loads(path.read_text())
        prober = self.prober
        start = time.perf_counter()
        result = {"learning": prober.learning(model, stream.questions_by_chunk),
                  "paraphrases": prober.paraphrases(model, stream.questions)
                  if self.config.probes.paraphrases and stream.kind != "task" else None,
                  **prober.forgetting(model, None), "seconds": round(time.perf_counter() - start, 1)}
        write_json(path, result)
        log.info("base model: %s", _brief(result))
        return result

    def start(self, cfg: LearnConfig, protect: bool = True):
        """The model a run starts from (SMF: retrofitted and calibrated), its tokenizer, and the
        method that will train it (SMF: with the background statistics its ranker needs and,
        with `protect`, the experiment's protected slots frozen)."""
        smf = cfg.method == "smf"
        model, tokenizer = self.load_memory_model() if smf else self.load_base()
        if smf:
            self.calibrate(model, self.config.stream, tokenizer)
        ranked = smf and cfg.ranker in NEEDS_BACKGROUND
        background = self.background(model, self.config.stream, tokenizer) if ranked else None
        frozen = self.protected(model, tokenizer) if smf and protect and self.config.protect else None
        return model, tokenizer, make_method(cfg, background, frozen)

    def run_one(self, run: Run, stream: Stream, base: dict) -> dict:
        c, cfg = self.config, run.learn
        smf = cfg.method == "smf"
        model, tokenizer, method = self.start(cfg, run.protect)
        prober = self.prober
        reference = None if smf or cfg.method == "lora" else self.reference()
        with run_folder(self.out / run.name, overwrite=True) as folder:
            folder.write_config({"run": run.name, "sweep": run.sweep, "learn": cfg.to_dict(), "experiment": c.to_dict()})
            reset_peak_rss()
            train_time, immediate, seen, steps, record = 0.0, [], 0, 0, {}
            for k, chunk in enumerate(stream.chunks):
                examples = training_examples(chunk, stream.kind, c.stream, tokenizer, model)
                seen += len(chunk.train)

                def log_step(r: dict, k=k) -> None:
                    folder.log({"event": "step", "chunk": k + 1, **r})

                t = time.perf_counter()
                model, history = train(model, tokenizer, examples, cfg, method, on_step=log_step,
                                       progress=self.progress)
                if cfg.protect_learned:  # what the chunk's data reads now, at every position
                    method.keep_learned(model, examples, tokenizer.pad_token_id, cfg.batch_size)
                train_time += time.perf_counter() - t
                steps += len(history)
                record = {"event": "probe", "chunk": k + 1, "chunks": len(stream.chunks), "seen": seen}
                if (k + 1) % c.probes.every == 0 or k + 1 == len(stream.chunks):
                    learning, by_chunk = prober.retention(model, stream.questions_by_chunk[: k + 1])
                    now = by_chunk[-1] if by_chunk else None  # the chunk just learned, in the same pass
                    record |= {"learning": learning, "learning_by_chunk": by_chunk,
                               **prober.forgetting(model, reference)}
                else:
                    now = prober.learning(model, [chunk.questions]) if stream.kind != "task" else None
                immediate.append(now)
                record |= {"immediate": now, "train_time_s": round(train_time, 1)}
                folder.log(record)
                log.info("%s chunk %d/%d: %s", run.name, k + 1, len(stream.chunks), _brief(record))
            final = {k: v for k, v in record.items() if k not in ("event", "chunk", "chunks", "immediate")}
            if c.probes.paraphrases and stream.kind != "task":
                final["paraphrases"] = prober.paraphrases(model, stream.questions)
            scored = [x for x in immediate if x is not None]
            results = {
                "run": run.name, "method": cfg.method, "sweep": run.sweep, "stream": stream.kind,
                "learning_immediate": sum(scored) / len(scored) if scored else None,
                **final, "base": base, "train_time_s": round(train_time, 1),
                "peak_rss_mb": round(peak_rss_mb(), 1), "trainable_parameters": method.trainable,
                "steps": steps,
            }
            if smf:  # the table is trainable, but only the rows ever selected changed
                results["touched_rows"] = sum(v.numel() for v in method.touched.values())
                results["protected_rows"] = sum(v.numel() for v in method.protected.values())
                results["kept_rows"] = sum(v.numel() for v in method.kept.values())  # protect_learned
                results["updated_parameters"] = results["touched_rows"] * method.bank.values[0].weight.shape[1]
            if c.save_models:
                method.save(model, tokenizer, folder.path / "model")
            folder.write_results(results)
        log.info("%s done: %s", run.name, _brief(results))
        return results


def _changed(mine: dict, theirs: dict) -> list[str]:
    """The keys whose values differ between two option dicts (a key one lacks counts as None), sorted."""
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


def _brief(r: dict) -> str:
    keys = ("learning", "immediate", "paraphrases", "known", "perplexity", "drift")
    return ", ".join(f"{k} {r[k]:.3f}" for k in keys if isinstance(r.get(k), float))
