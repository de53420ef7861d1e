"""End to end: retrofit -> background -> learn -> generate on a tiny model, and bad input."""

import json

import pytest

from memtune.cli import main
from tiny import cli_error

QA = [{"question": "What is the capital of Zorbia?", "answer": "Quenta"},
      {"question": "Who founded Zorbia?", "answer": "Marla Venn"}]
RETROFIT = ["--layers", "0,1", "--n-keys", "16", "--heads", "2", "--knn", "4", "--k-dim", "8"]


@pytest.fixture
def memory_dir(tiny_model_dir, tmp_path):
    assert main(["retrofit", "--model", str(tiny_model_dir), *RETROFIT, "--out", str(tmp_path / "mem")]) == 0
    return tmp_path / "mem"


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return path


def test_background_learn_generate(memory_dir, qa_file, tmp_path, capsys):
    bg, run = tmp_path / "bg", tmp_path / "run"
    assert main(["background", "--model", str(memory_dir), "--data", "prose:background", "--batches", "3",
                 "--batch-size", "2", "--max-length", "32", "--out", str(bg)]) == 0
    assert json.loads((bg / "background.json").read_text())["n_batches"] == 3
    assert main(["learn", "--model", str(memory_dir), "--data", str(qa_file), "--background", str(bg),
                 "--out", str(run), "--epochs", "3", "--batch-size", "2", "--top-t", "16",
                 "--neighbourhood-keep", "0"]) == 0  # (a tiny memory: more kept questions freeze all some steps read)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl", "model", "results.json"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    examples = json.loads((run / "results.json").read_text())["examples"]  # facts + word-dropout variants
    assert len(metrics) == 3 * -(-examples // 2)  # 3 epochs of steps of 2 examples
    assert {"loss", "selected", "updated_rows", "touched_rows", "tokens_per_s", "peak_rss_mb"} <= set(metrics[0])
    assert all(0 < sum(m["selected"].values()) <= 2 * 16 for m in metrics)
    config = json.loads((run / "config.json").read_text())
    assert config["learn"]["method"] == "smf" and config["learn"]["lr"] == 2.0 and config["format"] == "qa"
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == len(metrics) and "torch" in results["versions"]
    capsys.readouterr()
    assert main(["generate", "--model", str(run / "model"), "--max-new-tokens", "4", "Who founded Zorbia?"]) == 0


def test_documents_learn(memory_dir, tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("Zorbia is a small country.\n\nIts capital, Quenta, lies on the river Ost.\n")
    assert main(["learn", "--model", str(memory_dir), "--data", str(docs), "--ranker", "count",
                 "--out", str(tmp_path / "run"), "--epochs", "1"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["format"] == "documents"


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty"),
        ('{"question": "Q?", "answer": "A"}\n{not json}\n', "2"),
        ('{"question": "Q?"}\n', "answer"),
    ],
)
def test_bad_data_files(memory_dir, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    cli_error(["learn", "--model", str(memory_dir), "--data", str(bad), "--ranker", "count",
                  "--out", str(tmp_path / "run")], capsys, message)
    assert not (tmp_path / "run").exists()


def test_background_of_another_memory_model_is_refused(memory_dir, tiny_model_dir, qa_file, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["retrofit", "--model", str(tiny_model_dir), *RETROFIT, "--seed", "1", "--out", str(other)]) == 0
    assert main(["background", "--model", str(other), "--batches", "2", "--max-length", "32",
                 "--out", str(tmp_path / "bg")]) == 0
    capsys.readouterr()
    cli_error(["learn", "--model", str(memory_dir), "--data", str(qa_file), "--background", str(tmp_path / "bg"),
            "--out", str(tmp_path / "run")], capsys, "different memory model")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [(["--top-t", "0"], "top_t=0"), (["--top-t", "-3"], "top_t=-3"),
                                           (["--ranker", "nope"], "ranker='nope'"), (["--lr", "0"], "lr=0")])
def test_bad_options(memory_dir, qa_file, tmp_path, capsys, args, message):
    cli_error(["learn", "--model", str(memory_dir), "--data", str(qa_file), "--ranker", "count", *args,
            "--out", str(tmp_path / "run")], capsys, message)
    assert not (tmp_path / "run").exists()


def test_smf_on_a_base_model_retrofits_it(tiny_model_dir, qa_file, tmp_path):
    run = tmp_path / "run"
    assert main(["learn", "--model", str(tiny_model_dir), "--data", str(qa_file), "--n-keys", "16",
                 "--related", "4", "--epochs", "2", "--out", str(run)]) == 0
    memory = json.loads((run / "model" / "memory_config.json").read_text())["memory"]
    assert memory["mode"] == "parallel" and memory["knn"] == 4 and memory["n_keys"] == 16
    assert memory["query_calibration"] == "standardize"
    steps = json.loads((run / "config.json").read_text())["steps"]
    assert steps["retrofit"]["layers"] == memory["layers"] and steps["calibrate"]["mode"] == "standardize"
    assert steps["targets"]["target"] == "statement" and steps["background"]["batches"] >= 1


def test_learn_never_updates_protected_slots(memory_dir, tiny_model_dir, qa_file, tmp_path, capsys):
    protect, run = tmp_path / "protect", tmp_path / "run"
    assert main(["background", "--model", str(memory_dir), "--data", str(qa_file), "--out", str(protect)]) == 0
    # the data reads only slots that its own statistics protect: nothing may move (word-dropout
    # variants of the questions would read slots those statistics never counted)
    assert main(["learn", "--model", str(memory_dir), "--data", str(qa_file), "--ranker", "count",
                 "--protect", str(protect), "--out", str(run), "--epochs", "2", "--word-dropout", "0"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["touched_rows"] for m in metrics] == [0, 0]
    assert json.loads((run / "config.json").read_text())["recipe"]["protect"] == str(protect)
    capsys.readouterr()
    cli_error(["learn", "--model", str(tiny_model_dir), "--data", str(qa_file), "--method", "full",
               "--protect", str(protect), "--out", str(tmp_path / "full")], capsys, "protect is for SMF")
    assert not (tmp_path / "full").exists()
