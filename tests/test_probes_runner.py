"""The probe runner: learning by chunk in one pass, paraphrases past the trained ones, a task's
held-out items, and forgetting probes from configured sources."""

import json

import pytest

from memtune.data import QA, Choice, Source
from memtune.errors import MemtuneError
from memtune.probes import ProbeConfig, Prober, choice_accuracy, normalize_answer, qa_accuracy
from memtune.probes import qa as qa_module
from tiny import tiny_model, tiny_tokenizer


def zorbia(n):
    return [QA(f"What is the capital of Zorbia {i}?", f"Quen{i}", paraphrases=[f"Zorbia {i}'s capital?",
            f"Which city is the capital of Zorbia {i}?"], id=f"z/{i}") for i in range(n)]


def test_retention_scores_each_chunk_in_one_pass_and_paraphrases_skip_the_trained(monkeypatch):
    asked = []

    def answer(model, tokenizer, questions, **kwargs):  # right on Zorbia 0, 1 and 3 only
        asked.append(list(questions))
        return [f"It is Quen{q.split()[-1][:-1]}." if q.split()[-1][:-1] in "013" else "No idea." for q in questions]

    monkeypatch.setattr(qa_module, "answer_questions", answer)
    items = zorbia(6)
    chunks = [items[:2], items[2:6], []]
    prober = Prober(ProbeConfig(), tokenizer=None, augment=1)
    assert prober.retention(None, chunks) == (0.5, [1.0, 0.25, None])
    assert len(asked) == 1 and asked[0] == [q.question for q in items]  # one pass, no paraphrases
    assert prober.learning(None, chunks[1:2]) == 0.25
    assert prober.retention(None, [[], []]) == (None, None)
    asked.clear()
    assert prober.paraphrases(None, items) == 0.5
    assert asked == [[q.paraphrases[1] for q in items]]  # the first of each was trained on


def test_retention_by_chunk_is_a_hand_count_of_qa_accuracy_predictions():
    model, tok = tiny_model(init_range=0.3), tiny_tokenizer()
    questions = ["What is the capital of France?", "Yen?", "Which region is Chile in?", "Rome", "What is 2 plus 3?",
                 "Python is a programming language;", "Who wrote it?", "The capital of Italy is"]
    said = qa_module.answer_questions(model, tok, questions, max_new_tokens=4, batch_size=3, progress=False)
    # every other question is answered right: its reference is what the model says
    items = [QA(q, s if i % 2 == 0 and normalize_answer(s) else "never said", id=str(i))
             for i, (q, s) in enumerate(zip(questions, said))]
    chunks = [items[:3], [], items[3:4], items[4:]]
    r = qa_accuracy(model, tok, items, max_new_tokens=4, batch_size=3, paraphrases=False, predictions=True,
                    progress=False)
    correct = [p["correct"] for p in r["predictions"]]
    by_hand = [sum(correct[:3]) / 3, None, sum(correct[3:4]) / 1, sum(correct[4:]) / 4]
    assert 0 < sum(correct) < len(items)  # some right, some wrong: the count means something

    prober = Prober(ProbeConfig(max_new_tokens=4, batch_size=3), tok)
    learning, by_chunk = prober.retention(model, chunks)
    assert learning == r["contains"] == sum(correct) / len(items)
    assert by_chunk == by_hand


def test_a_task_learns_on_its_held_out_items():
    model, tok = tiny_model(), tiny_tokenizer()
    held_out = [Choice(f"The capital of France is number {i}", ["Paris", "Rome", "the yen"], i % 3) for i in range(5)]
    prober = Prober(ProbeConfig(batch_size=8), tok, held_out=held_out)
    expected = choice_accuracy(model, tok, held_out, batch_size=2, progress=False)["accuracy"]
    assert prober.retention(model, [[], []]) == (expected, None)  # no questions to ask back: no by-chunk scores
    assert prober.learning(model, []) == expected


def test_forgetting_reads_each_configured_source(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    known = tmp_path / "known.jsonl"
    known.write_text("".join(json.dumps({"question": q.question, "answer": q.answer}) + "\n" for q in zorbia(3)))
    prober = Prober(ProbeConfig(known=Source(str(known), limit=2), text=Source("prose:heldout", limit=1),
                                answers=[Source(str(known))], max_new_tokens=2, max_length=32), tok)
    assert len(prober.known) == 2
    out = prober.forgetting(model, None)
    # a plain model has no base of its own: no drift without one passed
    assert sorted(out) == [f"answer-loss:{known}", "known", "perplexity"]
    assert out["known"] == 0.0 and out["perplexity"] > 1.0
    assert "drift" in prober.forgetting(model, tiny_model(seed=1))


def test_probe_config_refuses_a_non_positive_count():
    with pytest.raises(MemtuneError, match="probes.every=0 is invalid"):
        ProbeConfig(every=0)
