"""QA scoring: SQuAD normalisation, exact match, F1, contains-match; the probe end to end."""

import pytest

from memtune.data import QA
from memtune.probes import exact_match, is_correct, normalize_answer, qa_accuracy, token_f1
from memtune.probes import qa as qa_module
from tiny import tiny_model, tiny_tokenizer


def test_normalize_answer_like_squad():
    assert normalize_answer("  The  Eiffel-Tower, Paris!  ") == "eiffeltower paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Paris.", "Paris")
    assert not exact_match("Paris, France", "Paris")
    assert exact_match("paris france", ["Lyon", "Paris, France"])
    assert token_f1("Paris", "Paris") == 1.0
    # pred {paris, is, capital}, gold {paris}: P = 1/3, R = 1 -> F1 = 0.5
    assert token_f1("Paris is the capital", "Paris") == pytest.approx(0.5)
    # pred {new, york, city}, gold {new, york}: P = 2/3, R = 1 -> 0.8
    assert token_f1("New York City", "New York") == pytest.approx(0.8)
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("Rome", ["Paris", "Rome"]) == 1.0
    assert token_f1("", "Paris") == 0.0


def test_contains_match_whole_words_and_verbatim_short_answers():
    assert is_correct("The capital of France is Paris.", ["Paris"])
    assert is_correct("It is the Sunset Blvd.", ["Sunset Boulevard", "Sunset Blvd"])
    assert not is_correct("Parisians live there", ["Paris"])  # whole words only
    assert is_correct("Its code is IN.", ["IN"]) and not is_correct("It lies in Asia.", ["IN"])
    assert is_correct("Dial +33 first.", ["+33", "33"]) and not is_correct("Dial 330.", ["+33", "33"])
    assert is_correct("Websites end in .fr", [".fr"]) and not is_correct("fr", [".is"])
    assert not is_correct("anything", ["the"])  # nothing left after normalisation


def test_qa_accuracy_scores_questions_and_paraphrases(monkeypatch):
    items = [
        QA("What is the capital of France?", "Paris", paraphrases=["France's capital?", "Capital city of France?"], id="a"),
        QA("Who wrote Hamlet?", "Shakespeare", aliases=["William Shakespeare"], id="b"),
    ]
    canned = {
        "What is the capital of France?": "Paris",
        "France's capital?": "It is Paris.",
        "Capital city of France?": "Lyon",
        "Who wrote Hamlet?": "It was William Shakespeare.",
    }
    monkeypatch.setattr(qa_module, "generate", lambda model, tok, qs, **kw: [canned[q] for q in qs])
    r = qa_accuracy(None, None, items, predictions=True)
    assert r["n"] == 2 and r["exact_match"] == 0.5 and r["contains"] == 1.0
    assert r["f1"] == pytest.approx((1.0 + 2 * (2 / 4) * 1 / (2 / 4 + 1)) / 2)  # "it was william shakespeare"
    assert r["paraphrases"]["n"] == 2 and r["paraphrases"]["contains"] == 0.5 and r["paraphrases"]["exact_match"] == 0.0
    assert [p["prediction"] for p in r["predictions"] if not p.get("paraphrase")] == ["Paris", "It was William Shakespeare."]
    assert qa_accuracy(None, None, items, paraphrases=False)["paraphrases"] is None


def test_qa_accuracy_runs_a_tiny_model_batched():
    model, tok = tiny_model(), tiny_tokenizer()
    items = [QA(f"What is {i} plus {i}?", str(2 * i), paraphrases=[f"{i} + {i} = ?"]) for i in range(5)]
    r = qa_accuracy(model, tok, items, max_new_tokens=4, batch_size=2, predictions=True, progress=False)
    assert r["n"] == 5 and r["paraphrases"]["n"] == 5 and len(r["predictions"]) == 10
    assert 0.0 <= r["f1"] <= 1.0


def _greedy_by_hand(model, tok, question, max_new_tokens):
    """One question alone, unpadded: greedy tokens and top-1 minus top-2 log-probabilities."""
    import torch

    from memtune.prompts import encode_prompt

    ids, gen, gaps = encode_prompt(tok, [question])[0], [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            top = model(torch.tensor([ids + gen])).logits[0, -1].log_softmax(-1).topk(2)
            if int(top.indices[0]) in (tok.eos_token_id, tok.pad_token_id):
                break
            gen.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
    return gen, gaps


def test_answers_with_margins_match_a_token_by_token_greedy_reference():
    model, tok = tiny_model(init_range=0.3), tiny_tokenizer()
    questions = ["What is the capital of France?", "Yen?", "Which region is Chile in, and why?", "Rome"]
    by_hand = [_greedy_by_hand(model, tok, q, 8) for q in questions]
    # the first item's answer is complete after its first word: its margin covers only those tokens
    gen, _ = by_hand[0]
    cut = next(t + 1 for t in range(len(gen)) if normalize_answer(tok.decode(gen[: t + 1])))
    early = tok.decode(gen[:cut]).strip()
    items = [QA(questions[0], early)] + [QA(q, "never said") for q in questions[1:]]
    got = qa_module.answers_with_margins(model, tok, items, max_new_tokens=8, batch_size=3, progress=False)
    for item, (answer, margin), (gen, gaps) in zip(items, got, by_hand):
        end = next((t + 1 for t in range(len(gen)) if is_correct(tok.decode(gen[: t + 1]), item.answers)), len(gen))
        assert answer == tok.decode(gen).strip()
        assert margin == pytest.approx(min(gaps[:end]), abs=1e-4)
    assert is_correct(got[0][0], early)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_still_greedy_accepts_the_greedy_answer_and_nothing_else(arch):
    from memtune.generation import greedy_ids, still_greedy

    model, tok = tiny_model(arch, init_range=0.3), tiny_tokenizer()
    questions = ["What is the capital of France?", "Yen?", "Which region is Chile in, and why?"]
    ids = greedy_ids(model, tok, questions, max_new_tokens=6, batch_size=2)
    assert ids == [_greedy_by_hand(model, tok, q, 6)[0] for q in questions] and all(len(a) == 6 for a in ids)
    assert still_greedy(model, tok, questions, ids, max_new_tokens=6, batch_size=2) == [True] * 3
    other = [a[:-1] + [(a[-1] + 1) % 300 + 6] for a in ids]  # the last token another
    assert still_greedy(model, tok, questions, other, max_new_tokens=6) == [False] * 3
    # cut short: greedy decoding would not stop there (no stop token is the pick)
    assert still_greedy(model, tok, questions, [a[:4] for a in ids], max_new_tokens=6) == [False] * 3
    # with the pick after 3 tokens a stop token, the answer ends there, and only there
    first = ids[0]
    assert first[3] not in first[:3]
    model.generation_config.eos_token_id = [tok.eos_token_id, first[3]]
    stopped = greedy_ids(model, tok, questions[:1], max_new_tokens=6)
    assert stopped == [first[:3]]
    assert still_greedy(model, tok, questions[:1], stopped, max_new_tokens=6) == [True]
    assert still_greedy(model, tok, questions[:1], [first[:2]], max_new_tokens=6) == [False]
    mixed = greedy_ids(model, tok, questions, max_new_tokens=6)  # answers of other lengths in one batch
    assert mixed[0] == first[:3] and still_greedy(model, tok, questions, mixed, max_new_tokens=6) == [True] * 3
    # a setting at a value that changes nothing leaves it on; greedy decoding under a repetition
    # penalty or with beams is not the logits' argmax: never taken as unchanged
    model.generation_config.repetition_penalty, model.generation_config.num_beams = 1.0, 1
    assert still_greedy(model, tok, questions[:1], stopped, max_new_tokens=6) == [True]
    for name, value in (("repetition_penalty", 1.3), ("num_beams", 2), ("guidance_scale", 5.0)):
        setattr(model.generation_config, name, value)
        assert still_greedy(model, tok, questions[:1], stopped, max_new_tokens=6) == [False]
        setattr(model.generation_config, name, 1.0 if name != "num_beams" else 1)


def test_greedy_ids_end_only_at_an_end_token(tokenizer):
    """A pad token the model picks mid-answer (pad is not an end token here) is part of the
    answer, as `generate` keeps going past it: the same text."""
    import torch

    from memtune.generation import generate, greedy_ids, still_greedy
    from memtune.prompts import encode_prompt

    model = tiny_model(init_range=0.3)
    question = ["What is the capital of France?"]
    first = greedy_ids(model, tokenizer, question, max_new_tokens=6)[0]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.pad_token_id not in first
    with torch.no_grad():  # the pad token becomes the pick where the third token was
        prompt = encode_prompt(tokenizer, question)[0]
        top = model(torch.tensor([prompt + first[:2]])).logits[0, -1, first[2]]
        model.lm_head.weight[tokenizer.pad_token_id] = (1.05 if top > 0 else 0.95) * model.lm_head.weight[first[2]]
    ids = greedy_ids(model, tokenizer, question, max_new_tokens=6)[0]
    assert tokenizer.pad_token_id in ids[:-1] and len(ids) == 6  # picked mid-answer, and it goes on
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == generate(model, tokenizer, question, 6)[0]
    assert still_greedy(model, tokenizer, question, [ids], max_new_tokens=6) == [True]
