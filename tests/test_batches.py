"""Training examples: --max-length never cuts an answer."""

import json

import pytest

from memtune.batches import IGNORE, encode_qa
from memtune.data import QA, Choice
from memtune.errors import MemtuneError
from memtune.probes.likelihood import answer_loss, choice_accuracy
from tiny import cli_error, tiny_model

LONG = ("Which region is Chile in?", "South America, on the western side of the continent along the Pacific Ocean")


def _answer(tok, e):
    return [t for t, y in zip(e.input_ids, e.labels) if y != IGNORE]


def test_a_long_answer_keeps_every_token_and_its_end_the_prompt_is_cut_from_the_left(tokenizer, caplog):
    full = encode_qa(tokenizer, [LONG], max_length=512)[0]
    answer = _answer(tokenizer, full)
    assert len(answer) > 20 and answer[-1] == tokenizer.convert_tokens_to_ids("<|end|>")
    cut = encode_qa(tokenizer, [LONG], max_length=len(answer) + 3)[0]
    assert len(cut.input_ids) == len(answer) + 3
    assert _answer(tokenizer, cut) == answer                       # the whole answer and its end token
    assert cut.input_ids == full.input_ids[-len(cut.input_ids):]  # what is cut is the prompt's start
    assert "cut from the left" in caplog.text


def test_an_answer_that_cannot_fit_is_a_one_line_error_naming_the_example(tokenizer):
    with pytest.raises(MemtuneError, match="Which region is Chile in") as e:
        encode_qa(tokenizer, [("Q?", "A"), LONG], max_length=10)
    assert "\n" not in str(e.value)


def test_probes_keep_the_answer_too(tokenizer):
    model = tiny_model()
    short = answer_loss(model, tokenizer, [QA(*LONG)], max_length=64, progress=False)
    full = answer_loss(model, tokenizer, [QA(*LONG)], max_length=512, progress=False)
    assert short["tokens"] == full["tokens"]
    with pytest.raises(MemtuneError, match="too short"):
        choice_accuracy(model, tokenizer, [Choice("Q", ["a b c d e f g h i j k l m n o p"], 0)], max_length=4,
                        progress=False)


def test_learn_refuses_a_max_length_that_would_cut_an_answer(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"question": LONG[0], "answer": LONG[1]}) + "\n")
    cli_error(["learn", "--method", "full", "--model", str(tiny_model_dir), "--data", str(data),
               "--max-length", "12", "--out", str(tmp_path / "run")], capsys, "Which region is Chile in?")
    assert not (tmp_path / "run").exists()


def test_long_documents_lose_no_token_at_a_window_edge(tokenizer):
    from memtune.batches import encode_documents

    text = "Python is a programming language; a function returns a value and a class defines objects."
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    for max_length in (2, 3, 5, len(ids) - 1, len(ids), len(ids) + 4):
        examples = encode_documents(tokenizer, [text], max_length)
        assert all(2 <= len(e.input_ids) <= max_length for e in examples)
        predicted = [t for e in examples for t in e.input_ids[1:]]  # what the loss covers, in order
        assert predicted == ids[1:], max_length                      # every token once, the EOS last
    with pytest.raises(MemtuneError, match="max_length=1"):
        encode_documents(tokenizer, [text], 1)
