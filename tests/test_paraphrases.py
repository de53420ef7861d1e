"""Self-generated paraphrases (`memtune.paraphrases`): the filter on hand examples, and asking
a tiny model returns only what the filter keeps."""

from __future__ import annotations

import pytest
import torch

from memtune import paraphrases
from memtune.data import QA
from memtune.paraphrases import keep_paraphrase, paraphrase_fault, question_subjects, sample_rewrites, self_paraphrases
from tiny import tiny_model

Q = "What is the capital of Chad?"
S = "The capital of Chad is N'Djamena."
ANSWERS = ["N'Djamena", "Ndjamena"]


@pytest.mark.parametrize("rewrite, fault", [
    ("Which city is the capital of Chad?", None),
    ("Chad's capital is which city?", None),
    ("Which city is the capital?", "subject"),              # drops the subject
    ("Which city is the capital of Mali?", "subject"),
    ("Is N'Djamena the capital of Chad?", "answer"),         # gives the answer away
    ("Is Ndjamena the capital of Chad?", "answer"),          # ... or an alias of it
    ("Tell me the capital of Chad.", None),                  # a request asks it too
    ("Name the capital city of Chad.", None),
    ("Chad is a country in Africa.", "not a question"),
    ("Tell me which city is the capital of Chad.", None),
    ("Tell me about Chad.", "not a question"),            # asks something else
    ("State of Chad.", "not a question"),
    ("Name the capital of Chad. It is a city.", "not a question"),
    ("Name the capital of Chad?!", "not a question"),
    ("What is the capital of Chad? And of Mali?", "not a question"),
    ("what is the capital of chad", "same"),                 # the original, in other case and punctuation
    (Q, "same"),
    ("Chad?", "length"),
    ("", "length"),
])
def test_question_rewrites(rewrite, fault):
    assert paraphrase_fault(Q, rewrite, ANSWERS, {"chad"}) == fault
    assert keep_paraphrase(Q, rewrite, ANSWERS, {"chad"}) == (fault is None)


def test_a_rewrite_already_kept_or_held_out_is_a_duplicate():
    avoid = ["Which city is the capital of Chad?"]
    assert paraphrase_fault(Q, "Which city is the capital of Chad ?", ANSWERS, {"chad"}, avoid=avoid) == "duplicate"
    assert not keep_paraphrase(Q, "Which city is Chad's capital?", ANSWERS, set())  # no subject to check: not kept


@pytest.mark.parametrize("rewrite, fault", [
    ("Chad has its capital in N'Djamena.", None),
    ("Chad has a capital city.", "answer"),                   # lacks the answer
    ("The capital of Chad is Ndjamena.", "answer"),           # the answer as trained, not an alias
    ("N'Djamena is the capital of Chad.", "answer before subject"),
    ("The capital is N'Djamena.", "subject"),
    ("Is the capital of Chad N'Djamena?", "not a statement"),
    ("the capital of chad is n'djamena", "same"),
])
def test_statement_rewrites(rewrite, fault):
    assert paraphrase_fault(S, rewrite, ANSWERS, {"chad"}, kind="statement") == fault


def test_question_subjects():
    assert question_subjects(["Who founded Zorbia?", "What is the capital of Ostland?"]) == [{"zorbia"}, {"ostland"}]
    states = [f"What is the capital of {s}?" for s in ("Vermont", "Ohio", "Texas", "Utah", "Iowa")]
    mixed = [*states, "What is the atomic number of francium?", "In which year did Ohio become a US state?"]
    subjects = question_subjects(mixed)
    assert subjects[0] == {"vermont"}
    assert subjects[5] == {"atomic", "number", "francium"}  # no name: the words only it asks
    assert subjects[6] == {"ohio"}                          # its name, not "year" or "become"
    assert question_subjects(["Where is N'Djamena's river?"]) == [{"djamena"}]


ITEMS = [QA(Q, "N'Djamena", ["Ndjamena"], paraphrases=["Which city is the capital of Chad?"], statement=S),
         QA("Who founded Zorbia?", "Quenta")]
WRITTEN = {  # what the "model" writes, per original text
    Q: ["Which city is the capital of Chad?",    # the held-out paraphrase: not trained
        "Chad's capital is which city?",
        "Chad is a country in Africa.",          # not a question
        "Chad's capital is which city ?",        # a duplicate of the first kept
        "Is N'Djamena the capital of Chad?"],
    "Who founded Zorbia?": ["Who was the founder of Zorbia?", "Who founded it?", "Quenta founded Zorbia?",
                            "Zorbia was founded by whom?", "Who founded Zorbia?"],
    S: ["Chad has its capital in N'Djamena.", "N'Djamena is Chad's capital.", "Chad has a capital."],
}


@pytest.fixture
def fixed_model(monkeypatch):
    calls = []

    def fake(model, tokenizer, texts, k, kind="question", seed=0, *args, **kwargs):
        calls.append((kind, list(texts), k))
        return [WRITTEN[t][:k] for t in texts]

    monkeypatch.setattr(paraphrases, "sample_rewrites", fake)
    return calls


def test_self_paraphrases_returns_only_kept_rewrites(tokenizer, fixed_model):
    got = self_paraphrases(tiny_model(), tokenizer, ITEMS, k=5, statements=True, progress=False)
    assert got.questions == [["Chad's capital is which city?"],
                             ["Who was the founder of Zorbia?", "Zorbia was founded by whom?"]]
    assert got.statements == [["Chad has its capital in N'Djamena."], []]  # the second item has no statement
    assert fixed_model == [("question", [Q, "Who founded Zorbia?"], 5), ("statement", [S], 5)]
    report = got.report()
    assert report["questions"]["kept"] == 3 and report["questions"]["items_with_rewrites"] == 2
    assert report["questions"]["rejected"] == {"duplicate": 2, "not a question": 1, "answer": 2, "subject": 1,
                                               "same": 1}
    assert report["statements"] == {"kept": 1, "items_with_rewrites": 1,
                                    "rejected": {"answer before subject": 1, "answer": 1},
                                    "kept_rewrites": [["Chad has its capital in N'Djamena."], []]}
    questions_only = self_paraphrases(tiny_model(), tokenizer, ITEMS, k=2, progress=False)
    assert questions_only.statements == [[], []] and "statements" not in questions_only.report()


def test_asking_a_tiny_model_is_seeded_and_leaves_the_random_state(tokenizer):
    model = tiny_model(init_range=0.5)
    state = torch.random.get_rng_state()
    first = sample_rewrites(model, tokenizer, [Q, "Who founded Zorbia?", S], k=3, seed=1, max_new_tokens=6,
                            progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [len(r) for r in first] == [3, 3, 3] and all("\n" not in t for r in first for t in r)
    assert sample_rewrites(model, tokenizer, [Q, "Who founded Zorbia?", S], k=3, seed=1, max_new_tokens=6,
                           progress=False) == first
    got = self_paraphrases(model, tokenizer, ITEMS, k=3, max_new_tokens=6, statements=True, progress=False)
    subjects = question_subjects([q.question for q in ITEMS])
    for item, subject, kept in zip(ITEMS, subjects, got.questions):
        assert all(keep_paraphrase(item.question, r, item.answers, subject) for r in kept)


# -- word dropout ---------------------------------------------------------------------------


def test_word_dropout_leaves_out_one_or_two_free_words_never_the_subject():
    from memtune.paraphrases import word_dropout

    elements = ["francium", "radon", "lithium", "neon", "argon"]
    items = [*(QA(f"What is the atomic number of {e}?", "1") for e in elements),
             QA("What is the capital of Tuvalu?", "Funafuti", paraphrases=["What is capital of Tuvalu?"]),
             QA("Where is Chad?", "Africa")]
    assert question_subjects([q.question for q in items])[0] == {"francium"}
    variants = word_dropout(items, 100)
    # francium: free words is, the, atomic, number, of (5): 5 + 10 drops, all distinct
    assert len(variants[0]) == 15 and len(set(variants[0])) == 15
    words = items[0].question.split()
    for v in variants[0]:
        kept = v.split()
        assert kept[0] == "What" and kept[-1] == "francium?" and len(words) - len(kept) in (1, 2)
        assert kept == [w for w in words if w in kept]  # the question's words, in order
    # Tuvalu: is, the, capital, of → 4 + 6 drops, less the held-out paraphrase "What is capital of Tuvalu?"
    assert len(variants[5]) == 9 and "What is capital of Tuvalu?" not in variants[5]
    assert "What is the capital Tuvalu?" in variants[5] and "What the of Tuvalu?" in variants[5]
    assert variants[6] == []  # "Where Chad?": too short


def test_word_dropout_varies_a_question_whose_subject_is_a_symbol():
    from memtune.paraphrases import word_dropout

    symbols = ["As", "Er", "V", "Fe", "Ts"]
    items = [QA(f"Which chemical element has the symbol {s}?", "x") for s in symbols]
    assert question_subjects([q.question for q in items]) == [{s.lower()} for s in symbols]
    variants = word_dropout(items, 100)
    # free words: chemical, element, has, the, symbol (5): 5 + 10 drops
    assert [len(v) for v in variants] == [15] * 5
    assert "Which element has the symbol As?" in variants[0] and all(v.endswith(" As?") for v in variants[0])
    # a short name is a subject only where it is the question's own: the "U.S." of a gold question is not
    # the sulfur or uranium of the data, and "gold" stays in every variant
    mixed = [QA(q, "x") for q in ("Which element has the symbol S?", "Which element has the symbol U?",
                                  "What is the atomic number of gold?", "What is the atomic number of silver?",
                                  "What is the price of gold in the U.S. market?")]
    assert question_subjects([q.question for q in mixed])[4] == {"price", "gold", "market"}
    assert all("gold" in v for v in word_dropout(mixed, 100)[4])


def test_word_dropout_never_gives_a_variant_two_answers():
    from memtune.paraphrases import word_dropout

    items = [QA("What is the capital of Ostland?", "Varn"), QA("What is the currency of Ostland?", "Ost"),
             QA("What is the former capital of Ostland?", "Oldvarn")]
    variants = word_dropout(items, 100, avoid=[[], ["What is currency Ostland?"], []])
    every = [v for vs in variants for v in vs]
    assert "What is the of Ostland?" not in every  # both the capital's and the currency's
    assert "What is the capital of Ostland?" not in every  # item 0's question, from item 2
    assert "What is currency Ostland?" not in variants[1]  # avoided (a self-paraphrase, say)
    assert len(every) == len(set(every)) and "What is capital Ostland?" in variants[0]
    assert "What is the former of Ostland?" in variants[2]
    assert "What is the capital Ostland?" in variants[0]  # item 2 never drops "former" (MEANING_WORDS)
    assert not any("former" not in v.split() for v in variants[2])
    # a question the model must keep answering as it does is never a variant
    kept = word_dropout(items, 100, keep=["What is the capital Ostland?"])
    assert "What is the capital Ostland?" not in kept[0] and len(kept[0]) == len(variants[0]) - 1


def test_word_dropout_keeps_the_words_that_make_it_another_question():
    from memtune.paraphrases import word_dropout

    items = [QA("Who is the vice president of Ostland?", "Marla Venn"),
             QA("Which country is not in the Union of Pell?", "Ostland"),
             QA("Who was the first king of Zorbia?", "Quenta")]
    for item, word, variants in zip(items, ["vice", "not", "first"], word_dropout(items, 100)):
        assert variants and all(word in v.split() for v in variants), (item, variants)


def test_word_dropout_never_drops_a_lower_case_subject_and_is_seeded():
    from memtune.paraphrases import word_dropout

    # the subjects here are lower-case words in the middle of the question (a set of 5 tells them)
    names = ["lithium", "neon", "iron", "gold", "argon"]
    items = [QA(f"Is {name} a metal at room temperature?", "yes") for name in names]
    assert question_subjects([q.question for q in items]) == [{name} for name in names]
    variants = word_dropout(items, 4, seed=1)
    assert [len(v) for v in variants] == [4] * 5
    assert all(name in v.split() for name, vs in zip(names, variants) for v in vs)
    assert word_dropout(items, 4, seed=1) == variants and word_dropout(items, 0) == [[]] * 5
    assert word_dropout([QA("Who is Zorbia?", "x")], 3) == [[]]  # "Who Zorbia?": too short
    assert word_dropout([QA("Qui est Bob ?", "x")], 3) == [[]]  # "Qui Bob ?": two words
    assert sorted(word_dropout([QA("Who really founded Zorbia?", "x")], 3)[0]) == ["Who founded Zorbia?",
                                                                                 "Who really Zorbia?"]
    assert word_dropout([QA("what is the boiling point of water?", "100")], 3) == [[]]  # no subject found
    with pytest.raises(ValueError, match="k=-1"):
        word_dropout(items, -1)
