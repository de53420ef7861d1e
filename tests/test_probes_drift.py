"""Drift (KL from the base model): zero against itself and through an untouched memory,
positive after any weight change; the lm-evaluation-harness bridge on a local task."""

import copy
import json

import pytest
import torch

from memtune.config import MemoryConfig
from memtune.data import Choice
from memtune.errors import MemtuneError
from memtune.probes import choice_accuracy, drift
from memtune.retrofit import get_memory_bank, retrofit
from tiny import tiny_model, tiny_tokenizer

TEXTS = ["The capital of France is Paris. The capital of Italy is Rome.",
         "Python is a programming language; a function returns a value and a class defines objects."]


def test_drift_is_zero_against_itself_and_positive_after_a_change():
    model, tok = tiny_model(), tiny_tokenizer()
    same = drift(model, tok, TEXTS, base=model, max_length=16, batch_size=3, progress=False)
    assert same["kl"] == 0.0 and same["top1_agreement"] == 1.0 and same["base"] == "separate"
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.add_(0.5 * torch.randn_like(changed.model.layers[0].mlp.down_proj.weight))
    moved = drift(changed, tok, TEXTS, base=model, max_length=16, progress=False)
    assert moved["kl"] > 0 and moved["kl_max"] >= moved["kl"] and moved["tokens"] == same["tokens"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_parallel_memory_at_init_does_not_drift_until_its_values_change(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    retrofit(model, MemoryConfig(layers=[0], n_keys=8, heads=2, knn=2, k_dim=8))
    r = drift(model, tok, TEXTS, max_length=32, progress=False)  # base = the memory bypassed
    assert r["kl"] == 0.0 and r["base"] == "memory bypassed"
    with torch.no_grad():
        for p in get_memory_bank(model).values.parameters():
            p.normal_(0, 1.0)
    assert drift(model, tok, TEXTS, max_length=32, progress=False)["kl"] > 0


def test_drift_without_a_base_is_a_clear_error():
    with pytest.raises(MemtuneError, match="--base"):
        drift(tiny_model(), tiny_tokenizer(), TEXTS, progress=False)


def test_drift_of_a_lora_model_disables_its_adapter():
    peft = pytest.importorskip("peft")
    model, tok = tiny_model(), tiny_tokenizer()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    r = drift(lora, tok, TEXTS, max_length=32, progress=False)
    assert r["base"] == "adapter disabled" and r["kl"] > 0


def test_lm_eval_bridge_on_a_local_task(tmp_path):
    pytest.importorskip("lm_eval")
    from memtune.probes import lm_eval

    rows = [{"question": "Is the sky blue?", "choices": ["yes", "no"], "label": 0},
            {"question": "Is fire cold?", "choices": ["yes", "no"], "label": 1},
            {"question": "Two plus two is", "choices": ["four", "five", "six"], "label": 0}]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(
        "task: memtune_tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf-cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    model, tok = tiny_model(), tiny_tokenizer()
    retrofit(model, MemoryConfig(layers=[0], n_keys=8, heads=2, knn=2, k_dim=8))
    r = lm_eval(model, tok, ["memtune_tiny_choice"], include_path=tasks, batch_size=2)
    assert r["n_samples"]["memtune_tiny_choice"]["effective"] == 3
    # the harness's summed log-likelihood accuracy is memtune's own `accuracy`
    ours = choice_accuracy(model, tok, [Choice(**row) for row in rows], progress=False)
    assert r["results"]["memtune_tiny_choice"]["acc"] == pytest.approx(ours["accuracy"])
