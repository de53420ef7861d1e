"""The bad-input table: every subcommand, one line naming the value and what is accepted, exit
code 2, no traceback, nothing half-written."""

import json
import shutil

import pytest

from memtune.cli import main
from tiny import cli_error, save_tiny_model

RETROFIT = ["--layers", "1", "--n-keys", "16", "--heads", "2", "--knn", "4", "--k-dim", "8"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with a tiny model, a memory checkpoint, background statistics of another memory,
    broken checkpoints and data files."""
    root = tmp_path_factory.mktemp("bad")
    save_tiny_model(root / "tiny")
    save_tiny_model(root / "tiny_qwen", arch="qwen2")
    assert main(["retrofit", "--model", str(root / "tiny"), *RETROFIT, "--out", str(root / "mem")]) == 0
    assert main(["retrofit", "--model", str(root / "tiny"), *RETROFIT, "--seed", "1", "--out", str(root / "mem2")]) == 0
    (root / "qa.jsonl").write_text(json.dumps({"question": "What is the capital of Zorbia?", "answer": "Quenta"}) + "\n")
    assert main(["background", "--model", str(root / "mem2"), "--data", str(root / "qa.jsonl"), "--batches", "1",
                 "--out", str(root / "bg_other")]) == 0
    shutil.copytree(root / "mem", root / "mem_truncated")
    weights = root / "mem_truncated" / "memory.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    shutil.copytree(root / "mem", root / "mem_edited")
    weights = root / "mem_edited" / "memory.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # still a readable safetensors file, with one weight changed
    weights.write_bytes(bytes(data))
    shutil.copytree(root / "mem", root / "mem_other_base")
    cfg = json.loads((root / "mem_other_base" / "memory_config.json").read_text())
    cfg["memory"]["base_model"] = str(root / "tiny_qwen")
    (root / "mem_other_base" / "memory_config.json").write_text(json.dumps(cfg))
    files = {
        "empty.jsonl": "",
        "list.jsonl": "[1, 2]\n",
        "types.jsonl": json.dumps({"question": "Q?", "answer": ["A"]}) + "\n",
        "nan.jsonl": '{"question": "Q?", "answer": NaN}\n',
        "broken.jsonl": '{"question": "Q?", "answer": "A"}\n{not json\n',
        "long.jsonl": json.dumps({"question": "Q?", "answer": "a very long answer " * 20}) + "\n",
        "afile": "not a folder",
        "bad.yaml": "model: tiny\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "unfinished_run").mkdir()
    (root / "unfinished_run" / "metrics.jsonl").write_text("")
    return root


# (arguments with {w} for the world folder, text the one-line error must contain)
TABLE = [
    (["learn", "--model", "{w}/mem", "--data", "{w}/missing.jsonl"], "'{w}/missing.jsonl' does not exist"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/empty.jsonl"], "is empty"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/list.jsonl"], "expected a JSON object, got list"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/broken.jsonl"], "line 2"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/types.jsonl"], "field 'answer' must be text, got list"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/nan.jsonl"], "field 'answer' must be text, got float"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/qa.jsonl", "--lr", "nan"], "lr=nan is invalid"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/qa.jsonl", "--lr", "-1"], "lr=-1.0 is invalid"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/qa.jsonl", "--epochs", "0"], "epochs=0 is invalid"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/qa.jsonl", "--limit", "-1"], "--limit: '-1' is invalid"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/long.jsonl", "--max-length", "8"], "too short for the answer"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/qa.jsonl", "--background", "{w}/bg_other"],
     "computed for a different memory model"),
    (["learn", "--model", "{w}/mem_truncated", "--data", "{w}/qa.jsonl", "--ranker", "count"], "truncated or edited"),
    (["learn", "--model", "{w}/mem_edited", "--data", "{w}/qa.jsonl", "--ranker", "count"], "truncated or edited"),
    (["learn", "--model", "{w}/mem_other_base", "--data", "{w}/qa.jsonl", "--ranker", "count"], "belongs to another base model"),
    (["learn", "--model", "no-such-alias", "--data", "{w}/qa.jsonl"], "unknown model 'no-such-alias'"),
    (["learn", "--model", "Org/not-cached", "--data", "{w}/qa.jsonl"], "HF_HUB_OFFLINE"),
    (["learn", "--model", "{w}/unfinished_run", "--data", "{w}/qa.jsonl"], "saved no model"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/qa.jsonl", "--ranker", "count", "--out", "{w}/afile"],
     "is a file"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/qa.jsonl", "--ranker", "count", "--out", "{w}/afile/run"],
     "cannot be created"),
    (["learn", "--model", "{w}/mem", "--data", "{w}/qa.jsonl", "--threads", "0"], "--threads: '0' is invalid"),
    (["retrofit", "--model", "{w}/tiny", "--layers", "7"], "out of range"),
    (["retrofit", "--model", "{w}/tiny", "--layers", "-1"], "non-negative"),
    (["retrofit", "--model", "{w}/tiny", "--layers", "1", "--n-keys", "0"], "n_keys=0 is invalid"),
    (["retrofit", "--model", "{w}/afile", "--layers", "1"], "is a file"),
    (["generate", "--model", "{w}/tiny", "--max-new-tokens", "0", "hi"], "--max-new-tokens: '0' is invalid"),
    (["generate", "--model", "{w}/tiny", "--sample", "--temperature", "nan", "hi"], "--temperature: 'nan' is invalid"),
    (["inspect", "--model", "{w}/mem_truncated"], "truncated or edited"),
    (["eval", "--model", "{w}/tiny", "--probe", "bogus"], "unknown probe 'bogus'"),
    (["eval", "--model", "{w}/tiny", "--probe", "qa", "--batch-size", "0"], "--batch-size: '0' is invalid"),
    (["eval", "--model", "{w}/tiny", "--probe", "qa", "--data", "{w}/missing.jsonl"], "does not exist"),
    (["eval", "--model", "{w}/tiny", "--probe", "qa", "--data", "{w}/qa.jsonl", "--out", "{w}/mem"], "is a folder"),
    (["eval", "--model", "{w}/tiny", "--probe", "qa", "--data-f", "x"], "unrecognized arguments: --data-f"),
    (["facts", "--model", "{w}/tiny", "--min-margin", "nan"], "--min-margin: 'nan' is invalid"),
    (["facts", "--model", "{w}/tiny", "--data", "{w}/qa.jsonl", "--out", "{w}/afile"], "is a file"),
    (["background", "--model", "{w}/mem", "--batches", "0"], "--batches: '0' is invalid"),
    (["background", "--model", "{w}/tiny", "--data", "{w}/qa.jsonl"], "has no memory layers"),
    (["heal", "--model", "{w}/tiny", "--data", "{w}/qa.jsonl"], "has no memory layers"),
    (["slots", "--model", "{w}/tiny", "--data", "{w}/qa.jsonl"], "has no memory layers"),
    (["slots", "--model", "{w}/mem", "--data", "{w}/empty.jsonl"], "is empty"),
    (["slots", "--model", "{w}/mem", "--data", "{w}/qa.jsonl", "--known", "{w}/missing.jsonl"], "does not exist"),
    (["experiment", "{w}/missing.yaml"], "does not exist"),
    (["experiment", "{w}/bad.yaml"], "missing key"),
    (["report", "{w}/missing_run"], "does not exist"),
]
NEEDS_OUT = {"learn", "retrofit", "facts", "background", "heal", "slots"}


@pytest.mark.parametrize("args, message", TABLE, ids=[f"{a[0]}:{m[:30]}" for a, m in TABLE])
def test_bad_input_is_a_one_line_error(world, tmp_path, capsys, args, message):
    args = [a.format(w=world) for a in args]
    if args[0] in NEEDS_OUT and "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    before = sorted(p.name for p in world.iterdir())
    err = cli_error(args, capsys, message.format(w=world))
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in world.iterdir()) == before  # nothing half-written, no temporaries


def test_the_table_covers_every_subcommand_and_25_cases():
    from memtune.cli import build_parser

    commands = {a for p in build_parser()._actions if isinstance(p.choices, dict) for a in p.choices}
    assert commands <= {args[0] for args, _ in TABLE} and len(TABLE) >= 25
