"""Continual-learning experiments end to end on a tiny model: streams, methods, resume, report,
the shipped configs, and bad configs."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from memtune.cli import main
from memtune.errors import MemtuneError
from memtune.experiment import Experiment, expand_methods, fact_examples, load_config, parse_config
from tiny import cli_error

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
TINY_MEMORY = {"layers": [1], "n_keys": 16, "heads": 2, "knn": 4, "k_dim": 8}


def facts(n, offset=0):
    return [{"question": f"What is the capital of Zorbia {i}?", "answer": f"Quen{i}",
             "paraphrases": [f"Which city is the capital of Zorbia {i}?"],
             "statement": f"The capital of Zorbia {i} is Quen{i}.", "id": f"z/{i}"}
            for i in range(offset, offset + n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def config(tiny_model_dir, tmp_path):
    """Two methods (SMF with tfidf, full finetuning) over 6 facts in 2 chunks."""
    return {
        "name": "tiny",
        "model": str(tiny_model_dir),
        "memory": dict(TINY_MEMORY),
        "background": {"data": "prose:background", "batches": 3, "batch_size": 2, "max_length": 32},
        "stream": {"kind": "facts", "data": write_jsonl(tmp_path / "learn.jsonl", facts(6)), "chunks": 2,
                   "target": "statement"},
        "probes": {"known": write_jsonl(tmp_path / "known.jsonl", facts(3, offset=10)),
                   "text": {"source": "prose:heldout", "limit": 2}, "max_new_tokens": 4, "max_length": 32},
        "methods": [{"name": "smf", "method": "smf", "top_t": 8, "lr": 1.0, "epochs": 2, "batch_size": 3},
                    {"name": "full", "method": "full", "lr": 1e-3, "epochs": 2, "batch_size": 3}],
    }


def write_config(tmp_path, raw, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_two_methods_end_to_end_and_report(config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["experiment", write_config(tmp_path, config), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["background", "base.json", "experiment.json", "full", "report", "smf"]
    for name in ("smf", "full"):
        run = out / name
        assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl", "results.json"]
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        probes = [e for e in events if e["event"] == "probe"]
        steps = [e for e in events if e["event"] == "step"]
        assert [p["chunk"] for p in probes] == [1, 2] and [p["seen"] for p in probes] == [3, 6]
        assert len(steps) == 2 * 2  # 2 chunks x 2 epochs x 1 batch of 3
        assert {"learning", "immediate", "known", "perplexity", "drift"} <= set(probes[-1])
        assert len(probes[-1]["learning_by_chunk"]) == 2 and probes[-1]["learning"] == pytest.approx(
            sum(probes[-1]["learning_by_chunk"]) / 2)
        results = json.loads((run / "results.json").read_text())
        assert results["steps"] == 4 and results["trainable_parameters"] > 0 and results["peak_rss_mb"] > 0
        assert 0 <= results["learning"] <= 1 and results["paraphrases"] is not None
        assert results["base"]["known"] == json.loads((out / "base.json").read_text())["known"]
    smf = json.loads((out / "smf" / "results.json").read_text())
    assert 0 < smf["touched_rows"] <= 2 * 2 * 8  # top-T per step, 4 steps, one table
    assert smf["updated_parameters"] == smf["touched_rows"] * 32  # rows x hidden size
    full = json.loads((out / "full" / "results.json").read_text())
    assert full["drift"] > smf["drift"] >= 0  # full finetuning moves every weight
    report = (out / "report" / "report.md").read_text()
    assert "| smf | smf |" in report and "| full | full |" in report and "base model" in report
    for png in ("curves.png", "frontier.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["report", str(out / "smf"), str(out / "full"), "--out", str(tmp_path / "r2")]) == 0
    assert "| full | full |" in capsys.readouterr().out


def test_statement_target_is_trained(config, tmp_path, tokenizer):
    from memtune.experiment import load_stream, training_examples

    cfg = parse_config(config)
    stream = load_stream(cfg.stream, cfg.seed)
    examples = training_examples(stream.chunks[0], "facts", cfg.stream, tokenizer)
    answer = tokenizer.decode([t for t in examples[0].labels if t != -100])
    assert answer.startswith("The capital of Zorbia") and answer.endswith("<|end|>")
    cfg.stream.loss = "answer"  # the statement is the context; the loss (and SMF's counts) on the answer
    masked = training_examples(stream.chunks[0], "facts", cfg.stream, tokenizer)[0]
    assert masked.input_ids == examples[0].input_ids
    first = stream.chunks[0].train[0]
    assert tokenizer.decode([t for t in masked.labels if t != -100]).strip() == f"{first.answer}.<|end|>"
    cfg.stream.augment = 1  # + one paraphrase per fact, which then leaves the paraphrase probe
    assert len(training_examples(stream.chunks[0], "facts", cfg.stream, tokenizer)) == 2 * len(stream.chunks[0].train)
    cfg.stream.augment, cfg.stream.word_dropout = 0, 2  # + each question's word-dropout variants, after it
    from memtune.paraphrases import word_dropout

    variants = word_dropout(stream.chunks[0].train, 2)
    assert sum(map(len, variants)) > 0
    dropped = training_examples(stream.chunks[0], "facts", cfg.stream, tokenizer)
    assert len(dropped) == len(stream.chunks[0].train) + sum(map(len, variants))
    assert dropped[0].input_ids == examples[0].input_ids and dropped[1].labels[-3:] == examples[0].labels[-3:]
    assert variants[0] and variants[0][0] in tokenizer.decode(dropped[1].input_ids)


def test_fact_background_leaves_out_the_stream(config, tmp_path, tokenizer):
    from memtune.experiment import load_stream

    rows = facts(10)
    config["stream"] |= {"data": write_jsonl(tmp_path / "all.jsonl", rows), "size": 4}
    config["background"]["data"] = str(tmp_path / "all.jsonl")  # the stream's own file, as the headline
    cfg = parse_config(config)
    exp = Experiment(cfg, tmp_path / "out", progress=False)
    examples = exp.background_examples(None, cfg.stream, tokenizer)
    learned = {q.statement for q in load_stream(cfg.stream, cfg.seed).questions}
    trained = {tokenizer.decode([t for t in e.labels if t != -100]).removesuffix("<|end|>") for e in examples}
    assert len(examples) == 6 and len(learned) == 4
    assert trained == {r["statement"] for r in rows} - learned


def test_fact_background_formats_only_the_facts_its_batches_read(config, tmp_path, tokenizer):
    rows = facts(10)
    config["stream"] |= {"data": write_jsonl(tmp_path / "all.jsonl", rows), "size": 4}
    config["background"] |= {"data": str(tmp_path / "all.jsonl"), "batches": 2, "batch_size": 2}
    cfg = parse_config(config)
    examples = Experiment(cfg, tmp_path / "out", progress=False).background_examples(None, cfg.stream, tokenizer)
    again = Experiment(cfg, tmp_path / "again", progress=False).background_examples(None, cfg.stream, tokenizer)
    assert len(examples) == 4 and [e.input_ids for e in again] == [e.input_ids for e in examples]


def test_protect_freezes_the_slots_of_the_other_known_answers(config, tmp_path, tokenizer):
    from memtune.experiment import load_stream
    from memtune.train import train

    config["protect"] = write_jsonl(tmp_path / "protect.jsonl", facts(6) + facts(3, offset=10) + facts(4, offset=20))
    config["methods"].append({"name": "smf-open", "method": "smf", "top_t": 8, "protect": False})
    cfg = parse_config(config)
    exp = Experiment(cfg, tmp_path / "out", progress=False)
    smf, smf_open = (r for r in cfg.runs if r.learn.method == "smf")
    model, tok, method = exp.start(smf.learn, smf.protect)
    assert method.protect.meta["questions"] == 4  # neither the streamed nor the probed facts
    assert (tmp_path / "out" / "protect" / "background.json").is_file()
    chunk = load_stream(cfg.stream, cfg.seed).chunks[0]
    examples = fact_examples(chunk.train, cfg.stream, tok)
    train(model, tok, examples, smf.learn, method, progress=False)
    (protected,), (touched,) = method.protected.values(), method.touched.values()
    assert protected.numel() > 0 and touched.numel() > 0 and not torch.isin(touched, protected).any()
    assert exp.start(smf_open.learn, smf_open.protect)[2].protect is None


def test_protect_learned_freezes_what_each_chunk_read(config, tmp_path):
    config["methods"] = [{"name": "smf", "method": "smf", "top_t": 8, "epochs": 2, "batch_size": 3},
                         {"name": "smf-kept", "method": "smf", "top_t": 8, "epochs": 2, "batch_size": 3,
                          "protect_learned": True}]
    out = tmp_path / "out"
    assert main(["experiment", write_config(tmp_path, config), "--out", str(out), "--no-report"]) == 0
    open_, kept = (json.loads((out / name / "results.json").read_text()) for name in ("smf", "smf-kept"))
    assert open_["kept_rows"] == 0 and kept["kept_rows"] > 0


def test_calibration_is_made_once_and_reused(config, tmp_path, monkeypatch):
    import memtune.calibrate

    calls = []
    calibrate = memtune.calibrate.calibrate_queries
    monkeypatch.setattr(memtune.calibrate, "calibrate_queries", lambda *a, **k: calls.append(1) or calibrate(*a, **k))
    config["background"]["calibrate"] = "standardize"
    config["methods"] = [{"name": name, "method": "smf", "top_t": 8, "epochs": 1, "batch_size": 3, "ranker": ranker}
                         for name, ranker in (("tfidf", "tfidf"), ("kl", "kl"))]
    out = tmp_path / "out"
    assert main(["experiment", write_config(tmp_path, config), "--out", str(out), "--no-report"]) == 0
    assert len(calls) == 1 and (out / "calibration" / "calibration.safetensors").is_file()
    # the second run read the same slots: the background statistics' fingerprint check passed
    assert all((out / name / "results.json").is_file() for name in ("tfidf", "kl"))


def test_resume_skips_finished_runs_and_interrupt_loses_only_the_current(config, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = parse_config(config)
    calls = []
    real = Experiment.run_one

    def interrupted_second(self, run, stream, base):
        calls.append(run.name)
        if run.name == "full":
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second method
        return real(self, run, stream, base)

    monkeypatch.setattr(Experiment, "run_one", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        Experiment(cfg, out, progress=False).run_all()
    assert (out / "smf" / "results.json").is_file()
    assert not (out / "full").exists() and not list(out.glob(".full.tmp-*"))
    smf_mtime = (out / "smf" / "results.json").stat().st_mtime_ns
    calls.clear()
    monkeypatch.setattr(Experiment, "run_one", lambda self, run, stream, base: calls.append(run.name) or real(self, run, stream, base))
    results = Experiment(parse_config(config), out, progress=False).run_all()
    assert calls == ["full"] and [r["run"] for r in results] == ["smf", "full"]
    assert (out / "smf" / "results.json").stat().st_mtime_ns == smf_mtime
    calls.clear()
    Experiment(parse_config(config), out, progress=False).run_all()
    assert calls == []  # everything done: nothing reruns


def test_killed_run_leftovers_are_cleaned_and_changed_config_refused(config, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".smf.tmp-999999999-abc").mkdir()  # what `kill -9` leaves (that process is gone)
    running = out / f".full.tmp-{os.getpid()}-xyz"  # another job, running, writing its run
    running.mkdir()
    cfg = parse_config({**config, "methods": config["methods"][:1]})
    Experiment(cfg, out, progress=False).run_all()
    assert list(out.glob(".*.tmp-*")) == [running]
    running.rmdir()
    changed = {**config, "stream": {**config["stream"], "chunks": 3}}
    with pytest.raises(MemtuneError, match="different 'stream'"):
        Experiment(parse_config(changed), out, progress=False).run_all()
    # adding a method to a finished experiment is allowed and runs only the new one
    results = Experiment(parse_config(config), out, progress=False).run_all()
    assert [r["run"] for r in results] == ["smf", "full"]
    # a finished run whose options changed under the same name is not silently reused
    retuned = {**config, "methods": [{**config["methods"][0], "lr": 0.123}, *config["methods"][1:]]}
    with pytest.raises(MemtuneError, match="smf ran with lr="):
        Experiment(parse_config(retuned), out, progress=False).run_all()
    # a run made before an option existed ran as that option's default: reused, unless the config sets another
    path = out / "smf" / "config.json"
    saved = json.loads(path.read_text())
    del saved["learn"]["slot_dropout"]
    path.write_text(json.dumps(saved))
    assert [r["run"] for r in Experiment(parse_config(config), out, progress=False).run_all()] == ["smf", "full"]
    dropped = {**config, "methods": [{**config["methods"][0], "slot_dropout": 0.5}, *config["methods"][1:]]}
    with pytest.raises(MemtuneError, match="smf ran with slot_dropout=0.0"):
        Experiment(parse_config(dropped), out, progress=False).run_all()
    (out / "smf" / "config.json").write_text("{corrupt")
    with pytest.raises(MemtuneError, match="holds no run options"):
        Experiment(parse_config(config), out, progress=False).run_all()


def test_document_and_task_streams(tiny_model_dir, tmp_path):
    docs = [{"id": f"d{i}", "text": f"Zorbia {i} is a small country. Its capital is Quen{i}.",
             "questions": [{"question": f"What is the capital of Zorbia {i}?", "answer": f"Quen{i}"}]}
            for i in range(4)]
    choices = [{"question": f"Zorbia {i} lies", "choices": ["north", "south"], "label": i % 2} for i in range(8)]
    common = {"model": str(tiny_model_dir), "memory": dict(TINY_MEMORY),
              "probes": {"text": {"source": "prose:heldout", "limit": 1}, "max_new_tokens": 4, "max_length": 32},
              "methods": [{"name": "smf", "method": "smf", "ranker": "count", "top_t": 8, "epochs": 1}]}
    doc_cfg = parse_config({**common, "stream": {"kind": "documents", "chunks": 2,
                                                 "data": write_jsonl(tmp_path / "docs.jsonl", docs)}})
    [doc] = Experiment(doc_cfg, tmp_path / "docs", progress=False).run_all()
    assert doc["stream"] == "documents" and doc["seen"] == 4 and doc["learning_immediate"] is not None
    task_cfg = parse_config({**common, "stream": {"kind": "task", "chunks": 2, "size": 6, "eval_size": 2,
                                                  "data": write_jsonl(tmp_path / "mc.jsonl", choices)}})
    [task] = Experiment(task_cfg, tmp_path / "task", progress=False).run_all()
    assert task["stream"] == "task" and task["seen"] == 6 and task["learning"] in (0.0, 0.5, 1.0)
    assert task["learning_immediate"] is None and "paraphrases" not in task


def test_sweeps_expand_into_named_runs():
    runs = expand_methods([{"name": "smf", "method": "smf", "ranker": ["tfidf", "count"], "top_t": [10, 20]},
                           {"method": "lora", "lr": 1e-4}])
    assert [r.name for r in runs] == ["smf-ranker=tfidf-top_t=10", "smf-ranker=tfidf-top_t=20",
                                      "smf-ranker=count-top_t=10", "smf-ranker=count-top_t=20", "lora"]
    assert runs[2].learn.ranker == "count" and runs[2].learn.top_t == 10 and runs[4].learn.lr == 1e-4
    assert runs[0].sweep == {"ranker": "tfidf", "top_t": 10}


# -- shipped configs ------------------------------------------------------------------------


def _hub_fixtures(tmp_path) -> dict[str, str]:
    """A local copy, in the dataset's real schema, of every hub dataset the configs name."""
    import test_data_hub as H

    rows = {"trivia_qa": H.TRIVIA_QA * 6, "nq_open": H.NQ_OPEN, "gsm8k": H.GSM8K, "medmcqa": H.MEDMCQA[:1] * 12,
            "hellaswag": H.HELLASWAG[:2], "wikitext": H.WIKITEXT, "simpleqa": H.SIMPLEQA, "oasst1": H.OASST1}
    return {name: write_jsonl(tmp_path / f"{name}.jsonl", r) for name, r in rows.items()}


def _localise(raw: dict, tmp_path: Path, model: str) -> dict:
    """The config on a tiny model, tiny memory and small local data — everything else as shipped."""
    from memtune.data import hub

    fixtures = _hub_fixtures(tmp_path)
    qa_file = write_jsonl(tmp_path / "facts.jsonl", facts(8))

    def local(value):
        spec = {"source": value} if isinstance(value, str) else dict(value)
        name = hub.canonical(spec["source"])
        if name is not None:
            return {**spec, "data_file": fixtures[name], "limit": 4 if spec.get("limit") else None}
        if Path(spec["source"]).suffix:  # a file the user makes first (memtune facts)
            return {**spec, "source": qa_file, "limit": None}
        return {**spec, "limit": 2}

    raw = json.loads(json.dumps(raw))
    raw.pop("memory_model", None)
    raw["memory"] = dict(TINY_MEMORY)
    if raw.get("background"):
        raw["background"] = {**raw["background"], "data": local(raw["background"]["data"]), "batches": 2,
                             "batch_size": 2, "max_length": 32}
    if raw.get("protect"):  # questions neither streamed nor probed
        raw["protect"] = write_jsonl(tmp_path / "protect.jsonl", facts(4, offset=20))
    s = raw["stream"]
    s["data"] = local(s["data"])
    if s.get("eval_data"):
        s["eval_data"] = local(s["eval_data"])
    s["size"], s["chunks"], s["eval_size"] = (6 if s.get("kind") == "task" else 4), 2, 2
    p = raw.setdefault("probes", {})
    for key in ("known", "text"):
        if p.get(key):
            p[key] = local(p[key])
    for key in ("qa", "choices", "answers"):
        if p.get(key):
            p[key] = [local(v) for v in (p[key] if isinstance(p[key], list) else [p[key]])]
    p["max_new_tokens"], p["max_length"] = 4, 32
    for m in raw["methods"]:
        m.update(epochs=1, max_steps=1, batch_size=2)
        if m.get("method", "smf") != "smf":
            pass
        elif isinstance(m.get("top_t"), int) or m.get("top_t") is None:
            m["top_t"] = 8
        else:
            m["top_t"] = [4 * (i + 1) for i in range(len(m["top_t"]))]
    raw["model"] = model
    return raw


def test_configs_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"headline", "ranker-ablation", "top-t-sweep", "triviaqa-qwen", "medmcqa-qwen"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_parses_and_runs_on_a_tiny_model(path, tiny_model_dir, tmp_path):
    config, raw = load_config(path)
    assert config.runs and config.stream.data is not None
    tiny = parse_config(_localise(raw, tmp_path, str(tiny_model_dir)), path.name)
    assert [r.learn.method for r in tiny.runs] == [r.learn.method for r in config.runs]
    results = Experiment(tiny, tmp_path / "out", progress=False).run_all()
    assert len(results) == len(config.runs) and all(r["steps"] > 0 for r in results)


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("stream"), "missing key 'stream'"),
        (lambda c: c["stream"].update(kind="poems"), "stream.kind='poems' is invalid"),
        (lambda c: c["stream"].update(chunks=0), "stream.chunks=0 is invalid"),
        (lambda c: c["stream"].update(word_dropout=-1), "stream.word_dropout=-1 is invalid"),
        (lambda c: c["probes"].update(evry=2), "unknown key 'evry'"),
        (lambda c: c["methods"][0].update(top_t=-1), "methods[0] (smf): top_t=-1 is invalid"),
        (lambda c: c["methods"][0].update(query_noise=-1.0), "methods[0] (smf): query_noise=-1.0 is invalid"),
        (lambda c: c["methods"][0].update(consolidate=3), "methods[0].consolidate=3 is for `memtune learn`"),
        (lambda c: c["methods"][0].update(speed=3), "unknown key 'speed'"),
        (lambda c: c["methods"][0].update(lr="fast"), "methods[0] (smf): lr='fast' is invalid: expected a positive"),
        (lambda c: c["methods"][0].update(max_steps=2.5), "methods[0] (smf): max_steps=2.5 is invalid"),
        (lambda c: c["methods"][0].update(schedule="cosine"), "schedule='cosine' is invalid: expected one of constant"),
        (lambda c: c.pop("background"), "add background"),
        (lambda c: c["memory"].update(k_dim=7), "k_dim"),
        (lambda c: c["background"].update(calibrate="pca"), "background.calibrate='pca' is invalid"),
        (lambda c: c["stream"].update(chunks=50), "more than the 6 items"),
        (lambda c: c["methods"][0].update(protect="yes"), "protect='yes' is invalid"),
        (lambda c: c["methods"][1].update(protect_learned=True), "methods[1]: --protect-learned is for SMF"),
        (lambda c: c["methods"][0].update(lora_rank=4), "methods[0]: --lora-rank is for LoRA: method 'smf'"),
    ],
)
def test_bad_config_fails_in_one_line_before_any_output(config, tmp_path, capsys, change, message):
    change(config)
    out = tmp_path / "out"
    cli_error(["experiment", write_config(tmp_path, config), "--out", str(out)], capsys, message)
    assert not out.exists() or not any(out.glob("*/results.json"))


def test_bad_command_line(config, tmp_path, capsys):
    path = write_config(tmp_path, config)
    cli_error(["experiment", str(tmp_path / "nope.yaml")], capsys, "does not exist")
    cli_error(["experiment", path, "--set", "stream.size"], capsys, "expected KEY=VALUE")
    cli_error(["experiment", path, "--only", "nope", "--out", str(tmp_path / "o")], capsys, "names no run")
    cli_error(["report", str(tmp_path / "missing")], capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    cli_error(["report", str(tmp_path / "empty")], capsys, "no finished run")
    capsys.readouterr()
    assert main(["experiment", path, "--set", "stream.size=4", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == ["smf", "full"]
    assert main(["experiment", path, "--dry-run", "--only", "full"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == ["full"]


def test_report_table_values(tmp_path):
    from memtune.report import find_runs, table

    base = {"learning": 0.0, "paraphrases": 0.1, "known": 1.0, "perplexity": 10.0}
    for name, method, learned, known, ppl in [("a", "smf", 0.9, 0.99, 10.05), ("b", "full", 0.95, 0.5, 12.0)]:
        run = tmp_path / "exp" / name
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({
            "method": method, "learning": learned, "learning_immediate": 1.0, "paraphrases": 0.2, "known": known,
            "perplexity": ppl, "drift": 0.01, "base": base, "train_time_s": 120, "peak_rss_mb": 2048.4,
            "trainable_parameters": 7, **({"updated_parameters": 5, "learning_by_chunk": [0.8, 1.0]}
                                          if method == "smf" else {})}))
        (run / "metrics.jsonl").write_text(json.dumps({"event": "probe", "seen": 2, "learning": learned}) + "\n")
    runs = find_runs([str(tmp_path / "exp")])
    rows = {line.split(" | ")[0].strip("| "): line for line in table(runs).splitlines()}
    assert rows["a"] == "| a | smf | 90.0 | 100.0 | 80 / 100 | 20.0 | -1.0 | +0.50% | 0.0100 | 2.0 min | 2048 | 5 |"
    assert rows["b"] == "| b | full | 95.0 | 100.0 | – | 20.0 | -50.0 | +20.00% | 0.0100 | 2.0 min | 2048 | 7 |"
    assert rows["base model"].startswith("| base model | – | 0.0 | – | – | 10.0 | (100.0 %) | (10.000) |")


def test_first_chunk_curve_follows_it_from_right_after_learning():
    from memtune.report import _probed

    events = [{"chunk": 1, "immediate": 0.9, "learning": 0.9}, {"chunk": 2, "immediate": 1.0},
              {"chunk": 3, "immediate": 1.0, "learning": 0.9, "learning_by_chunk": [0.8, 0.9, 1.0]}]
    assert [_probed(e, "first chunk") for e in events] == [0.9, None, 0.8]
    assert [_probed(e, "learning") for e in events] == [0.9, None, 0.9]


def test_diverge_loss_starts_where_the_model_leaves_the_target(tokenizer):
    import torch

    from memtune.batches import IGNORE, Example
    from memtune.experiment import mask_predicted
    from tiny import tiny_model

    model = tiny_model(init_range=0.5)
    prompt = tokenizer("The capital of France is")["input_ids"]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(4):  # the model's own greedy continuation
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    own = ids[len(prompt):]
    other = next(t for t in range(10, 300) if t != own[2])
    diverging = Example(prompt + own[:2] + [other, own[3]], [IGNORE] * len(prompt) + own[:2] + [other, own[3]])
    predicted = Example(list(ids), [IGNORE] * len(prompt) + own)
    mask_predicted(model, [diverging, predicted], tokenizer.pad_token_id)
    assert diverging.labels == [IGNORE] * (len(prompt) + 2) + [other, own[3]]  # from the first token it gets wrong
    assert predicted.labels == [IGNORE] * (len(prompt) + 3) + [own[3]]  # all predicted: the last keeps its loss


def test_frontier_labels_of_close_points_do_not_overlap():
    from memtune.report import label_offsets

    names = ["smf-kept-e20", "smf-freeze", "smf-kept-e25", "smf-kept-e30", "full"]
    at = [(300.0, 40.0), (305.0, 44.0), (315.0, 42.0), (320.0, 60.0), (100.0, 300.0)]
    offsets = label_offsets(names, at)
    assert offsets[-1] == (4.0, 3.0)  # a point alone keeps its label beside it
    boxes = [(x + dx, x + dx + 7 * 0.62 * len(n), y + dy) for n, (x, y), (dx, dy) in zip(names, at, offsets)]
    for i, (l1, r1, b1) in enumerate(boxes):
        for l2, r2, b2 in boxes[i + 1:]:
            assert not (l1 < r2 and l2 < r1 and abs(b1 - b2) < 7 * 1.3)


def test_runs_of_one_method_get_shades_of_its_color():
    from types import SimpleNamespace

    from memtune.report import run_colors

    runs = [SimpleNamespace(name=n, method=m) for n, m in [("a", "smf"), ("b", "smf"), ("c", "smf"), ("f", "full")]]
    colors = run_colors(runs)
    assert colors["f"] == "tab:red"
    assert len({colors[n] for n in "abc"}) == 3
    assert all(c[2] > c[0] for c in (colors[n] for n in "abc"))  # blue shades
