"""The `learn` and `background` stages: thin entry points over the library (`memtune.recipe`,
`memtune.stats`) that write one run folder each, atomically (a failed or interrupted run
leaves nothing behind)."""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from memtune import distributed
from memtune.batches import DATA_KINDS, Example, encode_documents, encode_qa
from memtune.errors import MemtuneError
from memtune.io import check_output_free, remove_stale_temporaries, run_folder
from memtune.recipe import RecipeConfig
from memtune.stats import background_stats
from memtune.train import LearnConfig, peak_rss_mb

log = logging.getLogger(__name__)

DOCUMENT_SOURCES = ("prose", "wikitext", "oasst1")


def detect_kind(source: str) -> str:
    """'qa' or 'documents' from a file's first record or a source name."""
    path = Path(source)
    if path.suffix == ".txt":
        return "documents"
    if path.suffix == ".jsonl" and path.is_file():
        with path.open() as f:
            for line in f:
                if line.strip():
                    try:
                        first = json.loads(line)
                    except json.JSONDecodeError:
                        raise MemtuneError(f"{source}:1: not valid JSON") from None
                    return "qa" if isinstance(first, dict) and "question" in first else "documents"
        raise MemtuneError(f"data file {source!r} is empty: expected JSONL records")
    return "documents" if source.split(":")[0] in DOCUMENT_SOURCES else "qa"


def load_items(source: str, kind: str = "auto", limit: int | None = None) -> tuple[str, list]:
    """('qa', [QA]) or ('documents', [Document]) of a data source (`kind` auto: detected)."""
    from memtune.data import load_documents, load_qa

    if kind not in DATA_KINDS:
        raise MemtuneError(f"format={kind!r} is invalid: expected one of {', '.join(DATA_KINDS)}")
    kind = detect_kind(source) if kind == "auto" else kind
    items = load_qa(source, limit=limit) if kind == "qa" else load_documents(source, limit=limit)
    if not items:
        raise MemtuneError(f"data {source!r} holds no examples")
    return kind, items


def load_examples(source: str, tokenizer, kind: str = "auto", max_length: int = 256,
                  limit: int | None = None) -> tuple[str, list[Example]]:
    """A data source as training examples: QA with the loss on the bare answer, documents on
    every token."""
    kind, items = load_items(source, kind, limit)
    if kind == "qa":
        return kind, encode_qa(tokenizer, [(q.question, q.answer) for q in items], max_length)
    return kind, encode_documents(tokenizer, [d.text for d in items], max_length)


def provenance() -> dict:
    """Git revision and package versions, for results.json."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    versions = {}
    for pkg in ("memtune", "torch", "transformers", "peft", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"git_revision": rev, "versions": versions}


@dataclass
class LearnRun:
    model: str
    data: str
    out: str
    config: LearnConfig
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    format: str = "auto"
    limit: int | None = None
    overwrite: bool = False
    progress: bool = True


def run_learn(run: LearnRun) -> dict:
    """Learn `run.data` into `run.model` with the recipe (`memtune.recipe.learn`); writes
    `run.out/` with config.json (options, and what each recipe step did), metrics.jsonl, model/
    (for SMF a memory checkpoint with its ledger) and results.json. Returns the results."""
    from memtune.models import load_model, portable_name
    from memtune.recipe import learn

    cfg = run.config
    check_output_free(run.out, run.overwrite)
    remove_stale_temporaries(Path(run.out).absolute().parent)  # left by a killed run
    kind, items = load_items(run.data, run.format, run.limit)
    model, tokenizer = load_model(run.model, device=distributed.local_device())
    if kind == "qa":  # an answer that --max-length would cut fails now, before minutes of setup
        encode_qa(tokenizer, [(q.question, q.answer) for q in items], cfg.max_length)
    recipe = {k: portable_name(v) if k in ("background", "protect", "keep") and isinstance(v, str) else v
              for k, v in run.recipe.to_dict().items()}  # folders reload from any working directory
    # Under torchrun only rank 0 writes run.out; the other ranks' tmp is thrown away.
    with run_folder(run.out, run.overwrite, distributed.main_process_dir) as folder:
        result = learn(model, tokenizer, items, cfg, run.recipe, source=portable_name(run.data), on_step=folder.log,
                       progress=run.progress)
        history, steps = result.history, result.recipe
        folder.write_config({"model": portable_name(run.model), "data": portable_name(run.data),
                                         "format": kind, "limit": run.limit,
                                         "learn": cfg.to_dict(), "recipe": recipe, "steps": steps})
        if distributed.is_main() or distributed.holds_shards(result.model):  # a sharded table is gathered by all ranks
            result.method.save(result.model, tokenizer, folder.path / "model")
        results = {
            "method": cfg.method, "items": len(items), "examples": result.examples, "steps": len(history),
            "learned": steps.get("learned"),
            "final_loss": history[-1]["loss"] if history else None,
            "first_loss": history[0]["loss"] if history else None,
            "setup_time_s": steps["setup_s"], "train_time_s": steps["train_s"],
            "trainable_parameters": result.method.trainable, "peak_rss_mb": round(peak_rss_mb(), 1),
            "mean_step_time_s": round(sum(h["step_time_s"] for h in history) / max(len(history), 1), 4),
            **({"touched_rows": history[-1]["touched_rows"]} if history and "touched_rows" in history[-1] else {}),
            **provenance(),
        }
        folder.write_results(results)
    right = steps.get("learned") or {}
    log.info("learned %d items in %d steps (setup %.0f s, training %.0f s)%s; run saved to %s", len(items),
             len(history), steps["setup_s"], steps["train_s"],
             f", {right['right']}/{right['items']} answered right" if right else "", run.out)
    return results


def run_background(model_name: str, source: str, out: str, n_batches: int = 200, batch_size: int = 8,
                   max_length: int = 128, kind: str = "auto", count_positions: str = "loss",
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Slot statistics of `source` as read by `model_name` (a memory checkpoint), saved to `out`.

    QA sources are formatted exactly as `learn` formats them, so a background of chat-formatted
    questions looks like the data being learned (the lesson of DESIGN.md)."""
    from memtune.models import load_model, portable_name

    if n_batches <= 0 or batch_size <= 0:
        raise MemtuneError(f"n_batches={n_batches}, batch_size={batch_size}: expected positive integers")
    check_output_free(out, overwrite)
    model, tokenizer = load_model(model_name)
    kind, examples = load_examples(source, tokenizer, kind, max_length)
    stats = background_stats(model, examples, tokenizer.pad_token_id, n_batches, batch_size, count_positions, progress)
    n = stats.n_batches
    if n < n_batches:
        log.warning("%s gives %d batches of %d, fewer than the %d asked for", source, n, batch_size, n_batches)
    stats.meta |= {"source": source, "format": kind, "batch_size": batch_size, "max_length": max_length,
                   "count_positions": count_positions, "memory_model": portable_name(model_name)}
    if distributed.is_main():  # under torchrun every rank reads every batch (sharded tables need all ranks)
        stats.save(out, overwrite=overwrite)
    read = {k: int((v > 0).sum()) for k, v in stats.df.items()}
    log.info("background: %d batches of %s; slots read per layer %s; saved to %s", n, source, read, out)
    return {"n_batches": n, "slots_read": read}
