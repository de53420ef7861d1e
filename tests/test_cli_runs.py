"""What a run saves reloads from anywhere, and a run folder works wherever a model is expected."""

import json
import shutil

import pytest

from memtune.cli import build_parser, main
from memtune.models import load_model
from tiny import cli_error, save_tiny_model

QA = [{"question": "What is the capital of Zorbia?", "answer": "Quenta"}]
RETROFIT = ["--layers", "1", "--n-keys", "16", "--heads", "2", "--knn", "4", "--k-dim", "8"]
FAST = ["--epochs", "1", "--batch-size", "1"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working folder holding models/tiny and facts.jsonl; the tests run from it."""
    save_tiny_model(tmp_path / "models" / "tiny")
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _everywhere(project, monkeypatch, paths):
    """Move to another working folder and check every path reloads from there."""
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for path in paths:
        load_model(str(project / path))


def test_every_saved_artefact_reloads_from_another_working_directory(project, monkeypatch, capsys):
    for method in ("lora", "full"):
        assert main(["learn", "--method", method, "--model", "models/tiny", "--data", "facts.jsonl", *FAST,
                     "--out", f"run_{method}"]) == 0
    assert main(["retrofit", "--model", "models/tiny", *RETROFIT, "--out", "mem"]) == 0
    assert main(["background", "--model", "mem", "--data", "facts.jsonl", "--batches", "1", "--out", "bg"]) == 0
    assert main(["learn", "--model", "mem", "--data", "facts.jsonl", "--background", "bg", *FAST,
                 "--top-t", "4", "--out", "run_smf"]) == 0
    assert main(["learn", "--model", "models/tiny", "--data", "facts.jsonl", *FAST, "--related", "2",
                 "--n-keys", "16", "--out", "run_smf_base"]) == 0  # SMF retrofits the base itself
    base = json.loads((project / "run_smf_base/model/memory_config.json").read_text())["memory"]["base_model"]
    assert base == str(project / "models/tiny")
    adapter = json.loads((project / "run_lora/model/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(project / "models/tiny")
    memory = json.loads((project / "mem/memory_config.json").read_text())
    assert memory["memory"]["base_model"] == str(project / "models/tiny")
    assert json.loads((project / "bg/background.json").read_text())["memory_model"] == str(project / "mem")
    assert json.loads((project / "run_smf/config.json").read_text())["recipe"]["background"] == str(project / "bg")
    _everywhere(project, monkeypatch, ["run_lora/model", "run_full/model", "mem", "run_smf/model", "run_smf_base"])
    capsys.readouterr()
    assert main(["generate", "--model", str(project / "run_lora/model"), "--max-new-tokens", "2", "Hi"]) == 0


def test_aliases_and_hub_ids_are_recorded_as_they_are():
    from memtune.models import portable_name

    assert portable_name("smollm2-135m") == "smollm2-135m"
    assert portable_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_a_run_folder_is_accepted_wherever_a_model_is(project, capsys):
    assert main(["learn", "--method", "lora", "--model", "models/tiny", "--data", "facts.jsonl", *FAST,
                 "--out", "runL"]) == 0
    assert main(["learn", "--method", "full", "--model", "models/tiny", "--data", "facts.jsonl", *FAST,
                 "--out", "runF"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", "runL", "--probe", "qa", "--data", "facts.jsonl", "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["probes"]["qa"]["n"] == 1
    assert main(["generate", "--model", "runF", "--max-new-tokens", "2", "Hi"]) == 0
    assert main(["inspect", "--model", "runL"]) == 0
    # A full-finetuned run is a base model for the next learn or a retrofit.
    assert main(["learn", "--method", "lora", "--model", "runF", "--data", "facts.jsonl", *FAST, "--out", "runFL"]) == 0
    assert main(["retrofit", "--model", "runF", *RETROFIT, "--out", "memF"]) == 0
    assert main(["eval", "--model", "memF", "--probe", "answer-loss", "--data", "facts.jsonl"]) == 0


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "runX").mkdir() or (p / "runX/results.json").write_text("{}"), "saved no model"),
    (lambda p: (p / "runX").mkdir() or (p / "runX/config.json").write_text('{"run": "a"}'), "names no model_type"),
    (lambda p: (p / "runX").write_text("not a folder"), "is a file"),
    (lambda p: (p / "runX").mkdir(), "no config.json"),
    (lambda p: shutil.copytree(p / "models/tiny", p / "runX")
     and (p / "runX/config.json").write_text('{"model_type": "no-such-arch"}'), "cannot load model"),
    (lambda p: shutil.copytree(p / "models/tiny", p / "runX")
     and (p / "runX/model.safetensors").write_bytes(b"truncated"), "cannot load model"),
    (lambda p: shutil.copytree(p / "models/tiny", p / "runX/one/model") and None, "holds several runs"),
])
def test_anything_else_is_a_one_line_error(project, capsys, make, message):
    make(project)
    cli_error(["eval", "--model", "runX", "--probe", "qa", "--data", "facts.jsonl"], capsys, message)


def test_eval_reads_data_like_every_other_stage(project, capsys):
    assert main(["eval", "--model", "models/tiny", "--probe", "qa,answer-loss", "--data", "facts.jsonl",
                 "--max-new-tokens", "2"]) == 0
    probes = json.loads(capsys.readouterr().out)["probes"]
    assert probes["qa"]["source"] == probes["answer-loss"]["source"] == "facts.jsonl"
    # A per-probe option still names that probe's source.
    assert main(["eval", "--model", "models/tiny", "--probe", "qa", "--data", "nope.jsonl", "--qa", "facts.jsonl",
                 "--max-new-tokens", "2"]) == 0


def _parsers(parser):
    yield parser
    for _, sub in _subparsers(parser):
        yield from _parsers(sub)


def test_no_parser_takes_abbreviations(capsys):
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 10 and all(p.allow_abbrev is False for p in parsers)
    cli_error(["eval", "--model", "m", "--probe", "qa", "--data-f", "x.jsonl"], capsys, "--data-f")
    cli_error(["learn", "--mod", "m", "--data", "x", "--out", "o"], capsys, "--mod")


def test_every_stage_names_what_it_reads_data(capsys):
    for command in ("learn", "background", "heal", "facts", "eval"):
        options = {o for a in dict(_subparsers(build_parser()))[command]._actions for o in a.option_strings}
        assert "--data" in options, command


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(getattr(action, "choices", None), dict):
            yield from action.choices.items()


@pytest.mark.parametrize("method", ["smf", "full", "lora"])
def test_the_same_command_twice_gives_bitwise_identical_weights(project, method):
    from safetensors.torch import load_file

    if method == "smf":
        assert main(["retrofit", "--model", "models/tiny", *RETROFIT, "--out", "mem"]) == 0
    model = "mem" if method == "smf" else "models/tiny"
    extra = ["--ranker", "count", "--top-t", "4"] if method == "smf" else []
    weights = []
    for out in ("a", "b"):
        assert main(["learn", "--method", method, "--model", model, "--data", "facts.jsonl", "--epochs", "2",
                     *extra, "--out", out]) == 0
        files = sorted((project / out / "model").glob("*.safetensors"))
        weights.append({f.name: load_file(f) for f in files})
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for name, tensors in weights[0].items():
        assert tensors.keys() == weights[1][name].keys()
        assert all(t.equal(weights[1][name][k]) for k, t in tensors.items())


def test_calibrate_means_how_in_retrofit_as_in_learn(project, capsys):
    cli_error(["retrofit", "--model", "models/tiny", *RETROFIT, "--calibrate", "whiten", "--out", "m"], capsys,
              "--calibrate whiten needs --calibration-data")
    cli_error(["retrofit", "--model", "models/tiny", *RETROFIT, "--calibrate", "facts.jsonl", "--out", "m"], capsys,
              "invalid choice: 'facts.jsonl'")
    assert main(["retrofit", "--model", "models/tiny", *RETROFIT, "--calibration-data", "facts.jsonl",
                 "--calibration-batches", "1", "--out", "m"]) == 0
    assert json.loads((project / "m/memory_config.json").read_text())["memory"]["query_calibration"] == "standardize"
