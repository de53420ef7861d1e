"""End to end through the console entry point: retrofit -> generate -> inspect on a tiny model."""

import json

import pytest

from memtune.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from memtune.cli import main


def test_retrofit_generate_inspect(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "mem"
    assert main(["retrofit", "--model", str(tiny_model_dir), "--layers", "0,1", "--n-keys", "16",
                 "--heads", "2", "--knn", "4", "--k-dim", "8", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])

    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "6", "--json", "Capital of Peru?"]) == 0
    base_answer = json.loads(capsys.readouterr().out)[0]["answer"]
    assert main(["generate", "--model", str(out), "--max-new-tokens", "6", "--json", "Capital of Peru?"]) == 0
    # Parallel mode with zero values: the memory model answers exactly like its base.
    assert json.loads(capsys.readouterr().out)[0]["answer"] == base_answer

    assert main(["inspect", "--model", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["memory"]["layers"] == [0, 1] and info["memory"]["n_slots"] == 256
    assert info["parameters"]["memory"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "0,7"], "out of range"),
        (["--layers", "0", "--k-dim", "7"], "k_dim=7"),
        (["--layers", "x"], "invalid"),
    ],
)
def test_retrofit_bad_input_exits_nonzero_and_writes_nothing(tiny_model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "mem"
    try:
        code = main(["retrofit", "--model", str(tiny_model_dir), "--out", str(out), "--n-keys", "16",
                     "--heads", "2", "--knn", "4", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code != 0
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_model_is_one_line_error(capsys):
    assert main(["generate", "--model", "nope", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown model 'nope'" in err


def test_threads_option(tiny_model_dir, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["generate", "--model", str(tiny_model_dir), "--threads", "1", "--max-new-tokens", "2", "hi"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["generate", "--model", str(tiny_model_dir), "--threads", "0", "hi"]) == 2
    assert "--threads: '0' is invalid: expected a positive integer" in capsys.readouterr().err


def test_retrofit_calibrates_on_data(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(12)))
    common = ["retrofit", "--model", str(tiny_model_dir), "--layers", "1", "--n-keys", "16", "--heads", "2",
              "--knn", "4", "--k-dim", "8"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--calibration-data", str(data), "--calibrate", "whiten", "--out", str(tmp_path / "cal")]) == 0
    config = json.loads((tmp_path / "cal" / CONFIG_NAME).read_text())["memory"]
    assert config["query_calibration"] == "whiten"
    assert json.loads((tmp_path / "plain" / CONFIG_NAME).read_text())["memory"]["query_calibration"] is None
    assert main(["inspect", "--model", str(tmp_path / "cal"), "--json"]) == 0  # loads back
    assert main([*common, "--calibration-data", str(data), "--calibration-batches", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--calibration-batches: '0' is invalid" in capsys.readouterr().err and not (tmp_path / "x").exists()
