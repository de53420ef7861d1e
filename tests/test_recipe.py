"""The recipe `memtune learn` runs by default: its steps, until-learned training, and learning
in several calls (the checkpoint's ledger)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from memtune.batches import Example, collate, encode_qa
from memtune.cli import main
from memtune.data import QA, Document
from memtune.errors import MemtuneError
from memtune.recipe import (
    AnswerCheck,
    AnswersKept,
    RecipeConfig,
    cross_questions,
    default_memory_config,
    learn,
    listed_questions,
    named_subjects,
    neighbourhood_examples,
    neighbourhood_prompts,
    put_subject,
    question_forms,
    read_questions,
    related_questions,
    subject_span,
    subject_words,
)
from memtune.targets import first_sentence, own_statements, statement_prefixes
from memtune.train import LearnConfig, make_method, train
from tiny import tiny_memory_config, tiny_model, tiny_tokenizer

FACTS = [QA("Who founded Zorbia?", "Quenta"), QA("What is the capital of Ostland?", "Varn")]


def answer_with(monkeypatch, answers):
    """The model's greedy answers, as text (own answers, statements) and as the until-learned
    check's token ids, are `answers(model, tokenizer, questions)`; none is taken as unchanged."""
    from memtune import generation
    from memtune.probes import qa

    monkeypatch.setattr(qa, "answer_questions", answers)
    monkeypatch.setattr(qa, "answer_ids", lambda m, t, questions, *a, **kw: [
        t(x, add_special_tokens=False)["input_ids"] for x in answers(m, t, questions, *a, **kw)])
    monkeypatch.setattr(generation, "still_greedy", lambda m, t, questions, *a, **kw: [False] * len(questions))


def write_facts(path, facts=FACTS):
    path.write_text("".join(json.dumps({"question": q.question, "answer": q.answer}) + "\n" for q in facts))
    return str(path)


def test_listed_questions_keeps_list_items_that_are_questions():
    text = ("- What is the capital of France?\n- The answer is Paris.\n* Who wrote it?\n"
            "2. Which river flows through Rome?\nWhat is not listed?\n- Why?")
    assert listed_questions(text) == ["What is the capital of France?", "Who wrote it?",
                                      "Which river flows through Rome?"]


def test_subject_words_are_what_questions_are_about():
    questions = [f"What is the capital of {s}?" for s in ("Vermont", "Ohio", "Texas", "Utah", "Iowa")]
    questions += ["What is the atomic number of francium?", "In which year did Ohio become a US state?"]
    # the year question shares no form: its name is its subject; the element question has no name
    assert subject_words(questions) == {"vermont", "ohio", "texas", "utah", "iowa", "atomic", "number", "francium"}
    assert subject_words(["What is the capital of Zorbia?"]) == {"zorbia"}  # too few to tell form by counts
    many = [f"What is the {r} of {c}?" for r in ("capital", "currency", "president", "anthem", "motto", "flower")
            for c in ("Zorbia", "Ostland", "Varn", "Quenta", "Lorr", "Mett", "Pell", "Dunn", "Fask", "Gorr")]
    assert subject_words(many) == {c.lower() for c in ("Zorbia", "Ostland", "Varn", "Quenta", "Lorr", "Mett",
                                                        "Pell", "Dunn", "Fask", "Gorr")}


def test_question_forms_tell_form_from_subject_in_a_mix_of_relations():
    """A form word in one or two questions of a mix ("continent", "official") is not a subject;
    a subject of several words ("Sri Lanka", "the Northern Mariana Islands") is one blank."""
    questions = ["What is the capital of Sri Lanka?", "What is the capital of Chad?",
                 "On which continent is the Northern Mariana Islands?", "On which continent is Chad?",
                 "Bamako is the capital of which country?", "Manama is the capital of which country?",
                 "What is an official language of Peru?", "Name a country that borders Spain.",
                 "What is the atomic number of iron?", "What is the atomic number of neon?"]
    assert question_forms(questions) == [
        ("what is the capital of _", {"sri", "lanka"}), ("what is the capital of _", {"chad"}),
        ("on which continent is _", {"northern", "mariana", "islands"}), ("on which continent is _", {"chad"}),
        ("_ is the capital of which country", {"bamako"}), ("_ is the capital of which country", {"manama"}),
        ("what is an official language of peru", {"peru"}), ("name a country that borders spain", {"spain"}),
        ("what is the atomic number of _", {"iron"}), ("what is the atomic number of _", {"neon"})]
    assert not {"continent", "official", "language", "borders", "atomic"} & subject_words(questions)


def test_question_forms_keep_a_long_name_whole():
    """A subject of several names, stop words among them, is one span; a shorter span that
    shares a form with another relation of the same country ("capital of São" against "currency
    of São") is not the subject, nor is the last word of a lower-case compound."""
    countries = ["São Tomé and Príncipe", "the U.S. Virgin Islands", "the Democratic Republic of the Congo", "Chad"]
    questions = [f"What is the {r} of {c}?" for r in ("capital", "currency") for c in countries]
    assert [s for _, s in question_forms(questions)[:3]] == [
        {"são", "tomé", "príncipe"}, {"virgin", "islands"}, {"democratic", "republic", "congo"}]
    assert {f for f, _ in question_forms(questions)} == {"what is the capital of _", "what is the currency of _"}
    first = [f"{c} is the capital of which country?" for c in ("São Tomé", "Porto-Novo", "Bamako")]
    assert [s for _, s in question_forms(first)] == [{"são", "tomé"}, {"porto", "novo"}, {"bamako"}]
    salts = ["sodium chloride", "sodium nitrate", "potassium chloride", "calcium carbonate", "magnesium sulfate"]
    assert question_forms([f"What is the chemical formula of {x}?" for x in salts])[0] == (
        "what is the chemical formula of _", {"sodium", "chloride"})
    long = "Why " + "very " * 60 + "long?"  # longer than max_words: its own form, at no quadratic cost
    assert question_forms([long, long])[0] == (_normal_words(long), set())


def test_a_symbol_or_a_code_is_a_subject_where_it_is_a_name():
    """A subject of one or two letters (an element symbol, a code) is the subject of its question,
    but counts in other text only where it is written as a name: "In which year" and "known as"
    do not name the indium or arsenic of the data (before, such questions had no subject, so no
    word-dropout variant)."""
    questions = [f"Which chemical element has the symbol {s}?" for s in ("As", "In", "I", "Fe", "Ts")]
    questions += ["What is the atomic number of iron?", "What is the atomic number of neon?"]
    forms = question_forms(questions)
    assert forms[:5] == [("which chemical element has the symbol _", {s}) for s in ("as", "in", "i", "fe", "ts")]
    assert forms[5] == ("what is the atomic number of _", {"iron"})
    subjects = subject_words(questions)
    assert named_subjects("In which year was iron known as a metal?", subjects) == {"iron"}
    assert named_subjects("Which element has the symbol In?", subjects) == {"in"}
    assert named_subjects("Is I the symbol of iodine?", subjects) == {"i"}
    assert named_subjects("Which state is France's neighbour?", subjects | {"s"}) == set()  # the "s" of "'s"
    assert subject_span("In which group is In?", {"in"}) == (18, 20)  # the name, not the first word


def _normal_words(text):
    return " ".join(text.lower().replace("?", "").split())


def test_related_questions_of_a_mix_keep_its_rare_forms_and_leave_out_its_subjects(tokenizer):
    """In a mix of relations, a relation asked once or twice ("official language", "continent")
    is form: the model's questions of that form are kept, those about a subject of the data are
    left out (before question_forms, "official" in one question of 5+ made it a subject)."""
    model = tiny_model()
    more = torch.tensor(tokenizer.encode(
        " What is an official language of Pellia?\n- On which continent is Pellia?\n- What is the capital of Varn?"
        "\n- On which continent is Chad?\n- Who is Bob?", add_special_tokens=False))
    model.generate = lambda **batch: torch.cat([batch["input_ids"], more.expand(len(batch["input_ids"]), -1)], 1)
    questions = [f"What is the capital of {c}?" for c in ("Zorbia", "Ostland", "Varn", "Quenta", "Lorr")]
    questions += ["On which continent is Chad?", "On which continent is Mett?", "What is an official language of Pell?"]
    related = related_questions(model, tokenizer, questions, n=9, batch_size=4, progress=False)
    assert related == ["What is an official language of Pellia?", "On which continent is Pellia?", "Who is Bob?"]


def test_subject_span_covers_a_name_with_stop_words_inside():
    text = "What is the capital of the Democratic Republic of the Congo today?"
    start, end = subject_span(text, {"democratic", "republic", "congo"})
    assert text[start:end] == "Democratic Republic of the Congo"
    assert subject_span("Where is Varn?", {"chad"}) is None


def test_neighbourhood_examples_ask_a_fact_about_other_subjects_up_to_its_answer(tokenizer):
    """Each fact's question and statement opening with the subject of a related question — its
    own form's first — and the loss on that opening and the end of the turn only."""
    items = [QA("What is the capital of Zorbia?", "Quenta", statement="The capital of Zorbia is Quenta."),
             QA("What is the capital of Ostland?", "Varn", statement="Varn.")]
    others = ["What is the capital of Pellia?", "Who founded Mettland?", "What is the capital of Zorbia?",
              "Who leads the Republic of Zorbia?"]  # never Zorbia, nor a subject that names it
    examples = neighbourhood_examples(tokenizer, items, others, n=2)
    assert len(examples) == 4
    expected = [("What is the capital of Pellia?", "The capital of Pellia is"),  # same form first
                ("What is the capital of Mettland?", "The capital of Mettland is"),
                ("What is the capital of Pellia?", ""),  # the statement starts with its answer: no opening
                ("What is the capital of Mettland?", "")]  # never Zorbia: a subject of the data
    for example, want in zip(examples, expected):
        [reference] = encode_qa(tokenizer, [want])  # the loss on the answer given, then the end of the turn
        assert example.input_ids == reference.input_ids and example.labels == reference.labels
    twice = QA("Is the capital of Zorbia its largest city?", "yes", statement="Zorbia's capital, in Zorbia: yes")
    [example] = neighbourhood_examples(tokenizer, [twice], others[:1], n=1)
    assert example.input_ids == encode_qa(tokenizer, [("Is the capital of Pellia its largest city?",
                                                       "Pellia's capital, in Pellia:")])[0].input_ids
    bare = neighbourhood_examples(tokenizer, items[:1], others, n=1, statements=False)
    assert bare[0].input_ids == encode_qa(tokenizer, [("What is the capital of Pellia?", "")])[0].input_ids
    assert neighbourhood_examples(tokenizer, items, [], n=3) == []
    symbols = [QA(f"Which element has the symbol {s}?", "x", statement=f"The symbol {s} is x.") for s in ("W", "As")]
    [example, _] = neighbourhood_examples(tokenizer, symbols, ["Which element has the symbol Au?"], n=1)
    assert example.input_ids == encode_qa(tokenizer, [("Which element has the symbol Au?", "The symbol Au is")])[
        0].input_ids  # the symbol W as a word, not the W of "Which"


def test_put_subject_swaps_the_subject_with_its_article():
    assert put_subject("What is the capital of the Gambia?", "Gambia", "France", False) == "What is the capital of France?"
    assert put_subject("What is the capital of Peru?", "Peru", "Czech Republic", True) == \
        "What is the capital of the Czech Republic?"
    assert put_subject("The Gambia's capital is", "Gambia", "Czech Republic", True) == "The Czech Republic's capital is"
    assert put_subject("Peru borders Chile. Peru is", "Peru", "Gambia", True) == "The Gambia borders Chile. The Gambia is"
    assert put_subject("Which element has the symbol W? W is", "W", "Au", False) == "Which element has the symbol Au? Au is"
    assert put_subject("Theodor of Peru", "Peru", "Chad", False) == "Theodor of Chad"  # whole words only
    facts = [QA("What is the capital of the Gambia?", "Banjul", statement="The capital of the Gambia is Banjul.")]
    others = ["What is the capital of Peru?", "What is the capital of the Czech Republic?"]
    pairs = sorted(neighbourhood_prompts(facts, others, 2))
    assert pairs == [("What is the capital of Peru?", "The capital of Peru is"),
                     ("What is the capital of the Czech Republic?", "The capital of the Czech Republic is")]


def test_neighbourhood_prompts_are_protected(tokenizer, tmp_path):
    """--neighbourhood adds the neighbourhood prompts' reads to the protected slots."""
    facts = [QA(f"What is the capital of {c}?", a, statement=f"The capital of {c} is {a}.")
             for c, a in (("Zorbia", "Quenta"), ("Ostland", "Varn"))]
    keep = tmp_path / "keep.txt"
    keep.write_text("What is the capital of Pellia?\nWhat is the capital of Mettland?\nWho is Bob?\n")
    slots = {}
    for n in (0, 3):
        result = learn(tiny_model(), tokenizer, facts, LearnConfig(epochs=1, batch_size=2),
                       RecipeConfig(n_keys=16, related=0, neighbourhood=n, keep=str(keep)), progress=False)
        slots[n] = sum(result.recipe["protect"]["slots"].values())
    assert result.recipe["neighbourhood"]["examples"] == 6
    assert slots[3] > slots[0]


def test_answers_kept_compares_first_sentences(tokenizer):
    model = tiny_model(init_range=0.5)
    kept = AnswersKept(model, tokenizer, ["What is the capital of Pellia?", "Who is Bob?", "Who rules Ostland?"],
                       max_new_tokens=6, progress=False)
    assert len(kept.questions) == len(kept.examples) == 3 and kept(model) == []
    kept.answers[0] = first_sentence(kept.answers[0]) + ". Then other words."  # a later sentence: still kept
    kept.answers[2] = "Quenta rules it."
    assert kept(model) == [2]


def _learn_capitals_checked(model_dir, tmp_path, epochs: int):
    """Two capitals learned by the learnable tiny model with --neighbourhood-check 3, the other
    subjects from --keep questions of their form, nothing protected."""
    from memtune.models import load_model

    facts = [QA(f"What is the capital of {c}?", a) for c, a in (("Zorbia", "Quenta"), ("Ostland", "Varn"))]
    keep = tmp_path / "keep.txt"
    keep.write_text("What is the capital of Pellia?\nWhat is the capital of Mettland?\nWhat is the capital of Frobia?\n")
    model, tokenizer = load_model(str(model_dir))
    return learn(model, tokenizer, facts, LearnConfig(epochs=epochs, batch_size=1, lr=20),
                 RecipeConfig(n_keys=16, related=0, neighbourhood_check=3, keep=str(keep), protect="none"),
                 progress=False)


def test_neighbourhood_check_unwrites_what_changed_answers_read_and_learns_again(learnable_model_dir, tmp_path):
    """Questions of the data's form about other subjects (from --keep here) are answered otherwise
    after learning when nothing protects them; the rows they read are given back their values
    (zero: a fresh memory), and the facts are trained again around them."""
    result = _learn_capitals_checked(learnable_model_dir, tmp_path, epochs=20)
    check = result.recipe["neighbourhood_check"]
    assert check["questions"] == 3 and check["rounds"][0]["changed"] > 0 and check["rounds"][0]["rows_unwritten"] > 0
    assert check["right_before"] == 2 and 0 <= check["right_after"] <= 2  # (16² slots: room to learn again is scarce)
    steps = [m["step"] for m in result.history]
    assert len(check["rounds"]) > 1 and steps == list(range(1, len(steps) + 1))  # trained again, numbered on
    method = result.method
    back = method.protected[0]
    assert back.numel() >= check["rounds"][0]["rows_unwritten"] and not torch.isin(back, method.touched[0]).any()
    assert not result.model.memory.values[0].weight.detach()[back].any()  # their values before: zero
    # the verdicts reported are the final model's, for the facts trained again and the others
    from memtune.models import load_model
    from memtune.recipe import AnswerCheck

    facts = [QA(f"What is the capital of {c}?", a) for c, a in (("Zorbia", "Quenta"), ("Ostland", "Varn"))]
    asked = AnswerCheck(load_model(str(learnable_model_dir))[1], facts)(result.model)
    assert sum(asked) == check["right_after"] == result.recipe["learned"]["right"] and asked == result.learned


def test_neighbourhood_keep_protects_the_datas_forms_about_other_subjects(learnable_model_dir, tmp_path):
    """--neighbourhood-keep N: each fact's question about N subjects of the --keep (and related)
    questions is kept as those are: answered in the model's own words and protected; none is a
    question of the data. With no related or --keep questions to take subjects from, nothing."""
    from memtune.models import load_model

    facts = [QA(f"What is the capital of {c}?", a) for c, a in (("Zorbia", "Quenta"), ("Ostland", "Varn"))]
    keep = tmp_path / "keep.txt"
    keep.write_text("What is the capital of Pellia?\nWhat is the capital of Mettland?\nWho founded Frobia?\n")

    def run(n, keep_file=None):
        model, tokenizer = load_model(str(learnable_model_dir))
        return learn(model, tokenizer, facts, LearnConfig(epochs=1, batch_size=1),
                     RecipeConfig(n_keys=16, related=0, keep=keep_file, neighbourhood_keep=n), progress=False)

    plain, kept = run(0, str(keep)), run(3, str(keep))
    report = kept.recipe["neighbourhood_keep"]
    assert "neighbourhood_keep" not in plain.recipe and report["per_fact"] == 3
    # Pellia and Mettland in the facts' form are --keep questions already; Frobia is new in it
    assert report["questions"] == 1 and report["examples"] == ["What is the capital of Frobia?"]
    assert plain.recipe["protect"]["questions"] == 3 and kept.recipe["protect"]["questions"] == 4
    assert plain.recipe["protect"]["neighbourhood"] == 0 and kept.recipe["protect"]["neighbourhood"] == 1
    assert all(kept.recipe["protect"]["slots"][k] >= v for k, v in plain.recipe["protect"]["slots"].items())
    assert "neighbourhood_keep" not in run(2).recipe  # nothing to take subjects from (--related 0, no --keep)


def test_cross_questions_ask_each_subject_in_the_other_forms():
    facts = [QA("What is the capital of Zorbia?", "Quenta"), QA("What is the capital of Ostland?", "Varn"),
             QA("Who founded Pellia?", "Bob"), QA("Who founded Frobia?", "Ann"),
             QA("What is the currency of Pellia?", "Pell")]
    assert cross_questions(facts) == [
        ("Who founded Zorbia?", "Zorbia"), ("What is the currency of Zorbia?", "Zorbia"),
        ("Who founded Ostland?", "Ostland"), ("What is the currency of Ostland?", "Ostland"),
        ("What is the capital of Pellia?", "Pellia"),  # (and not its currency: a question of the data)
        ("What is the capital of Frobia?", "Frobia"), ("What is the currency of Frobia?", "Frobia")]
    assert cross_questions(facts[:2]) == []  # one form

    def questions(items):
        return [q for q, _ in cross_questions(items)]

    # not the data's own question with a "the", nor a template whose subject follows one
    assert questions([QA("What is the currency of the Gambia?", "GMD"), QA("What is the currency of Chad?", "XAF"),
                            QA("What is the capital of Chad?", "N'Djamena"), QA("What is the capital of Peru?", "Lima")]
                           ) == ["What is the capital of Gambia?", "What is the currency of Peru?"]
    # a subject that is not a whole name (C of C++) is neither asked nor asked about
    assert questions([QA(q, "x") for q in ("Who designed C++?", "Who designed Python?",
                                                 "What is the capital of Zorbia?", "What is the capital of Ostland?")]
                           ) == ["What is the capital of Python?", "Who designed Zorbia?", "Who designed Ostland?"]
    # free-form trivia: no question shares a form, so none is one to ask others in
    assert questions([QA(q, "x") for q in ("Who wrote Moby Dick?", "In which year did the Titanic sink?",
                                                 "Who was the first President of Kenya?")]) == []


def test_neighbourhood_cross_protects_what_other_forms_of_several_subjects_read(tokenizer, monkeypatch):
    """--neighbourhood-cross: the data's subjects asked in its other forms are answered in the
    model's own words; their reads where those answers are predicted, counted per subject, are
    in the background, and the slots the answers about 2 or more subjects read are protected."""
    facts = [QA("What is the capital of Zorbia?", "Quenta"), QA("What is the capital of Pellia?", "Pell"),
             QA("Who founded Ostland?", "Varn"), QA("Who founded Mettland?", "Ann")]
    import memtune.recipe as recipe
    from memtune.stats import group_stats

    counted = []
    monkeypatch.setattr(recipe, "group_stats", lambda *a, **k: counted.append(group_stats(*a, **k)) or counted[-1])
    runs = {flag: learn(tiny_model(), tokenizer, facts, LearnConfig(epochs=1, batch_size=2),
                        RecipeConfig(n_keys=16, related=0, neighbourhood_cross=flag), progress=False).recipe
            for flag in (False, True)}
    assert "neighbourhood_cross" not in runs[False] and "protect" not in runs[False]  # nothing to protect
    assert runs[True]["neighbourhood_cross"] == {
        "questions": 4, "answered": 4, "subjects": 4,
        "examples": ["Who founded Zorbia?", "Who founded Pellia?", "What is the capital of Ostland?"]}
    assert runs[True]["protect"]["cross"] == runs[True]["protect"]["questions"] == 4
    assert runs[True]["protect"]["source"].endswith(
        "cross questions (counted where their answers are predicted); of these, what the answers about 2 or more "
        "subjects read")
    [cross] = counted  # one group per subject; protected: what two or more read (no other question here)
    assert cross.n_batches == 4
    assert runs[True]["protect"]["slots"] == {k: int((v >= 2).sum()) for k, v in cross.df.items()}
    assert 0 < sum(runs[True]["protect"]["slots"].values()) < sum(int((v > 0).sum()) for v in cross.df.values())
    assert runs[True]["background"]["batches"] == runs[False]["background"]["batches"] + 4
    with pytest.raises(MemtuneError, match="neighbourhood_cross='false' is invalid"):
        RecipeConfig(neighbourhood_cross="false")
    with pytest.raises(MemtuneError, match="--neighbourhood-cross is for facts"):
        learn(tiny_model(), tokenizer, [Document("Some text about Zorbia.")], LearnConfig(epochs=1),
              RecipeConfig(n_keys=16, related=0, neighbourhood_cross=True), progress=False)


def test_neighbourhood_prompts_pass_over_skipped_questions():
    """A skipped question gives its place to the fact's next subject: still `n` per fact."""
    facts = [QA("What is the capital of Zorbia?", "Quenta")]
    others = [f"What is the capital of {c}?" for c in ("Pellia", "Mettland", "Frobia")]
    drawn = [q for q, _ in neighbourhood_prompts(facts, others, 3, statements=False)]
    assert sorted(drawn) == sorted(others)
    skip = frozenset(["what is the capital of " + drawn[0].split()[-1][:-1].lower()])
    assert [q for q, _ in neighbourhood_prompts(facts, others, 2, statements=False, skip=skip)] == drawn[1:]


def test_a_cross_question_answered_with_nothing_takes_its_subject_with_it(tokenizer, monkeypatch):
    """The cross answers are counted per subject: a question the model answers with nothing is
    left out, and the other questions keep their own subjects."""
    import memtune.recipe as recipe
    from memtune.stats import group_stats

    class Silent(recipe.AnswersKept):  # the model answers "Who founded Zorbia?" with nothing
        def __init__(self, model, tokenizer, questions, *args, **kwargs):
            super().__init__(model, tokenizer, questions, *args, **kwargs)
            keep = [i for i, q in enumerate(self.questions) if q != "Who founded Zorbia?"]
            self.questions, self.answers = [self.questions[i] for i in keep], [self.answers[i] for i in keep]
            self.examples = [self.examples[i] for i in keep]

    sizes = []
    monkeypatch.setattr(recipe, "AnswersKept", Silent)
    monkeypatch.setattr(recipe, "group_stats",
                        lambda model, groups, *a, **k: sizes.append([len(g) for g in groups]) or group_stats(
                            model, groups, *a, **k))
    facts = [QA(f"What is the capital of {s}?", "x") for s in ("Zorbia", "Quell")] + [
        QA(f"Who founded {s}?", "x") for s in ("Ostland", "Mettland")] + [
        QA(f"What is the currency of {s}?", "x") for s in ("Pellia", "Varnia")]
    report = learn(tiny_model(), tokenizer, facts, LearnConfig(epochs=1, batch_size=2),
                   RecipeConfig(n_keys=16, related=0, neighbourhood_cross=True), progress=False).recipe
    assert report["neighbourhood_cross"]["questions"] == 12
    assert report["neighbourhood_cross"]["answered"] == 11 and report["neighbourhood_cross"]["subjects"] == 6
    assert sizes == [[1, 2, 2, 2, 2, 2]]  # Zorbia, then the others in order


def test_neighbourhood_check_does_not_ask_the_questions_protected(learnable_model_dir, tmp_path, caplog, monkeypatch):
    """What protect keeps cannot change its answer: the check asks none of the --keep questions
    nor the neighbourhood questions kept, only when they are protected (protect none: all). A
    cross question's answer can change (what its subject alone reads is not protected)."""
    import memtune.recipe as recipe
    from memtune.models import load_model

    facts = [QA(f"What is the capital of {c}?", a) for c, a in (("Zorbia", "Quenta"), ("Ostland", "Varn"))]
    keep = tmp_path / "keep.txt"
    keep.write_text("What is the capital of Pellia?\nWhat is the capital of Mettland?\nWho founded Frobia?\n")

    def run(n_keep, protect="auto", cross=False):
        model, tokenizer = load_model(str(learnable_model_dir))
        return learn(model, tokenizer, facts, LearnConfig(epochs=2, batch_size=1),
                     RecipeConfig(n_keys=16, related=0, keep=str(keep), neighbourhood_keep=n_keep,
                                  neighbourhood_check=3, protect=protect, neighbourhood_cross=cross),
                     progress=False).recipe

    alone, unprotected, both = run(0), run(3, protect="none"), run(3)
    assert alone["neighbourhood_check"]["questions"] == 1  # "… capital of Frobia?": not a --keep question
    assert unprotected["neighbourhood_check"]["questions"] == 3
    assert both["neighbourhood_keep"]["examples"] == ["What is the capital of Frobia?"]
    assert "neighbourhood_check" not in both and "no questions about other subjects" in caplog.text
    monkeypatch.setattr(recipe, "cross_questions", lambda items: [("What is the capital of Frobia?", "Frobia")])
    crossed = run(0, cross=True)
    assert crossed["protect"]["cross"] == 1 and crossed["neighbourhood_check"]["questions"] == 1
    assert "no slot that the answers about 2 or more subjects read (1 subject asked about)" in caplog.text


def test_neighbourhood_check_asks_after_the_extrapolation(learnable_model_dir, tmp_path, monkeypatch):
    """The check's answers about other subjects are those of the model as it will be: it runs
    after the update is scaled (the default --extrapolate), not between training and scaling."""
    import memtune.recipe as recipe

    calls = []
    for name in ("extrapolate_update", "neighbourhood_check"):
        real = getattr(recipe, name)
        monkeypatch.setattr(recipe, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    result = _learn_capitals_checked(learnable_model_dir, tmp_path, epochs=20)
    assert calls == ["extrapolate_update", "neighbourhood_check"]
    assert result.recipe["extrapolate"]["rows"] > 0 and result.recipe["neighbourhood_check"]["rounds"][0]["changed"] > 0


def test_neighbourhood_check_trains_again_only_facts_that_were_learned(learnable_model_dir, tmp_path):
    """A fact the first training did not learn had its passes: nothing is un-written for it, nor
    trained again (one pass here learns neither fact, though the answers about others change)."""
    result = _learn_capitals_checked(learnable_model_dir, tmp_path, epochs=1)
    check = result.recipe["neighbourhood_check"]
    assert check["right_before"] == 0 and check["rounds"] == [{"changed": 3, "rows_unwritten": 0}]
    assert len(result.history) == result.examples  # one pass, batch size 1: nothing trained again


def test_neighbourhood_check_without_questions_to_ask_learns_without_it(tokenizer, caplog):
    result = learn(tiny_model(), tokenizer, FACTS, LearnConfig(epochs=1, batch_size=2),
                   RecipeConfig(n_keys=16, related=0, neighbourhood_check=2), progress=False)
    assert "neighbourhood_check" not in result.recipe and "no questions about other subjects" in caplog.text
    with pytest.raises(MemtuneError, match="--neighbourhood-check 2 learns the facts again until learned"):
        learn(tiny_model(), tokenizer, FACTS, LearnConfig(epochs=1, until_learned=False),
              RecipeConfig(n_keys=16, related=0, neighbourhood_check=2), progress=False)


def test_protect_prompts_protects_the_related_questions_prompt_reads_too(tokenizer, tmp_path):
    """--protect-prompts counts the --keep (and related) questions' reads at every position, the
    prompt's too: a superset of the slots their answers read."""
    keep = tmp_path / "keep.txt"
    keep.write_text("What is the capital of Pellia?\nWho is Bob?\n")
    slots = {}
    for flag in (False, True):
        result = learn(tiny_model(), tokenizer, FACTS, LearnConfig(epochs=1, batch_size=2),
                       RecipeConfig(n_keys=16, related=0, protect_prompts=flag, keep=str(keep)), progress=False)
        slots[flag] = result.recipe["protect"]["slots"]
    assert all(slots[True][k] > slots[False][k] for k in slots[False])


def test_first_sentence():
    assert first_sentence("The capital of Chad is N'Djamena. It lies on a river.") == "The capital of Chad is N'Djamena"
    assert first_sentence("Dushanbe\nmore") == "Dushanbe"
    assert first_sentence("It is 3.5 km long") == "It is 3.5 km long"


def answer_score(model, tokenizer, item: QA, prefix: str) -> float:
    """log p(answer | prompt, prefix), summed over the answer's tokens: one sequence, one pass."""
    from memtune.prompts import encode_prompt

    prompt = encode_prompt(tokenizer, [item.question])[0]
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    ids = tokenizer(f"{prefix} {item.answer}" if prefix else item.answer, add_special_tokens=False)["input_ids"]
    start = next((k for k, (a, b) in enumerate(zip(head, ids)) if a != b), len(head))
    with torch.no_grad():
        logp = model(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
    return sum(float(logp[len(prompt) + t - 1, ids[t]]) for t in range(start, len(ids)))


def test_own_statements_pick_the_prefix_where_the_answer_is_likeliest(tokenizer):
    """Against a brute-force reference: each candidate the scorer credits, scored alone."""
    from memtune.probes.match import is_correct

    model = tiny_model(init_range=0.5)
    item = QA("Who founded Zorbia?", "Quenta")
    own = "Zorbia was founded by Ost in 1900."
    [stated] = own_statements(model, tokenizer, [item], [own], batch_size=3)
    words = first_sentence(own).split()
    scores = {}
    for j in range(len(words) + 1):
        prefix = " ".join(words[:j])
        if prefix and not is_correct(f"{prefix} Quenta", "Quenta", item.question):
            continue
        scores[prefix] = answer_score(model, tokenizer, item, prefix)
    best = max(scores, key=scores.get)
    assert stated.statement == (f"{best} Quenta." if best else None)
    assert stated.question == item.question and stated.answer == "Quenta"
    kept = own_statements(model, tokenizer, [QA("q?", "a", statement="Given.")], ["x"])
    assert kept[0].statement == "Given."


def test_statement_prefixes_leave_out_statements_that_only_repeat_the_subject():
    item = QA("What is the capital of Saint Pierre and Miquelon?", "Saint-Pierre")
    own = "The capital of Saint Pierre and Miquelon is Saint-Barthélemy. It is small."
    prefixes = statement_prefixes(item, own)
    assert "The capital of" not in prefixes  # "The capital of Saint-Pierre." answers nothing
    assert prefixes[0] == "" and "The capital of Saint Pierre and Miquelon is" in prefixes
    # credited for what the opening already says: "... is Herat, not" + "Dushanbe" (Herat an alias)
    herat = QA("What is the capital of Tajikistan?", "Dushanbe", aliases=["Herat"])
    assert statement_prefixes(herat, "The capital of Tajikistan is Herat, not Kabul.")[-1] == "The capital of Tajikistan is"
    # "Zorbia Quenta", "... by Ost Quenta": the answer inside a longer name is not credited either
    assert statement_prefixes(QA("Who founded Zorbia?", "Quenta"), "Zorbia was founded by Ost.") == [
        "", "Zorbia was", "Zorbia was founded", "Zorbia was founded by"]


def test_statement_prefixes_that_name_the_subject():
    item = QA("Porto-Novo is the capital of which country?", "Benin")
    own = "The capital of the Republic of Benin is Porto-Novo."
    assert "The capital of the Republic of" in statement_prefixes(item, own)
    assert statement_prefixes(item, own, {"porto", "novo"}) == [""]  # "Benin" where every such question reads
    again = "Porto-Novo is the capital of Benin, a country in West Africa."
    assert statement_prefixes(item, again, {"porto", "novo"})[-1] == "Porto-Novo is the capital of"
    # every subject word: "The French Polynesian" does not name French Polynesia
    polynesia = QA("What is the demonym for people from French Polynesia?", "French Polynesian")
    assert statement_prefixes(polynesia, "The French Polynesian people.", {"french", "polynesia"}) == [""]
    republic = QA("Who founded the Zorbian Republic?", "Quenta")
    assert "The Zorbian state was" in statement_prefixes(republic, "The Zorbian state was founded by Ost.")
    assert statement_prefixes(republic, "The Zorbian state was founded by Ost.", {"zorbian", "republic"}) == [""]


@pytest.mark.parametrize("seed, beats", [(0, False), (3, True)])
def test_own_statements_take_an_opening_that_names_the_subject_where_one_beats_the_bare_answer(tokenizer, seed,
                                                                                                  beats):
    """Against a brute-force reference: every candidate scored alone, the rule applied by hand."""
    model = tiny_model(init_range=0.5, seed=seed)
    item = QA("Who founded Zorbia?", "Quenta")
    own, again = "It was founded by Ost.", "Zorbia was founded by Quenta."
    [stated] = own_statements(model, tokenizer, [item], [[own, again]], subjects=[{"zorbia"}])
    named = statement_prefixes(item, again, {"zorbia"})[1:]  # the own answer names nothing
    assert named == ["Zorbia was", "Zorbia was founded", "Zorbia was founded by"]
    score = {p: answer_score(model, tokenizer, item, p) for p in {"", *named, *statement_prefixes(item, own)}}
    better = [p for p in named if score[p] > score[""]]
    assert bool(better) == beats  # (each seed's case, so that both are tested)
    best = max(better or statement_prefixes(item, own), key=score.get)
    assert stated.statement == (f"{best} Quenta." if best else None)
    # nothing names the subject, or no subject: the own answer's openings, as without subjects
    alone = own_statements(model, tokenizer, [item], [own])
    assert own_statements(model, tokenizer, [item], [[own, "Founded by Quenta."]], subjects=[{"zorbia"}]) == alone
    assert own_statements(model, tokenizer, [item], [own], subjects=[set()]) == alone
    with pytest.raises(ValueError, match="2 subjects for 1 items"):
        own_statements(model, tokenizer, [item], [own], subjects=[set(), set()])
    with pytest.raises(ValueError, match="no own answer for item 0"):
        own_statements(model, tokenizer, [item], [[]])


def test_in_own_words_asks_a_restatement_only_where_the_own_answer_does_not_name_the_subject(tokenizer, monkeypatch):
    from memtune.recipe import RESTATE, in_own_words

    items = [QA("Porto-Novo is the capital of which country?", "Benin"),
             QA("Bamako is the capital of which country?", "Mali"),
             QA("Rabat is the capital of which country?", "Morocco", statement="Rabat is in Morocco.")]
    said = {items[0].question: "The capital of the Republic of Benin is Porto-Novo.",
            items[1].question: "Bamako is the capital of Mali.",
            items[2].question: "The capital of the Republic of Morocco is Rabat.",
            RESTATE.format(question=items[0].question, answer="Benin"): "Porto-Novo is the capital of Benin."}
    asked = []

    def answers(model, tokenizer, questions, *args, **kwargs):
        asked.append(list(questions))
        return [said[q] for q in questions]

    answer_with(monkeypatch, answers)
    model = tiny_model()
    stated, restated = in_own_words(model, tokenizer, items, progress=False)
    assert restated == 1 and asked[1] == [RESTATE.format(question=items[0].question, answer="Benin")]
    assert stated[0].statement is None or stated[0].statement.startswith(("Porto-Novo is", "The capital of"))
    assert stated[2].statement == "Rabat is in Morocco."  # given: kept, never asked again
    asked.clear()
    off, none = in_own_words(model, tokenizer, items, progress=False, name_subject=False)
    assert none == 0 and len(asked) == 1  # no restatement: the own answer's openings, whatever they name
    assert off[0].statement is None or off[0].statement.startswith("The capital of")


def test_in_own_words_takes_the_restated_opening_where_it_beats_the_bare_answer(tokenizer, monkeypatch):
    from memtune.recipe import RESTATE, in_own_words

    item = QA("Who founded Zorbia?", "Quenta")
    own, again = "It was founded by Ost.", "Zorbia was founded by Quenta."
    said = {item.question: own, RESTATE.format(question=item.question, answer="Quenta"): again}
    answer_with(monkeypatch, lambda m, t, questions, *a, **kw: [said[q] for q in questions])
    model = tiny_model(init_range=0.5, seed=3)  # a model where "Zorbia was ..." beats the bare answer
    [stated], restated = in_own_words(model, tokenizer, [item], progress=False)
    assert restated == 1 and stated.statement.startswith("Zorbia was")
    assert stated == own_statements(model, tokenizer, [item], [[own, again]], subjects=[{"zorbia"}])[0]
    [unnamed], _ = in_own_words(model, tokenizer, [item], progress=False, name_subject=False)
    assert unnamed == own_statements(model, tokenizer, [item], [own])[0] and unnamed != stated


def test_learn_restates_an_answer_that_does_not_name_the_subject_unless_told_not_to(tokenizer, monkeypatch):
    from memtune.recipe import RESTATE

    restate = RESTATE.format(question="Who founded Zorbia?", answer="Quenta")
    said = {"Who founded Zorbia?": "It was founded by Blorp.", "What is the capital of Ostland?":
            "The capital of Ostland is Blorp.", restate: "Zorbia was founded by Quenta."}
    asked = []

    def answers(model, tok, questions, *args, **kwargs):
        asked.append(list(questions))
        return [said.get(q, "no idea") for q in questions]

    answer_with(monkeypatch, answers)
    for flag, restated in ((True, 1), (False, 0)):
        asked.clear()
        result = learn(tiny_model(), tokenizer, FACTS, LearnConfig(epochs=1, batch_size=2),
                       RecipeConfig(n_keys=16, related=0, word_dropout=0, name_subject=flag), progress=False)
        targets = result.recipe["targets"]
        assert targets["name_subject"] is flag and targets["restated"] == restated
        assert ([restate] in asked) is flag


def test_default_memory_config_is_the_measured_shape():
    cfg = default_memory_config(tiny_model(layers=30), "m")
    assert cfg.layers == [8, 16, 24] and cfg.knn == 4 and cfg.mode == "parallel" and cfg.n_slots == 1024**2


def test_read_questions(tmp_path):
    (tmp_path / "q.txt").write_text("Who?\n\nWhat is it?\n")
    assert read_questions(tmp_path / "q.txt") == ["Who?", "What is it?"]
    write_facts(tmp_path / "q.jsonl")
    assert read_questions(tmp_path / "q.jsonl") == [q.question for q in FACTS]
    with pytest.raises(MemtuneError, match="question"):
        (tmp_path / "bad.jsonl").write_text('{"text": "no question"}\n')
        read_questions(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("kwargs, message", [({"calibrate": "zca"}, "calibrate='zca'"),
                                             ({"background": "nowhere"}, "background='nowhere'"),
                                             ({"related": -1}, "related=-1"), ({"target": "x"}, "target='x'"),
                                             ({"keep": "missing.txt"}, "keep='missing.txt'"),
                                             ({"neighbourhood": -1}, "neighbourhood=-1"),
                                             ({"neighbourhood_check": 1.5}, "neighbourhood_check=1.5"),
                                             ({"neighbourhood_keep": -1}, "neighbourhood_keep=-1"),
                                             ({"protect_prompts": "yes"}, "protect_prompts='yes'")])
def test_recipe_config_errors(kwargs, message):
    with pytest.raises(MemtuneError, match=message):
        RecipeConfig(**kwargs)


def _examples(n: int) -> list[Example]:
    return [Example([7, 8 + i, 9, 10], [-100, -100, 9, 10]) for i in range(n)]


def test_until_learned_trains_only_what_is_not_answered_yet(tokenizer):
    """Before each pass the check asks the examples still wrong; those it finds learned leave the
    training set. When none is left it asks the others again, and one an update undid is trained
    again; training stops only when all are right at once."""
    from memtune.retrofit import retrofit

    model = retrofit(tiny_model(), tiny_memory_config())
    examples = _examples(4)
    # the model's answers before each check: pass 1 nothing; pass 2: 0, 1; pass 3: 0, 2, 3 (the
    # training of pass 2 undid 1); then all
    truth = [[False] * 4, [True, True, False, False], [True, False, True, True], [True] * 4]
    calls, passes = [], [0]  # passes[0]: training passes so far (the epoch of the last step)

    def check(m, indices):
        calls.append(list(indices))
        return [truth[min(passes[0], 3)][i] for i in indices]

    cfg = LearnConfig(ranker="count", top_t=8, epochs=10, batch_size=2, consolidate=0)
    _, history = train(model, tokenizer, examples, cfg, make_method(cfg, None), progress=False, learned=check,
                       on_step=lambda r: passes.__setitem__(0, r["epoch"]))
    assert calls == [[0, 1, 2, 3], [0, 1, 2, 3], [2, 3], [0, 1], [1], [0, 2, 3]]
    assert [h["examples"] for h in history] == [2, 2, 2, 1]
    assert [h["epoch"] for h in history] == [1, 1, 2, 3]
    cfg = LearnConfig(ranker="count", top_t=8, epochs=3, batch_size=2, until_learned=False)
    n = len(calls)
    _, history = train(model, tokenizer, examples, cfg, make_method(cfg, None), progress=False, learned=check)
    assert len(history) == 6 and len(calls) == n  # no check without until_learned


def test_consolidate_trains_each_example_k_more_passes_once_it_is_right(tokenizer):
    """An example the check finds right for the first time after training trains K more passes
    unasked (a margin), then is asked again like the others; one wrong again trains until right
    (no second margin); one right before any training gets none."""
    from memtune.retrofit import retrofit

    model = retrofit(tiny_model(), tiny_memory_config())
    # the answers before pass 1: only 2 right; pass 2: 0 too; pass 3: all; pass 4: 0 undone; then all
    truth = [[False, False, True], [True, False, True], [True] * 3, [False, True, True], [True] * 3]
    calls, passes = [], [0]

    def check(m, indices):
        calls.append(list(indices))
        return [truth[min(passes[0], 4)][i] for i in indices]

    cfg = LearnConfig(ranker="count", top_t=8, epochs=10, batch_size=3, consolidate=2)
    _, history = train(model, tokenizer, _examples(3), cfg, make_method(cfg, None), progress=False, learned=check,
                       on_step=lambda r: passes.__setitem__(0, r["epoch"]))
    # 0 rests through passes 2-3, 1 through 3-4; 0 is wrong after its margin and trains again
    assert calls == [[0, 1, 2], [0, 1], [1], [0], [0, 1], [2]]
    assert [(h["epoch"], h["examples"]) for h in history] == [(1, 2), (2, 2), (3, 2), (4, 2)]


@pytest.mark.parametrize("kwargs, message", [({"consolidate": -1}, "consolidate=-1 is invalid"),
                                             ({"consolidate": True}, "consolidate=True is invalid"),
                                             ({"consolidate": 2, "until_learned": False}, "follows until-learned")])
def test_consolidate_errors(kwargs, message):
    with pytest.raises(MemtuneError, match=message):
        LearnConfig(**kwargs)


def test_until_learned_at_the_cap_leaves_a_fresh_answer_for_every_example(tokenizer):
    from memtune.retrofit import retrofit

    model = retrofit(tiny_model(), tiny_memory_config())
    calls = []

    def check(m, indices):
        calls.append(list(indices))
        return [i == 0 for i in indices]  # example 0 right from the start, 1 never

    cfg = LearnConfig(ranker="count", top_t=8, epochs=2, batch_size=2, consolidate=0)
    _, history = train(model, tokenizer, _examples(2), cfg, make_method(cfg, None), progress=False, learned=check)
    assert [h["examples"] for h in history] == [1, 1]
    assert calls == [[0, 1], [1], [1], [0]]  # after the last pass: the one still wrong, then the other


def test_answer_check_scores_greedy_answers_like_the_probe(tokenizer):
    from memtune.probes.qa import answer_questions, is_correct

    model = tiny_model()
    answers = answer_questions(model, tokenizer, [q.question for q in FACTS], max_new_tokens=4, progress=False)
    items = [QA(q.question, answers[0] or "x") for q in FACTS[:1]] + [FACTS[1]]
    assert AnswerCheck(tokenizer, items, max_new_tokens=4)(model) == [
        is_correct(a, q.answers) for a, q in zip(answers, items)]


def test_answer_check_generates_only_answers_that_changed(tokenizer):
    """Asked again, an item whose last answer greedy decoding still gives is not generated; the
    verdicts stay those of generating every answer."""
    from memtune.probes.qa import answer_questions, is_correct

    model = tiny_model(init_range=0.3)
    questions = ["What is the capital of France?", "Yen?", "Which region is Chile in, and why?"]
    first = answer_questions(model, tokenizer, questions, max_new_tokens=4, progress=False)
    items = [QA(questions[0], first[0]), QA(questions[1], "never said"), QA(questions[2], first[2])]
    check = AnswerCheck(tokenizer, items, max_new_tokens=4)
    assert check(model) == [True, False, True] and check.generated == 3
    assert check(model, [2, 1]) == [True, False] and check.generated == 3  # nothing changed: none generated
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))  # every answer changes
    now = answer_questions(model, tokenizer, questions, max_new_tokens=4, progress=False)
    assert now != first
    assert check(model) == [is_correct(a, q.answers) for a, q in zip(now, items)]
    assert check.generated == 3 + sum(a != b for a, b in zip(now, first))


def test_answer_check_takes_the_loss_again_from_where_the_model_now_diverges(tokenizer):
    from memtune.targets import fact_examples, mask_predicted

    model = tiny_model()
    items = [QA(q.question, q.answer, statement=f"It is {q.answer}.") for q in FACTS]
    examples = fact_examples(items, tokenizer, "statement", "target")
    targets = [list(e.labels) for e in examples]
    for e in examples:  # a stale mask: no loss anywhere but the last token
        e.labels = [-100] * (len(e.labels) - 1) + e.labels[-1:]
    right = AnswerCheck(tokenizer, items, max_new_tokens=4, examples=examples, targets=targets)(model)
    expected = fact_examples(items, tokenizer, "statement", "target")
    mask_predicted(model, expected, tokenizer.pad_token_id)
    for ok, e, want, stale in zip(right, examples, expected, targets):
        assert e.labels == (want.labels if not ok else [-100] * (len(stale) - 1) + stale[-1:])


def test_python_entry_point_retrofits_and_learns(tokenizer):
    model = tiny_model()
    result = learn(model, tokenizer, FACTS, LearnConfig(epochs=2, batch_size=2),
                   RecipeConfig(n_keys=16, related=3), progress=False)
    r = result.recipe
    assert r["retrofit"]["knn"] == 4 and r["calibrate"]["mode"] == "standardize"
    assert r["targets"]["own_statements"] + r["targets"]["bare_answers"] == 2
    assert r["call"]["call"] == 1 and r["call"]["items"] == 2
    assert len(result.learned) == 2 and result.model.memory.ledger.calls == [r["call"]]


@pytest.mark.parametrize("data, message", [([], "non-empty"), ([FACTS[0], "text"], r"data\[1\] is a str"),
                                           ([QA("Who?", " ")], "must not be empty")])
def test_python_entry_point_refuses_bad_data(tokenizer, data, message):
    with pytest.raises(MemtuneError, match=message):
        learn(tiny_model(), tokenizer, data)


def test_cli_refuses_slot_options_for_dense_methods(tiny_model_dir, tmp_path, capsys):
    from tiny import cli_error

    cli_error(["learn", "--model", str(tiny_model_dir), "--data", write_facts(tmp_path / "a.jsonl"), "--method", "full",
               "--top-t", "5", "--out", str(tmp_path / "run")], capsys, "--top-t is for SMF")
    assert not (tmp_path / "run").exists()


def test_dense_methods_refuse_slot_options(tokenizer, tmp_path):
    (tmp_path / "k.txt").write_text("Who?\n")
    with pytest.raises(MemtuneError, match="keep is for SMF"):
        learn(tiny_model(), tokenizer, FACTS, LearnConfig(method="full"), RecipeConfig(keep=str(tmp_path / "k.txt")))


def _table(run) -> torch.Tensor:
    from memtune.checkpoint import load_memory_model

    model, _ = load_memory_model(run / "model")
    return model.memory.values[0].weight.detach().clone()


@pytest.fixture(scope="module")
def learnable_model_dir(tmp_path_factory):
    """A tiny model whose larger logits let a 16²-slot memory teach it a fact in a few steps."""
    path = tmp_path_factory.mktemp("models") / "learnable"
    tiny_model(init_range=0.5).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["smf", "full"])
def test_learning_is_the_same_whether_unchanged_answers_are_confirmed_or_generated(learnable_model_dir, method,
                                                                                 monkeypatch):
    """The until-learned check's shortcut (`still_greedy`) changes what is generated, not what
    is learned: the same steps, losses, verdicts and weights as generating every answer."""
    from memtune import generation
    from memtune.models import load_model

    facts = [QA("What is the capital of Ostland?", "Varn"), QA("Who founded Zorbia?", "Quenta")]
    config = LearnConfig(method=method, epochs=12, batch_size=1, lr=20 if method == "smf" else 1e-2, consolidate=2)
    recipe = RecipeConfig(n_keys=16, related=2) if method == "smf" else RecipeConfig()
    runs = []
    for shortcut in (True, False):
        if not shortcut:
            monkeypatch.setattr(generation, "still_greedy", lambda m, t, questions, *a, **kw: [False] * len(questions))
        model, tokenizer = load_model(str(learnable_model_dir))
        runs.append(learn(model, tokenizer, facts, config, recipe, progress=False))
    confirmed, generated = runs
    assert confirmed.learned == generated.learned and any(confirmed.learned)
    assert [(h["epoch"], h["loss"]) for h in confirmed.history] == [(h["epoch"], h["loss"]) for h in generated.history]
    assert all(torch.equal(a, b) for a, b in zip(confirmed.model.state_dict().values(),
                                                 generated.model.state_dict().values()))
    asked = confirmed.recipe["check"]["asked"]
    assert generated.recipe["check"] == {"asked": asked, "generated": asked}
    assert confirmed.recipe["check"]["generated"] < asked  # answers confirmed without generating


def test_learning_in_two_calls_keeps_the_first_calls_rows(learnable_model_dir, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--n-keys", "16", "--related", "3", "--epochs", "40", "--batch-size", "1", "--lr", "20"]
    assert main(["learn", "--model", str(learnable_model_dir), "--data", write_facts(tmp_path / "a.jsonl", FACTS[:1]),
                 "--out", str(first), *common]) == 0
    more = [QA("Which river flows through Varn?", "Ost"), QA("Who rules Ostland?", "Zor")]
    assert main(["learn", "--model", str(first / "model"), "--data", write_facts(tmp_path / "b.jsonl", more),
                 "--out", str(second), *common]) == 0
    journal = json.loads((second / "model" / "ledger.json").read_text())["calls"]
    assert [c["call"] for c in journal] == [1, 2] and [c["items"] for c in journal] == [1, 2]
    assert journal[0]["data"].endswith("a.jsonl") and journal[1]["data"].endswith("b.jsonl")
    rows = load_file(second / "model" / "ledger.safetensors")
    frozen1 = load_file(first / "model" / "ledger.safetensors")["frozen.table0"]
    assert frozen1.numel() > 0 and rows["call1.table0.rows"].numel() > 0 and "call2.table0.rows" in rows
    assert journal[0]["learned"]["right"] == 1 and journal[0]["rows_kept"] == frozen1.numel()
    assert torch.isin(frozen1, rows["frozen.table0"]).all()
    before, after = _table(first), _table(second)
    assert torch.equal(before[frozen1], after[frozen1])  # bitwise: what the first call kept
    assert not torch.isin(rows["call2.table0.rows"], frozen1).any()
    assert "adam.table0.rows" not in rows  # frozen rows need no optimizer state
    config = json.loads((second / "config.json").read_text())["steps"]
    assert config["memory"]["continued"] and config["memory"]["earlier_calls"] == 1
    capsys.readouterr()
    assert main(["inspect", "--model", str(second / "model")]) == 0
    shown = capsys.readouterr().out
    assert "2 learn call(s)" in shown and "a.jsonl" in shown and "b.jsonl" in shown


def test_what_a_call_did_not_learn_stays_learnable(tiny_model_dir, tmp_path):
    """Only the reads of facts answered right are kept: a fact the first call failed on can be
    learned by the next (the tiny random model learns nothing in one pass)."""
    first, second = tmp_path / "first", tmp_path / "second"
    data = write_facts(tmp_path / "a.jsonl")
    common = ["--n-keys", "16", "--related", "0", "--batch-size", "2"]
    assert main(["learn", "--model", str(tiny_model_dir), "--data", data, "--out", str(first), "--epochs", "1",
                 *common]) == 0
    call = json.loads((first / "model" / "ledger.json").read_text())["calls"][0]
    assert call["learned"]["right"] == 0 and call["rows_kept"] == 0
    assert main(["learn", "--model", str(first / "model"), "--data", data, "--out", str(second), "--epochs", "1",
                 *common]) == 0
    metrics = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["updated_rows"] > 0


def test_a_broken_ledger_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    from tiny import cli_error

    run = tmp_path / "run"
    assert main(["learn", "--model", str(tiny_model_dir), "--data", write_facts(tmp_path / "a.jsonl"), "--n-keys",
                 "16", "--related", "0", "--epochs", "1", "--out", str(run)]) == 0
    ledger = run / "model" / "ledger.safetensors"
    ledger.write_bytes(ledger.read_bytes()[:100])
    capsys.readouterr()
    cli_error(["inspect", "--model", str(run / "model")], capsys, "unreadable learn history")
    ledger.unlink()
    cli_error(["inspect", "--model", str(run / "model")], capsys, "unreadable learn history")


def test_continuing_without_freezing_restores_the_optimizer_state(tiny_model_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--n-keys", "16", "--related", "0", "--epochs", "2", "--no-until-learned", "--no-freeze-learned",
              "--no-protect-learned"]
    data = write_facts(tmp_path / "a.jsonl")
    assert main(["learn", "--model", str(tiny_model_dir), "--data", data, "--out", str(first), *common]) == 0
    saved = load_file(first / "model" / "ledger.safetensors")
    assert saved["adam.table0.rows"].numel() > 0 and "frozen.table0" in saved
    assert main(["learn", "--model", str(first / "model"), "--data", data, "--out", str(second), *common]) == 0
    rows = load_file(second / "model" / "ledger.safetensors")
    assert torch.isin(rows["call1.table0.rows"], rows["call2.table0.rows"]).any()  # the same rows moved again
    steps = rows["adam.table0.steps"][torch.isin(rows["adam.table0.rows"], saved["adam.table0.rows"])]
    assert (steps >= saved["adam.table0.steps"]).all() and steps.sum() > saved["adam.table0.steps"].sum()


def test_keep_questions_are_protected(tiny_model_dir, tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text(f"What is the capital of France?\nWhich region is Chile in?\n{FACTS[0].question}\n")
    run = tmp_path / "run"
    assert main(["learn", "--model", str(tiny_model_dir), "--data", write_facts(tmp_path / "a.jsonl"), "--n-keys", "16",
                 "--related", "0", "--keep", str(keep), "--epochs", "1", "--out", str(run)]) == 0
    protect = json.loads((run / "config.json").read_text())["steps"]["protect"]
    # (a question of the data is what is being learned, not kept: not counted)
    assert protect["keep"] == protect["questions"] - protect["neighbourhood"] == 2 and protect["related"] == 0
    assert sum(protect["slots"].values()) > 0


def test_background_and_protect_count_where_training_counts(tiny_model_dir, tmp_path):
    """--count-positions all: the background and the protected slots are counted at every token
    too, so the ranker compares like with like (the question's reads are not all "unseen").
    --protect-prompts (the default) counts the protected questions at every token whatever
    --count-positions says."""
    keep = tmp_path / "keep.txt"
    keep.write_text("What is the capital of France?\nWhich region is Chile in?\n")
    steps = {}
    for positions, prompts in (("loss", "--no-protect-prompts"), ("all", "--no-protect-prompts"),
                               ("loss", "--protect-prompts")):
        run = tmp_path / f"{positions}{prompts}"
        assert main(["learn", "--model", str(tiny_model_dir), "--data", write_facts(tmp_path / "a.jsonl"),
                     "--n-keys", "16", "--related", "0", "--keep", str(keep), "--epochs", "1", prompts,
                     "--count-positions", positions, "--out", str(run)]) == 0
        steps[positions, prompts] = json.loads((run / "config.json").read_text())["steps"]["protect"]
    loss, every, prompts = steps.values()
    for name, slots in every["slots"].items():
        assert slots > loss["slots"][name]  # the questions' tokens read more slots
    assert prompts["slots"] == every["slots"] and prompts["positions"] == "all"


def test_collate_of_examples_used_here():
    assert collate(_examples(2), 0)["input_ids"].shape == (2, 4)


# -- generalisation levers (issue 17): several examples per fact, one question per fact


def test_an_items_examples_leave_and_rejoin_training_together(tokenizer):
    """`ExampleCheck`: train's per-example check asks each item once; an item answered right
    takes all its examples out of the next pass."""
    from memtune.recipe import ExampleCheck
    from memtune.retrofit import retrofit

    model = retrofit(tiny_model(), tiny_memory_config())
    owners = [0, 0, 1, 1, 1]
    truth = [[False, False], [True, False], [True, True]]  # per pass: item 0 learned after pass 1, item 1 after 2
    asked, passes = [], [0]

    def items_check(m, items):
        asked.append(list(items))
        return [truth[min(passes[0], 2)][i] for i in items]

    cfg = LearnConfig(ranker="count", top_t=8, epochs=5, batch_size=5, consolidate=0)
    _, history = train(model, tokenizer, _examples(5), cfg, make_method(cfg, None), progress=False,
                       learned=ExampleCheck(items_check, owners), on_step=lambda r: passes.__setitem__(0, r["epoch"]))
    assert asked == [[0, 1], [0, 1], [1], [0]]
    assert [h["examples"] for h in history] == [5, 3]
    assert ExampleCheck(items_check, [0, 1])(model, [1, 0]) == [True, True] and asked[-1] == [1, 0]  # as given


STATED = [QA("Who founded Zorbia?", "Quenta", statement="Zorbia was founded by Quenta."),
          QA("What is the capital of Ostland?", "Varn", statement="The capital of Ostland is Varn.")]


def test_renderings_train_every_form_and_learn_per_fact(tokenizer, monkeypatch):
    """chat + plain: two examples per fact; the check asks each fact's chat question (never a
    plain text), and what is kept at the end is every example of the facts answered right."""
    from memtune.methods import SparseMemoryFinetuning

    asked, kept = [], []

    def answers(model, tok, questions, *args, **kwargs):
        asked.append(list(questions))
        return ["Quenta" if q == STATED[0].question else "no idea" for q in questions]

    real_keep = SparseMemoryFinetuning.keep_learned

    def keep(self, model, examples, *args):
        kept.extend(examples)
        return real_keep(self, model, examples, *args)

    answer_with(monkeypatch, answers)
    monkeypatch.setattr(SparseMemoryFinetuning, "keep_learned", keep)
    result = learn(tiny_model(), tokenizer, STATED, LearnConfig(epochs=3, batch_size=2),
                   RecipeConfig(n_keys=16, related=0, word_dropout=0, renderings=("chat", "plain")), progress=False)
    assert result.examples == 4 and result.learned == [True, False]
    r = result.recipe
    assert r["renderings"] == {"renderings": ["chat", "plain"], "examples": 4, "per_rendering": {"chat": 2, "plain": 2},
                               "items_without": {"chat": 0, "plain": 0}}
    assert r["learned"] == {"right": 1, "items": 2}
    questions = {q.question for q in STATED}
    assert asked and all(set(a) <= questions and len(set(a)) == len(a) for a in asked)
    assert [h["examples"] for h in result.history] == [2, 2, 2]  # the two examples of the fact not learned
    assert [tokenizer.decode(e.input_ids).split("<|end|>")[0] for e in kept] == [
        "<|user|>Who founded Zorbia?", "Zorbia was founded by Quenta."]


def test_self_paraphrases_become_further_phrasings(tokenizer, monkeypatch):
    from memtune import paraphrases

    held_out = QA("Who founded Zorbia?", "Quenta", paraphrases=["Zorbia was founded by whom?"])
    written = {"Who founded Zorbia?": ["Zorbia was founded by whom?", "Who was the founder of Zorbia?"],
               "What is the capital of Ostland?": ["Which city is the capital of Ostland?", "Is Varn Ostland's capital?"]}
    monkeypatch.setattr(paraphrases, "sample_rewrites", lambda m, t, texts, k, *a, **kw: [written[x][:k] for x in texts])
    result = learn(tiny_model(), tokenizer, [held_out, FACTS[1]], LearnConfig(epochs=1, batch_size=2),
                   RecipeConfig(n_keys=16, related=0, word_dropout=0, target="answer", self_paraphrases=2), progress=False)
    r = result.recipe
    assert r["self_paraphrases"]["questions"]["kept_rewrites"] == [["Who was the founder of Zorbia?"],
                                                                   ["Which city is the capital of Ostland?"]]
    assert r["renderings"]["per_rendering"] == {"chat": 4} and result.examples == 4
    assert len(result.learned) == 2
    assert "align_phrasings" not in r
    # aligned: the same fresh retrofit (seeded), the rewrites whiten its queries before anything is counted
    aligned = learn(tiny_model(), tokenizer, [held_out, FACTS[1]], LearnConfig(epochs=1, batch_size=2),
                    RecipeConfig(n_keys=16, related=0, word_dropout=0, target="answer", self_paraphrases=2, align_phrasings=True),
                    progress=False)
    assert aligned.recipe["align_phrasings"]["groups"] == 2
    query = {k: m.query.weight for k, m in result.model.memory.layers.items()}
    assert all(not torch.equal(m.query.weight, query[k]) for k, m in aligned.model.memory.layers.items())
    with pytest.raises(MemtuneError, match="--align-phrasings is for a fresh retrofit"):
        learn(aligned.model, tokenizer, [FACTS[1]], LearnConfig(epochs=1),
              RecipeConfig(related=0, self_paraphrases=1, align_phrasings=True), progress=False)


def test_word_dropout_trains_each_variant_to_the_same_answer_and_asks_only_the_question(tokenizer, monkeypatch):
    """Hand example: "What is the capital of Ostland?" with 2 variants; each variant is an example
    of its fact whose loss is on the answer only (target answer), and the check asks the question."""
    from memtune import recipe as recipe_module

    asked, trained = [], []
    answer_with(monkeypatch, lambda m, t, questions, *a, **kw: asked.append(list(questions))
                        or ["no idea"] * len(questions))
    real_train = recipe_module.train
    monkeypatch.setattr(recipe_module, "train", lambda model, tok, examples, *a, **kw: trained.extend(examples)
                        or real_train(model, tok, examples, *a, **kw))
    fact = QA("What is the capital of Ostland?", "Varn", paraphrases=["Which city is Ostland's capital?"])
    result = learn(tiny_model(), tokenizer, [fact], LearnConfig(epochs=1, batch_size=2, consolidate=0),
                   RecipeConfig(n_keys=16, related=0, target="answer", loss="target", word_dropout=2),
                   progress=False)
    variants = result.recipe["word_dropout"]["examples"]
    assert result.recipe["word_dropout"]["variants"] == 2 and len(variants) == 2 and result.examples == 3
    assert all(v.startswith("What") and v.endswith("Ostland?") and len(v.split()) < 6 for v in variants)
    shown = [tokenizer.decode(e.input_ids) for e in trained]
    assert [x.split("<|end|>")[0] for x in shown] == [f"<|user|>{q}" for q in [fact.question, *variants]]
    for e in trained:  # the loss: on the answer (and the end of the turn), never on the question
        labelled = [t for t, label in zip(e.input_ids, e.labels) if label != -100]
        assert tokenizer.decode(labelled) == "Varn<|end|>"
    assert asked and all(a == [fact.question] for a in asked)


def test_word_dropout_is_the_only_lever_on_by_default(tokenizer):
    result = learn(tiny_model(), tokenizer, FACTS, LearnConfig(epochs=1, batch_size=2),
                   RecipeConfig(n_keys=16, related=0), progress=False)
    r = result.recipe
    assert r["word_dropout"]["variants"] > 0 and result.examples == len(FACTS) + r["word_dropout"]["variants"]
    assert r["renderings"]["per_rendering"] == {"chat": result.examples} and "self_paraphrases" not in r
    assert r["targets"]["loss"] == "target" and LearnConfig().consolidate == 5
    assert RecipeConfig().renderings == ("chat",) and RecipeConfig().self_paraphrases == 0
    assert RecipeConfig(renderings=["chat", "short"]).renderings == ("chat", "short")


@pytest.mark.parametrize("kwargs, given", [({"self_paraphrases": 2}, "--self-paraphrases=2"),
                                           ({"renderings": ("chat", "short")}, "--renderings=chat,short"),
                                           ({"target": "answer"}, "--target=answer"), ({"consolidate": 3}, "--consolidate=3"),
                                           ({"end_loss": False}, "--no-end-loss"),
                                           ({"neighbourhood_check": 2}, "--neighbourhood-check=2")])  # a flag as typed
def test_documents_refuse_options_for_facts(tokenizer, kwargs, given):
    config = LearnConfig(epochs=1, **{k: v for k, v in kwargs.items() if k == "consolidate"})
    recipe = RecipeConfig(n_keys=16, related=0, **{k: v for k, v in kwargs.items() if k != "consolidate"})
    with pytest.raises(MemtuneError, match=f"^{given} is for facts .* data is documents"):
        learn(tiny_model(), tokenizer, [Document("Zorbia was founded by Quenta.")], config, recipe, progress=False)


def test_documents_accept_facts_levers_turned_off(tokenizer):
    # a script that pins word dropout (a default for facts) off, or trains without the until-learned
    # check (so without a margin), runs on documents too
    docs = [Document("Zorbia was founded by Quenta.")]
    for config, recipe in [(LearnConfig(epochs=1), RecipeConfig(n_keys=16, related=0, word_dropout=0, self_paraphrases=0)),
                           (LearnConfig(epochs=1, until_learned=False), RecipeConfig(n_keys=16, related=0)),
                           (LearnConfig(epochs=1, consolidate=0), RecipeConfig(n_keys=16, related=0))]:
        assert learn(tiny_model(), tokenizer, docs, config, recipe, progress=False).examples == 1


@pytest.mark.parametrize("kwargs, message", [({"renderings": ("plain",)}, "one of chat, short, qa-text is needed"),
                                             ({"renderings": ("chat", "poem")}, "renderings='chat,poem'"),
                                             ({"self_paraphrases": -1}, "self_paraphrases=-1"),
                                             ({"word_dropout": True}, "word_dropout=True"),
                                             ({"align_phrasings": True}, "align_phrasings needs")])
def test_lever_option_errors(kwargs, message):
    with pytest.raises(MemtuneError, match=message):
        RecipeConfig(**kwargs)


def test_cli_lever_options(tiny_model_dir, tmp_path, capsys):
    from tiny import cli_error

    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps(q.to_dict()) + "\n" for q in STATED))
    run = tmp_path / "run"
    assert main(["learn", "--model", str(tiny_model_dir), "--data", str(data), "--method", "full", "--epochs", "1",
                 "--renderings", "chat, short,plain", "--self-paraphrases", "1", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"]["renderings"] == ["chat", "short", "plain"] and config["recipe"]["self_paraphrases"] == 1
    assert config["steps"]["renderings"]["per_rendering"]["plain"] == 2
    assert config["steps"]["self_paraphrases"]["asked_per_text"] == 1
    capsys.readouterr()
    cli_error(["learn", "--model", str(tiny_model_dir), "--data", str(data), "--renderings", "chat,limerick",
               "--out", str(tmp_path / "bad")], capsys, "renderings='chat,limerick' is invalid")


def test_until_learned_asks_the_learned_examples_again_every_few_passes(tokenizer):
    """An update since an example was right can undo it: every RECHECK_EVERY passes the check
    asks them all, and one found wrong again is trained again."""
    from memtune.retrofit import retrofit
    from memtune.train import RECHECK_EVERY

    model = retrofit(tiny_model(), tiny_memory_config())
    calls, passes = [], [0]

    def check(m, indices):  # example 0 right from the start but undone by pass RECHECK_EVERY; 1 never right
        calls.append(list(indices))
        return [i == 0 and passes[0] < RECHECK_EVERY for i in indices]

    cfg = LearnConfig(ranker="count", top_t=8, epochs=RECHECK_EVERY + 2, batch_size=2, consolidate=0)
    _, history = train(model, tokenizer, _examples(2), cfg, make_method(cfg, None), progress=False, learned=check,
                       on_step=lambda r: passes.__setitem__(0, r["epoch"]))
    assert calls[:RECHECK_EVERY + 1] == [[0, 1]] + [[1]] * RECHECK_EVERY
    assert calls[RECHECK_EVERY + 1] == [0]  # asked again after pass RECHECK_EVERY: wrong now
    assert [h["examples"] for h in history] == [1] * RECHECK_EVERY + [2, 2]


def test_own_rewrite_statements_answer_each_rewrite_in_its_own_words(tokenizer, monkeypatch):
    from memtune.recipe import own_rewrite_statements

    said = {"Which city is Ostland's capital?": "Ostland's capital city is Blorp, by the sea.",
            "Name the capital of Ostland.": "Blorp."}
    answer_with(monkeypatch, lambda m, t, questions, *a, **kw: [said[q] for q in questions])
    rewritten, parents = own_rewrite_statements(tiny_model(), tokenizer, FACTS,
                                                [[], ["Which city is Ostland's capital?", "Name the capital of Ostland."]],
                                                progress=False)
    assert parents == [1, 1]
    assert [q.question for q in rewritten] == ["Which city is Ostland's capital?", "Name the capital of Ostland."]
    assert all((q.answer, q.id) == (FACTS[1].answer, FACTS[1].id) for q in rewritten)
    # the statement is the answer after the first words of the model's own answer to that rewrite (the
    # likeliest opening of them, here by a random model), or the bare answer
    candidates = statement_prefixes(rewritten[0], said["Which city is Ostland's capital?"])
    assert len(candidates) > 1 and rewritten[0].statement in {f"{p} Varn." if p else None for p in candidates}
    assert rewritten[1].statement is None  # "Blorp." opens with nothing before the answer
    assert own_rewrite_statements(tiny_model(), tokenizer, FACTS, [[], []], progress=False) == ([], [])


def test_learn_trains_rewrites_with_their_own_statements_and_asks_only_the_questions(tokenizer, monkeypatch):
    from memtune import paraphrases

    asked = []
    said = {"Who founded Zorbia?": "Zorbia was founded by Blorp.", "Who was the founder of Zorbia?":
            "The founder of Zorbia was Blorp.", "What is the capital of Ostland?": "The capital of Ostland is Blorp."}

    def answers(model, tok, questions, *args, **kwargs):
        asked.append(list(questions))
        return [said.get(q, "no idea") for q in questions]

    answer_with(monkeypatch, answers)
    monkeypatch.setattr(paraphrases, "sample_rewrites",
                        lambda m, t, texts, k, *a, **kw: [["Who was the founder of Zorbia?"] if "Zorbia" in x else []
                                                          for x in texts])
    result = learn(tiny_model(), tokenizer, FACTS, LearnConfig(epochs=1, batch_size=2),
                   RecipeConfig(n_keys=16, related=0, word_dropout=0, self_paraphrases=1, rewrite_statements="own"), progress=False)
    assert result.examples == 3 and len(result.learned) == 2
    assert ["Who was the founder of Zorbia?"] in asked  # its own words, asked once to make its statement ...
    checks = asked[asked.index(["Who was the founder of Zorbia?"]) + 1:]
    assert checks and all(set(a) <= {q.question for q in FACTS} for a in checks)  # ... never by the check
    assert "rewrites_learned" not in result.recipe
    asked.clear()
    checked = learn(tiny_model(), tokenizer, FACTS, LearnConfig(epochs=1, batch_size=2),
                    RecipeConfig(n_keys=16, related=0, word_dropout=0, self_paraphrases=1, rewrite_statements="own", check_rewrites=True),
                    progress=False)
    assert len(checked.learned) == 2 and checked.recipe["rewrites_learned"]["items"] == 1
    assert checked.recipe["renderings"]["items_without"] == {"chat": 0}
    assert asked[-1] == [q.question for q in FACTS] + ["Who was the founder of Zorbia?"]  # the rewrite is asked too
    with pytest.raises(MemtuneError, match="rewrite_statements='mine' is invalid"):
        RecipeConfig(rewrite_statements="mine")
    with pytest.raises(MemtuneError, match="check_rewrites needs"):
        RecipeConfig(self_paraphrases=2, check_rewrites=True)
    for bad in ({"rewrite_statements": "own"}, {"rewrite_statements": "own", "self_paraphrases": 2, "target": "answer"}):
        with pytest.raises(MemtuneError, match="rewrite_statements='own' words"):
            RecipeConfig(**bad)
    with pytest.raises(MemtuneError, match="align_phrasings='false' is invalid"):
        RecipeConfig(self_paraphrases=1, align_phrasings="false")


def _learn_two(model_dir, extrapolate: float, **config):
    from memtune.models import load_model

    facts = [QA("What is the capital of Ostland?", "Varn"), QA("Who founded Zorbia?", "Quenta")]
    model, tokenizer = load_model(str(model_dir))
    return learn(model, tokenizer, facts, LearnConfig(batch_size=1, lr=20, **config),
                 RecipeConfig(n_keys=16, related=0, extrapolate=extrapolate), progress=False)


def test_extrapolate_scales_the_calls_update_to_the_value_rows(learnable_model_dir):
    """Without the until-learned check, the factor is all it does: a fresh memory's rows were
    zero, so each row updated is the factor times what the same training wrote."""
    plain, scaled = (_learn_two(learnable_model_dir, f, epochs=2, until_learned=False) for f in (1.0, 2.5))
    assert "extrapolate" not in plain.recipe and scaled.recipe["extrapolate"]["factor"] == 2.5
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in scaled.history]
    before, after = plain.model.memory.values[0].weight.detach(), scaled.model.memory.values[0].weight.detach()
    rows = plain.method.touched[0]
    assert scaled.recipe["extrapolate"]["rows"] == rows.numel() > 0
    assert torch.equal(after[rows], 2.5 * before[rows]) and torch.equal(torch.count_nonzero(after, 1) > 0,
                                                                       torch.count_nonzero(before, 1) > 0)


def test_extrapolate_learns_again_the_facts_it_undid(learnable_model_dir):
    """A factor that overshoots makes learned facts wrong; they are trained again until learned,
    the steps numbered on from the first training, which is the same as without the factor."""
    plain, scaled = (_learn_two(learnable_model_dir, f, epochs=40, consolidate=2) for f in (1.0, 5.0))
    report = scaled.recipe["extrapolate"]
    assert report["right_before"] == sum(plain.learned) == 2 and report["right_scaled"] < 2
    first = len(plain.history)
    assert [h["loss"] for h in scaled.history[:first]] == [h["loss"] for h in plain.history]
    assert len(scaled.history) > first and [h["step"] for h in scaled.history] == list(range(1, len(scaled.history) + 1))
    assert report["right_after"] == sum(scaled.learned) == scaled.recipe["learned"]["right"] == 2


def test_extrapolate_is_skipped_when_no_step_is_left_to_learn_again(learnable_model_dir, caplog):
    """Training that ends at --max-steps leaves no budget to learn again what the scaling would
    undo: the update stays as trained, with a warning."""
    plain, capped = (_learn_two(learnable_model_dir, f, epochs=40, max_steps=6) for f in (1.0, 1.25))
    assert capped.recipe["extrapolate"] == {"factor": 1.25, "rows": 0, "skipped": "no step or time left to learn again"}
    assert "--extrapolate 1.25 skipped" in caplog.text
    assert torch.equal(plain.model.memory.values[0].weight, capped.model.memory.values[0].weight)
