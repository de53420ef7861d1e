"""Healing: the objectives, what may change, the recovery report, and the `heal` CLI end to end."""

import json
import logging

import pytest
import torch

from memtune.batches import collate, encode_documents
from memtune.cli import main
from memtune.data import load_documents
from memtune.errors import MemtuneError
from memtune.heal import (
    Heal,
    HealConfig,
    MemoryOptimizer,
    _log_report,
    distillation_loss,
    heal,
    heal_losses,
    held_out_perplexity,
    recovered_fraction,
)
from memtune.models import load_model
from memtune.retrofit import is_memory_param, retrofit
from memtune.train import train
from tiny import cli_error, tiny_memory_config, tiny_model

RETROFIT = ["--layers", "1", "--n-keys", "16", "--heads", "2", "--knn", "4", "--k-dim", "8"]
SMALL = dict(batch_size=4, max_length=48, eval_max_length=64, eval_stride=64)


@pytest.fixture(scope="module")
def docs(tokenizer):
    return encode_documents(tokenizer, [d.text for d in load_documents("prose:background", limit=2)], 48)[:24]


@pytest.fixture(scope="module")
def heldout():
    return [load_documents("prose:heldout", limit=1)[0].text[:1000]]


def memory_model(mode: str, arch: str = "llama", init_range: float = 0.2):
    model = tiny_model(arch, init_range=init_range)
    torch.manual_seed(0)
    return retrofit(model, tiny_memory_config(mode=mode))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_distillation_is_exactly_zero_for_a_parallel_model_at_init(arch, tokenizer, docs):
    model = memory_model("parallel", arch)
    batch = collate(docs[:4], tokenizer.pad_token_id, "all")
    losses = heal_losses(model, batch, HealConfig(lm_weight=0.0))
    assert losses["distill_loss"].item() == 0.0
    assert set(losses) == {"loss", "distill_loss"}


def test_distillation_is_positive_for_a_replace_model(tokenizer, docs):
    model = memory_model("replace")
    batch = collate(docs[:4], tokenizer.pad_token_id, "all")
    losses = heal_losses(model, batch, HealConfig(lm_weight=0.5, distill_weight=2.0))
    assert losses["distill_loss"].item() > 1e-4
    expected = 0.5 * losses["lm_loss"] + 2.0 * losses["distill_loss"]
    assert torch.allclose(losses["loss"], expected)


def test_layerwise_loss_alone_stops_at_the_last_memory_layer(tokenizer, docs):
    model = memory_model("replace")
    with torch.no_grad():
        model.memory.values[0].weight.zero_()  # memory output 0: all of the FFN's output is missing
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    batch = collate(docs[:4], tokenizer.pad_token_id, "all")
    losses = heal_losses(model, batch, HealConfig(lm_weight=0.0, distill_weight=0.0, local_weight=1.0))
    assert set(losses) == {"loss", "local_loss"} and losses["local_loss"].item() == 1.0
    assert calls == []  # nothing above the memory layer ran
    parallel = memory_model("parallel")
    both = heal_losses(parallel, batch, HealConfig(local_weight=1.0))
    assert both["local_loss"].item() == 0.0 and set(both) == {"loss", "lm_loss", "distill_loss", "local_loss"}
    assert calls == []


def test_lookup_has_its_own_learning_rate_and_the_schedule_decays(tokenizer, docs):
    model = memory_model("replace")
    opt = MemoryOptimizer(model, lr=1e-3, value_lr=1e-2, lookup_lr=1e-6)
    lrs = {id(p): g["lr"] for g in opt.dense.param_groups for p in g["params"]}
    assert lrs[id(model.memory.layers["1"].query.weight)] == lrs[id(model.memory.layers["1"].keys)] == 1e-6
    assert lrs[id(model.memory.layers["1"].gate.weight)] == lrs[id(model.memory.layers["1"].out.weight)] == 1e-3
    assert id(model.memory.values[0].weight) not in lrs
    history = heal(model, tokenizer, docs[:8], HealConfig(**{**SMALL, "batch_size": 2}, schedule="linear",
                                                           value_lr=1e-2), progress=False)
    assert [h["value_lr"] for h in history] == pytest.approx([1e-2, 0.75e-2, 0.5e-2, 0.25e-2])


def test_distillation_loss_by_hand():
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    p, log_q = teacher.softmax(-1), student.log_softmax(-1)
    kl = (p * (p.log() - log_q)).sum(-1)  # (B, T)
    expected = kl[mask.bool()].mean()
    assert torch.allclose(distillation_loss(student, teacher, mask), expected, atol=1e-6)


@pytest.mark.parametrize("objective", [dict(distill_weight=0.0), dict(lm_weight=0.0), dict()])
def test_heal_lowers_held_out_loss_of_a_replace_model(objective, tokenizer, docs, heldout):
    model = memory_model("replace")
    config = HealConfig(**SMALL, **objective, epochs=10, lr=1e-2, value_lr=1e-2)
    before = held_out_perplexity(model, tokenizer, heldout, config, progress=False)
    history = heal(model, tokenizer, docs, config, progress=False)
    after = held_out_perplexity(model, tokenizer, heldout, config, progress=False)
    assert after < before
    assert history[-1]["loss"] < history[0]["loss"]


def test_distillation_moves_the_replace_model_towards_the_original(tokenizer, docs, heldout):
    model = memory_model("replace")
    config = HealConfig(**SMALL, lm_weight=0.0, epochs=10, lr=1e-2, value_lr=1e-2)
    batch = collate(encode_documents(tokenizer, heldout, 48)[:4], tokenizer.pad_token_id, "all")
    before = heal_losses(model, batch, config)["distill_loss"].item()
    heal(model, tokenizer, docs, config, progress=False)
    after = heal_losses(model, batch, config)["distill_loss"].item()
    assert after < 0.7 * before


def test_only_memory_parameters_change(tokenizer, docs):
    model = memory_model("replace")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = heal(model, tokenizer, docs, HealConfig(**SMALL, max_steps=1), progress=False)
    after = dict(model.named_parameters())
    for name, p in before.items():
        if not is_memory_param(name):
            assert torch.equal(p, after[name]), name
    changed = {n for n, p in before.items() if not torch.equal(p, after[n])}
    assert {"memory.layers.1.query.weight", "memory.layers.1.keys", "memory.layers.1.gate.weight",
            "memory.layers.1.out.weight", "memory.values.0.weight"} <= changed
    # Values move only in rows that were read (the sparse gradient's rows), never the whole table.
    rows = (before["memory.values.0.weight"] != after["memory.values.0.weight"]).any(dim=1).sum().item()
    assert 0 < rows <= history[0]["value_rows"] < model.memory.config.n_slots
    assert all(p.grad is None for p in model.parameters())


def test_heal_runs_through_the_one_training_loop(tokenizer, docs, monkeypatch):
    import memtune.heal

    methods, modes = [], []

    def spy_train(model, tokenizer, examples, config, method, *args):
        methods.append(method)
        return train(model, tokenizer, examples, config, method, *args)

    def spy_loss(self, model, batch):
        modes.append(model.training)
        return heal_losses(model, batch, self.config)

    monkeypatch.setattr(memtune.heal, "train", spy_train)
    monkeypatch.setattr(Heal, "loss", spy_loss)
    model = memory_model("replace").train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not is_memory_param(n)}
    history = heal(model, tokenizer, docs, HealConfig(**SMALL, epochs=4, lr=1e-2, value_lr=1e-2), progress=False)
    assert len(methods) == 1 and isinstance(methods[0], Heal)
    assert modes == [False] * len(history) == [False] * 24  # eval mode: the targets see no dropout
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert {"lm_loss", "distill_loss", "value_rows", "value_lr", "lr", "step_time_s"} <= set(history[0])


def test_heal_stops_at_max_minutes(tokenizer, docs):
    history = heal(memory_model("replace"), tokenizer, docs, HealConfig(**SMALL, epochs=5, max_minutes=1e-9),
                   progress=False)
    assert len(history) == 1  # the first step always runs


def test_value_gradient_is_sparse(tokenizer, docs):
    model = memory_model("replace")
    batch = collate(docs[:2], tokenizer.pad_token_id, "all")
    heal_losses(model, batch, HealConfig())["loss"].backward()
    assert model.memory.values[0].weight.grad.is_sparse


@pytest.mark.parametrize("kwargs, message", [(dict(schedule="cosine"), "schedule='cosine'"),
                                             (dict(max_minutes=0), "max_minutes=0"), (dict(batch_size=0), "batch_size=0"),
                                             (dict(batch_size=True), "batch_size=True"), (dict(lr=True), "lr=True"),
                                             (dict(lr="x"), "lr='x'"), (dict(max_steps=2.5), "max_steps=2.5")])
def test_bad_config(kwargs, message):
    with pytest.raises(MemtuneError, match=message):
        HealConfig(**kwargs)


def test_recovered_fraction():
    assert recovered_fraction(10.0, 20.0, 12.0) == pytest.approx(0.8)
    assert recovered_fraction(10.0, 20.0, 25.0) == pytest.approx(-0.5)
    assert recovered_fraction(10.0, 10.0, 9.0) is None


def test_a_short_recovery_is_a_warning(caplog):
    results = {"steps": 3, "train_time_s": 1.0, "first_loss": 2.0, "final_loss": 1.5, "min_recovery": 0.8,
               "perplexity": {"base": 10.0, "replaced": 20.0, "healed": 15.0}, "recovered_fraction": 0.5}
    with caplog.at_level(logging.INFO, logger="memtune.heal"):
        _log_report(results, "run")
    assert [r.levelname for r in caplog.records] == ["INFO", "WARNING"]
    assert "50.0%" in caplog.records[1].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="memtune.heal"):
        _log_report({**results, "recovered_fraction": 0.9}, "run")
    assert [r.levelname for r in caplog.records] == ["INFO", "INFO"]


@pytest.fixture
def replace_dir(tiny_model_dir, tmp_path):
    assert main(["retrofit", "--model", str(tiny_model_dir), *RETROFIT, "--mode", "replace",
                 "--out", str(tmp_path / "mem")]) == 0
    return tmp_path / "mem"


HEAL = ["--data", "prose:background", "--limit", "4", "--max-length", "48", "--batch-size", "4",
        "--eval-limit", "1", "--eval-max-length", "64", "--eval-stride", "64"]


def test_heal_cli_end_to_end(replace_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["heal", "--model", str(replace_dir), *HEAL, "--max-steps", "3", "--value-lr", "0.01",
                 "--out", str(run)]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl", "model", "results.json"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"loss", "lm_loss", "distill_loss", "value_rows", "tokens_per_s", "peak_rss_mb", "step_time_s"} <= set(metrics[0])
    config = json.loads((run / "config.json").read_text())
    assert config["heal"]["value_lr"] == 0.01 and config["memory"]["mode"] == "replace"
    results = json.loads((run / "results.json").read_text())
    ppl = results["perplexity"]
    assert ppl["data"] == "prose:heldout" and {"base", "replaced", "healed"} <= set(ppl)
    assert results["recovered_fraction"] == pytest.approx(recovered_fraction(ppl["base"], ppl["replaced"], ppl["healed"]))
    assert results["steps"] == 3 and "git_revision" in results and "torch" in results["versions"]
    # The healed memory reloads onto its base model and scores what the report says.
    model, tokenizer = load_model(str(run / "model"))
    texts = [d.text for d in load_documents("prose:heldout", limit=1)]
    config = HealConfig(eval_max_length=64, eval_stride=64)
    assert held_out_perplexity(model, tokenizer, texts, config, progress=False) == pytest.approx(ppl["healed"], rel=1e-5)
    assert held_out_perplexity(model, tokenizer, texts, config, bypass=True, progress=False) == pytest.approx(ppl["base"], rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--lm-weight", "0", "--distill-weight", "0"], "nothing to train"),
    (["--lookup-lr", "-1"], "lookup_lr=-1"),
    (["--lm-weight", "-1"], "lm_weight=-1"),
    (["--value-lr", "0"], "value_lr=0"),
    (["--data", "no-such-source"], "no-such-source"),
    (["--eval-data", "prose:nope"], "nope"),
    (["--eval-stride", "128"], "eval_stride=128"),
])
def test_bad_input(replace_dir, tmp_path, capsys, args, message):
    cli_error(["heal", "--model", str(replace_dir), *HEAL, "--max-steps", "1", *args, "--out", str(tmp_path / "run")],
           capsys, message)
    assert not (tmp_path / "run").exists()


def test_heal_needs_a_memory_model(tiny_model_dir, tmp_path, capsys):
    cli_error(["heal", "--model", str(tiny_model_dir), *HEAL, "--out", str(tmp_path / "run")], capsys, "no memory layers")
    assert not (tmp_path / "run").exists()


def test_heal_refuses_an_existing_run(replace_dir, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep").write_text("x")
    cli_error(["heal", "--model", str(replace_dir), *HEAL, "--out", str(tmp_path / "run")], capsys, "already exists")
    assert (tmp_path / "run" / "keep").read_text() == "x"
