"""Perplexity, multiple choice and answer loss against direct, unbatched computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from memtune.data import QA, Choice, Document
from memtune.probes import answer_loss, choice_accuracy, perplexity
from memtune.probes.likelihood import split_encode
from memtune.prompts import answer_suffix, build_prompt
from tiny import tiny_model, tiny_tokenizer

TEXT = "The capital of France is Paris. Python is a programming language; a function returns a value."


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def direct_nll(model, ids: list[int], start: int = 1) -> torch.Tensor:
    """Per-token NLL of ids[start:] given everything before, one unpadded forward pass."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")[start - 1 :]


def test_perplexity_matches_a_direct_computation(model, tok):
    ids = tok(TEXT, add_special_tokens=False).input_ids
    expected = direct_nll(model, ids).mean().item()
    r = perplexity(model, tok, [TEXT], max_length=256, stride=128, progress=False)
    assert r["tokens"] == len(ids) - 1 and r["windows"] == 1
    assert r["nll"] == pytest.approx(expected, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_sliding_windows_score_each_token_once_with_its_window_context(model, tok):
    texts = [TEXT, "Which region is Chile in? South America.", Document("What is the currency of Japan? The yen.")]
    ids = tok("\n\n".join(t.text if isinstance(t, Document) else t for t in texts), add_special_tokens=False).input_ids
    max_length, stride = 16, 8
    nlls, prev_end = [], 0
    for begin in range(0, len(ids), stride):  # the reference loop of the HF perplexity guide
        end = min(begin + max_length, len(ids))
        nlls.append(direct_nll(model, ids[begin:end], start=max(1, prev_end - begin)))
        prev_end = end
        if end == len(ids):
            break
    expected = torch.cat(nlls)
    for batch_size in (1, 3):  # padding in a batch must not change anything
        r = perplexity(model, tok, texts, max_length=max_length, stride=stride, batch_size=batch_size, progress=False)
        assert r["tokens"] == len(ids) - 1 == expected.numel()
        assert r["nll"] == pytest.approx(expected.mean().item(), rel=1e-5)


class Unigram(nn.Module):
    """Next-token logits that ignore the context: a hand-set preference over the vocabulary."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None):
        return CausalLMOutput(logits=self.logits.expand(*input_ids.shape, -1))


def test_choice_accuracy_on_a_hand_built_example(tok):
    vocab = len(tok)
    favoured = tok(" yes", add_special_tokens=False).input_ids
    logits = torch.zeros(vocab)
    logits[favoured] = 10.0  # the model says " yes" whatever the question
    model = Unigram(logits)
    items = [
        Choice("Is the sky blue?", ["no", "yes", "maybe"], label=1),
        Choice("Is fire cold?", ["yes", "no"], label=1),
    ]
    r = choice_accuracy(model, tok, items, batch_size=2, progress=False)
    assert r == {"n": 2, "accuracy": 0.5, "accuracy_norm": 0.5}


def test_choice_accuracy_agrees_with_direct_scoring(model, tok):
    items = [Choice("The capital of France is", ["Paris.", "Rome, the city.", "a cat"], label=0),
             Choice("A function returns", ["a value", "nothing at all"], label=1)]
    right = right_norm = 0
    for item in items:
        scores = []
        for c in item.choices:
            ids, start = split_encode(tok, item.question, " " + c)
            scores.append(-direct_nll(model, ids, start).sum().item())
        right += max(range(len(scores)), key=scores.__getitem__) == item.label
        right_norm += max(range(len(scores)), key=lambda j: scores[j] / len(item.choices[j])) == item.label
    r = choice_accuracy(model, tok, items, batch_size=4, progress=False)
    assert (r["accuracy"], r["accuracy_norm"]) == (right / 2, right_norm / 2)


def test_answer_loss_is_the_mean_loss_on_answer_tokens(model, tok):
    items = [QA("What is the capital of France?", "Paris"), QA("Who wrote Hamlet?", "William Shakespeare")]
    losses = []
    for q in items:
        ids, start = split_encode(tok, build_prompt(tok, q.question), answer_suffix(tok, q.answer))
        losses.append(direct_nll(model, ids, start))
    r = answer_loss(model, tok, items, batch_size=2, progress=False)
    assert r["n"] == 2 and r["tokens"] == sum(x.numel() for x in losses)
    assert r["loss"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5)
    assert r["item_loss"] == pytest.approx(sum(x.mean().item() for x in losses) / 2, rel=1e-5)
