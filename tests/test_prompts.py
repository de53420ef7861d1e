"""Every probe and training read the same ids: BOS once, the answer closed as the template does."""

import sys
from types import SimpleNamespace

import pytest

from memtune.batches import IGNORE, encode_documents, encode_qa
from memtune.data import QA, Choice
from memtune.generation import generate
from memtune.probes import likelihood
from memtune.probes.likelihood import answer_loss, choice_accuracy, split_encode
from memtune.prompts import (
    answer_suffix,
    assistant_turn,
    build_prompt,
    encode_prompt,
    encode_text,
    end_of_answer,
    special_prefix,
    stop_token_ids,
)
from tiny import BOS_VOCAB, CHAT_TEMPLATE, bos_tokenizer, tiny_model, tiny_tokenizer

QUESTIONS = [("What is the capital of France?", "Paris"), ("Which region is Chile in?", "South America")]


@pytest.fixture(scope="module")
def tok():
    return bos_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=BOS_VOCAB)


def _one_bos(ids: list[int], bos: int) -> bool:
    return ids[0] == bos and ids.count(bos) == 1


def test_bos_is_written_once_by_a_template_that_writes_it(tok):
    assert special_prefix(tok) == [tok.bos_token_id]
    for prompt in encode_prompt(tok, [q for q, _ in QUESTIONS]):
        assert _one_bos(prompt, tok.bos_token_id)
    for e in encode_qa(tok, QUESTIONS):
        assert _one_bos(e.input_ids, tok.bos_token_id)


def test_plain_text_gets_the_tokenizers_bos_once(tok):
    assert _one_bos(encode_text(tok, "The capital of France is"), tok.bos_token_id)
    assert _one_bos(encode_text(tok, "<s>The capital of France is"), tok.bos_token_id)
    assert _one_bos(encode_prompt(tok, ["What?"], chat=False)[0], tok.bos_token_id)
    ids, start = split_encode(tok, "The capital of France is", " Paris")
    assert _one_bos(ids, tok.bos_token_id) and start > 1
    for e in encode_documents(tok, ["Paris is the capital of France."]):
        assert _one_bos(e.input_ids, tok.bos_token_id) and e.input_ids.count(tok.eos_token_id) == 1


def test_answer_loss_scores_exactly_the_training_ids(tok, model, monkeypatch):
    seen = {}
    real = likelihood.continuation_logprobs

    def spy(model, sequences, starts, *args, **kwargs):
        seen["ids"], seen["starts"] = sequences, starts
        return real(model, sequences, starts, *args, **kwargs)

    monkeypatch.setattr(likelihood, "continuation_logprobs", spy)
    answer_loss(model, tok, [QA(q, a) for q, a in QUESTIONS], progress=False)
    trained = encode_qa(tok, QUESTIONS)
    assert seen["ids"] == [e.input_ids for e in trained]
    assert seen["starts"] == [e.labels.index(next(y for y in e.labels if y != IGNORE)) for e in trained]


def test_choice_scores_the_ids_a_task_stream_trains(tok, model, monkeypatch):
    seen = {}
    real = likelihood.continuation_logprobs

    def spy(model, sequences, starts, *args, **kwargs):
        seen["ids"] = sequences
        return real(model, sequences, starts, *args, **kwargs)

    monkeypatch.setattr(likelihood, "continuation_logprobs", spy)
    choice_accuracy(model, tok, [Choice("The capital of France is", ["Paris", "Rome"], 0)], progress=False)
    assert all(_one_bos(ids, tok.bos_token_id) for ids in seen["ids"])


def test_generation_prompts_are_the_training_prompts(tok, model, monkeypatch):
    seen = []

    def fake_generate(**kwargs):
        seen.append(kwargs)
        ids = kwargs["input_ids"]
        return SimpleNamespace(sequences=ids, scores=())

    monkeypatch.setattr(model, "generate", fake_generate)
    generate(model, tok, ["What is the capital of France?"])
    assert seen[0]["input_ids"][0].tolist() == encode_qa(tok, QUESTIONS[:1])[0].input_ids[: len(seen[0]["input_ids"][0])]
    assert set(stop_token_ids(tok)) <= set(seen[0]["eos_token_id"])  # stops at <|end|>, not only at EOS


def test_the_trained_answer_ends_as_the_template_closes_a_turn(tok):
    end = tok.convert_tokens_to_ids("<|end|>")
    assert tok.eos_token == "<|endoftext|>" and end != tok.eos_token_id
    assert answer_suffix(tok, "Paris") == "Paris<|end|>" and end_of_answer(tok) == "<|end|>"
    for e in encode_qa(tok, QUESTIONS):
        assert e.labels[-1] == end and tok.eos_token_id not in e.input_ids
    assert set(stop_token_ids(tok)) == {end, tok.eos_token_id}
    # Without a template, the answer ends with EOS.
    assert answer_suffix(tok, "Paris", chat=False) == " Paris<|endoftext|>"


@pytest.mark.parametrize("template, opening, closing", [
    (CHAT_TEMPLATE, "", "<|end|>"),
    # Qwen/SmolLM style: a newline after the end of turn is not part of the answer.
    ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}", "", "<|end|>"),
    # Llama-2 style: a space before the answer and before the end token.
    ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|assistant|>{% else %}"
     " {{ m['content'] }} <|end|>{% endif %}{% endfor %}", " ", " <|end|>"),
])
def test_the_assistant_turn_is_trained_as_the_template_renders_it(template, opening, closing):
    tok = tiny_tokenizer()
    tok.chat_template = template
    assert assistant_turn(tok) == (opening, closing)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Paris"}],
                                       tokenize=False)
    assert rendered.startswith(build_prompt(tok, "Q?") + answer_suffix(tok, "Paris"))


def test_a_template_that_cannot_render_an_answer_falls_back_to_eos():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # no end of turn at all
    assert answer_suffix(tok, "Paris") == "Paris<|end|>"  # tiny_tokenizer's eos


def test_perplexity_and_drift_read_text_after_one_bos(tok, model, monkeypatch):
    from memtune.probes import drift, perplexity

    seen = []
    real = likelihood.pad_right

    def spy(seqs, *args):
        seen.extend(seqs)
        return real(seqs, *args)

    monkeypatch.setattr(likelihood, "pad_right", spy)
    monkeypatch.setattr(sys.modules["memtune.probes.drift"], "pad_right", spy)
    perplexity(model, tok, ["Paris is the capital of France."], progress=False)
    drift(model, tok, ["Paris is the capital of France."], base=tiny_model(vocab_size=BOS_VOCAB, seed=1),
          progress=False)
    assert seen and all(_one_bos(ids, tok.bos_token_id) for ids in seen)


@pytest.mark.parametrize("chat", [True, False])
def test_a_statements_words_before_its_answer_are_masked_whatever_the_opening(chat):
    from memtune.targets import fact_examples

    tok = tiny_tokenizer(chat=chat)
    if chat:  # Llama-2 style: a space between the prompt and the answer
        tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
                             "<|assistant|>{% else %} {{ m['content'] }} <|end|>{% endif %}{% endfor %}")
    item = QA("What is the capital of France?", "Paris", statement="The capital of France is Paris.")
    e = fact_examples([item], tok, "statement", "answer")[0]
    trained = tok.decode([t for t, y in zip(e.input_ids, e.labels) if y != IGNORE])
    assert trained.strip().startswith("Paris") and "capital" not in trained
