"""The baselines through `learn`: full finetuning and LoRA (peft) train, save, and reload to the
same logits; all three methods write the same run folder with the same metrics."""

import json

import pytest
import torch
from peft import PeftModel

from memtune.batches import encode_qa
from memtune.cli import main
from memtune.models import load_base_model, load_model
from memtune.train import LearnConfig, make_method, train
from tiny import save_tiny_model

QA = [{"question": "What is the capital of Zorbia?", "answer": "Quenta"},
      {"question": "Who founded Zorbia?", "answer": "Marla Venn"},
      {"question": "Which river crosses Quenta?", "answer": "The Ost"}]
RETROFIT = ["--layers", "0,1", "--n-keys", "16", "--heads", "2", "--knn", "4", "--k-dim", "8"]
RUN_FILES = ["config.json", "metrics.jsonl", "model", "results.json"]
STEP_KEYS = {"step", "loss", "loss_tokens", "tokens_per_s", "peak_rss_mb", "step_time_s", "elapsed_s"}


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return path


def _probe(tokenizer) -> dict[str, torch.Tensor]:
    batch = tokenizer(["What is the capital of Zorbia? Quenta", "Who founded it?"], return_tensors="pt",
                      padding=True)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def _logits(model, tokenizer) -> torch.Tensor:
    return model.eval()(**_probe(tokenizer)).logits


def _learn(model_name: str, method: str, **overrides):
    model, tokenizer = load_base_model(model_name)
    examples = encode_qa(tokenizer, [(r["question"], r["answer"]) for r in QA])
    config = LearnConfig(method=method, epochs=4, batch_size=2, seed=0, **overrides)
    m = make_method(config, None)
    model, history = train(model, tokenizer, examples, config, m, progress=False)
    return model, tokenizer, m, history


def test_full_finetuning_trains_saves_and_reloads(tiny_model_dir, tmp_path):
    before = _logits(*load_base_model(str(tiny_model_dir)))
    model, tokenizer, method, history = _learn(str(tiny_model_dir), "full", lr=1e-3)
    assert history[-1]["loss"] < history[0]["loss"]
    assert method.trainable == sum(p.numel() for p in model.parameters())
    trained = _logits(model, tokenizer)
    assert not torch.allclose(trained, before)
    method.save(model, tokenizer, tmp_path / "model")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "model").iterdir()}
    reloaded, tok2 = load_model(str(tmp_path / "model"))
    assert torch.equal(_logits(reloaded, tok2), trained)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_linear_schedule_sets_the_rate_of_every_step(tiny_model_dir, method):
    model, tokenizer, m, history = _learn(str(tiny_model_dir), method, lr=1e-3, schedule="linear")
    assert [r["lr"] for r in history] == pytest.approx([1e-3 * (1 - i / 8) for i in range(8)])
    assert all(g["lr"] == pytest.approx(history[-1]["lr"]) for g in m.optimizer.param_groups)


def test_lora_trains_through_peft_saves_an_adapter_and_reloads(tiny_model_dir, tmp_path):
    base_logits = _logits(*load_base_model(str(tiny_model_dir)))
    model, tokenizer, method, history = _learn(str(tiny_model_dir), "lora", lr=1e-2, lora_rank=4)
    assert isinstance(model, PeftModel)
    assert history[-1]["loss"] < history[0]["loss"]
    assert 0 < method.trainable < sum(p.numel() for p in model.parameters()) / 2
    trained = _logits(model, tokenizer)
    assert not torch.allclose(trained, base_logits)
    with model.disable_adapter():  # LoRA leaves the base weights alone
        assert torch.equal(_logits(model, tokenizer), base_logits)
    out = tmp_path / "adapter"
    method.save(model, tokenizer, out)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    # peft's own loader and memtune's give the trained model's logits.
    base, _ = load_base_model(str(tiny_model_dir))
    assert torch.allclose(_logits(PeftModel.from_pretrained(base, out), tokenizer), trained, atol=1e-6)
    reloaded, tok2 = load_model(str(out))
    assert isinstance(reloaded, PeftModel)
    assert torch.allclose(_logits(reloaded, tok2), trained, atol=1e-6)


def test_lora_adapter_names_the_base_model_as_the_user_did(tmp_path):
    # An alias resolves to a cache folder; the adapter must name the alias, which loads anywhere.
    save_tiny_model(tmp_path / "cache" / "models" / "smollm2-135m")  # MEMTUNE_CACHE is tmp_path/cache
    model, tokenizer, method, _ = _learn("smollm2-135m", "lora", lora_rank=2, max_steps=1)
    method.save(model, tokenizer, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m"
    reloaded, tok2 = load_model(str(tmp_path / "adapter"))
    assert torch.allclose(_logits(reloaded, tok2), _logits(model, tokenizer), atol=1e-6)


def test_all_methods_write_the_same_run_folder(tiny_model_dir, qa_file, tmp_path, capsys):
    mem = tmp_path / "mem"
    assert main(["retrofit", "--model", str(tiny_model_dir), *RETROFIT, "--out", str(mem)]) == 0
    runs = {
        "smf": ["--model", str(mem), "--ranker", "count", "--top-t", "8"],
        "full": ["--model", str(tiny_model_dir)],
        "lora": ["--model", str(tiny_model_dir), "--lora-rank", "4"],
    }
    results = {}
    for method, args in runs.items():
        run = tmp_path / method
        assert main(["learn", *args, "--method", method, "--data", str(qa_file), "--epochs", "2",
                     "--batch-size", "2", "--out", str(run)]) == 0
        assert sorted(p.name for p in run.iterdir()) == RUN_FILES
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        results[method] = json.loads((run / "results.json").read_text())
        examples = results[method]["examples"]  # the facts and their word-dropout variants
        assert examples > len(QA) and len(metrics) == 2 * -(-examples // 2)  # 2 epochs of steps of 2 examples
        for m in metrics:
            assert STEP_KEYS <= set(m), (method, m)
            assert m["tokens_per_s"] > 0 and m["peak_rss_mb"] > 0 and m["step_time_s"] > 0
        config = json.loads((run / "config.json").read_text())
        assert config["learn"]["method"] == method and config["format"] == "qa"
        assert results[method]["method"] == method and results[method]["steps"] == len(metrics)
        model, tokenizer = load_model(str(run / "model"))
        capsys.readouterr()
        assert main(["generate", "--model", str(run / "model"), "--max-new-tokens", "3", "Who founded Zorbia?"]) == 0
    keys = {m: set(r) - {"touched_rows"} for m, r in results.items()}
    assert keys["smf"] == keys["full"] == keys["lora"]
    trainable = {m: r["trainable_parameters"] for m, r in results.items()}
    assert trainable["lora"] < trainable["full"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_baselines_refuse_a_memory_model(method, tiny_model_dir, qa_file, tmp_path, capsys):
    mem = tmp_path / "mem"
    assert main(["retrofit", "--model", str(tiny_model_dir), *RETROFIT, "--out", str(mem)]) == 0
    capsys.readouterr()
    code = main(["learn", "--model", str(mem), "--method", method, "--data", str(qa_file), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "base model" in err and err.count("\n") == 0, err
    assert not (tmp_path / "run").exists()
