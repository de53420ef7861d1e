"""`memtune facts` and `memtune eval` end to end on a tiny model, and the fact split itself."""

import json

import pytest

from memtune.cli import main
from memtune.data import QA, load_qa
from memtune import facts


def test_split_facts_by_contains_match_and_margin(monkeypatch):
    items = [QA("What is the capital of France?", "Paris", id="a"), QA("Code of India?", "IN", id="b"),
             QA("Capital of Peru?", "Lima", aliases=["Lima, Peru"], id="c"), QA("Capital of Chad?", "N'Djamena", id="d")]
    canned = {"a": ("The capital of France is Paris.", 2.5), "b": ("It is in Asia.", 3.0), "c": ("Lima", 0.1),
              "d": ("N'Djamena", 0.02)}
    monkeypatch.setattr(facts, "answers_with_margins", lambda model, tok, items, **kw: [canned[q.id] for q in items])
    split = facts.split_facts(None, None, items, min_margin=0.1, progress=False)
    assert [q.id for q in split.known] == ["a", "c"] and [q.id for q in split.learn] == ["b"]
    assert [q.id for q in split.unsure] == ["d"]  # right, but by a near-tie
    assert split.rows(split.learn)[0] | {"prediction": "It is in Asia.", "margin": 3.0} == split.rows(split.learn)[0]
    everything = facts.split_facts(None, None, items, min_margin=0.0, progress=False)
    assert [q.id for q in everything.known] == ["a", "c", "d"] and not everything.unsure


def test_facts_command_writes_learn_known_and_summary(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "facts"
    assert main(["facts", "--model", str(tiny_model_dir), "--out", str(out), "--limit", "6",
                 "--max-new-tokens", "3", "--batch-size", "4"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["known.jsonl", "learn.jsonl", "summary.json", "unsure.jsonl"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["facts"] == 6 == summary["learn"] + summary["known"] + summary["unsure"]
    assert summary["min_margin"] == 0.1
    assert summary == json.loads(capsys.readouterr().out)
    learn = load_qa(str(out / "learn.jsonl")) if summary["learn"] else []
    assert {q.id for q in learn} <= {q.id for q in load_qa("countries", limit=6)}
    assert all(q.paraphrases for q in learn)
    # the folder exists now: a second run refuses to overwrite it
    assert main(["facts", "--model", str(tiny_model_dir), "--out", str(out), "--limit", "2"]) == 2
    assert main(["facts", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--min-margin", "-1"]) == 2
    assert not (tmp_path / "x").exists()


@pytest.fixture
def memory_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "mem"
    assert main(["retrofit", "--model", str(tiny_model_dir), "--layers", "0", "--n-keys", "8",
                 "--heads", "2", "--knn", "2", "--k-dim", "8", "--out", str(out)]) == 0
    return out


def test_eval_command_on_a_memory_checkpoint(memory_checkpoint, tmp_path, capsys):
    capsys.readouterr()
    result_file = tmp_path / "results.json"
    assert main(["eval", "--model", str(memory_checkpoint), "--probe", "qa,perplexity", "--probe", "drift",
                 "--qa", "countries", "--limit", "3", "--max-new-tokens", "3", "--max-length", "64",
                 "--stride", "32", "--out", str(result_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(result_file.read_text())
    probes = printed["probes"]
    assert set(probes) == {"qa", "perplexity", "drift"}
    assert probes["qa"]["n"] == 3 and probes["qa"]["paraphrases"]["n"] >= 6
    assert probes["perplexity"]["perplexity"] > 1 and probes["perplexity"]["source"] == "prose:heldout"
    assert probes["drift"]["kl"] == 0.0 and probes["drift"]["base"] == "memory bypassed"
    assert set(printed["seconds"]) == {"load", "qa", "perplexity", "drift"}


def test_eval_choice_and_answer_loss_from_local_copies(tiny_model_dir, tmp_path, capsys):
    from test_data_hub import GSM8K, MEDMCQA, write_rows

    medmcqa = write_rows(tmp_path / "medmcqa.jsonl", MEDMCQA)
    assert main(["eval", "--model", str(tiny_model_dir), "--probe", "choice", "--choices", "medmcqa",
                 "--data-file", medmcqa]) == 0
    assert json.loads(capsys.readouterr().out)["probes"]["choice"]["n"] == 1
    gsm8k = write_rows(tmp_path / "gsm8k.parquet", GSM8K)
    assert main(["eval", "--model", str(tiny_model_dir), "--probe", "answer-loss", "--data-file", gsm8k]) == 0
    r = json.loads(capsys.readouterr().out)["probes"]["answer-loss"]
    assert r["n"] == 1 and r["loss"] > 0 and r["source"] == "gsm8k"


@pytest.mark.parametrize("args, message", [
    (["--probe", "bleu"], "unknown probe 'bleu'"),
    (["--probe", "qa", "--qa", "trivia_qa"], "--data-file"),
    (["--probe", "drift"], "--base"),
    (["--probe", "qa,choice", "--qa", "nq_open", "--data-file", "x.jsonl"], "ambiguous"),
])
def test_eval_bad_input_is_one_line_and_exit_2(tiny_model_dir, capsys, args, message):
    assert main(["eval", "--model", str(tiny_model_dir), "--limit", "2", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
