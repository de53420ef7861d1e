"""The one training loop's hooks for a method: its own loss, eval mode, and a time budget."""

import pytest
import torch

from memtune.batches import encode_qa
from memtune.errors import MemtuneError
from memtune.methods import FullFinetuning
from memtune.train import LearnConfig, train
from tiny import tiny_model

PAIRS = [("What is the capital of Zorbia?", "Quenta"), ("Who founded Zorbia?", "Marla Venn"),
         ("Which river crosses Quenta?", "The Ost")]


class NormLoss(FullFinetuning):
    """Full finetuning whose objective is ½‖w‖² of the final norm's weight w, with the
    micro-batch's size logged beside it; records what train() hands it."""

    train_mode = False

    def __init__(self):
        super().__init__(lr=1e-2)
        self.weights, self.grads, self.modes = [], [], []

    def loss(self, model, batch):
        self.modes.append(model.training)
        w = model.model.norm.weight
        return {"loss": 0.5 * w.square().sum(), "rows": torch.tensor(float(len(batch["input_ids"])))}

    def step(self, usage):
        self.weights.append(self.model.model.norm.weight.detach().clone())
        self.grads.append({n: p.grad for n, p in self.model.named_parameters() if p.grad is not None})
        return super().step(usage)


def test_train_backpropagates_the_method_loss(tokenizer):
    # 3 examples, micro-batches of 2 and 1 in one step: weighted 2/3 and 1/3.
    config = LearnConfig(method="full", lr=1e-2, batch_size=2, grad_accum=2, epochs=2, until_learned=False)
    method = NormLoss()
    _, history = train(tiny_model(), tokenizer, encode_qa(tokenizer, PAIRS), config, method, progress=False)
    assert len(history) == 2 and method.modes == [False] * 4  # eval mode, as the method asked
    for w, grads, record in zip(method.weights, method.grads, history):
        assert set(grads) == {"model.norm.weight"}  # d(½‖w‖²)/dw = w, nothing else
        assert torch.allclose(grads["model.norm.weight"], w)
        assert record["loss"] == pytest.approx(0.5 * w.square().sum().item())
        assert record["rows"] == pytest.approx(2 * 2 / 3 + 1 * 1 / 3)
        assert record["loss_tokens"] > 0 and record["examples"] == 3
    assert not torch.equal(method.weights[0], method.weights[1])


def test_train_stops_at_the_time_budget(tokenizer):
    config = LearnConfig(method="full", lr=1e-3, batch_size=1, epochs=3, until_learned=False, max_minutes=1e-9)
    _, history = train(tiny_model(), tokenizer, encode_qa(tokenizer, PAIRS), config, FullFinetuning(1e-3),
                       progress=False)
    assert len(history) == 1  # the first step always runs


def test_bad_max_minutes():
    with pytest.raises(MemtuneError, match="max_minutes=0"):
        LearnConfig(max_minutes=0)
