"""The offline packaged sets: country facts and Python-reference prose."""

import collections

import pytest

from memtune.data import load_documents, load_qa
from memtune.data.countries import RELATION_NAMES, country_facts, relation_of
from memtune.errors import MemtuneError


def test_country_facts_are_deterministic_big_and_varied():
    first, second = load_qa("countries"), country_facts()
    assert first == second
    assert len(first) > 2000 and len({q.id for q in first}) == len(first)
    relations = collections.Counter(relation_of(q) for q in first)
    assert set(relations) == set(RELATION_NAMES) and min(relations.values()) > 100
    assert len({q.id.split("/")[1] for q in first}) > 230  # countries
    # a prefix mixes relations (fixed-seed shuffle)
    assert len({relation_of(q) for q in first[:60]}) > 5


def test_paraphrases_differ_from_the_trained_phrasing():
    for q in country_facts():
        assert len(q.paraphrases) >= 2
        assert len({q.question, *q.paraphrases}) == len(q.paraphrases) + 1
        assert q.answer and q.answer not in q.aliases


def test_known_facts_and_relation_filter():
    by_id = {q.id: q for q in load_qa("countries:capital,calling_code")}
    assert {relation_of(q) for q in by_id.values()} == {"capital", "calling_code"}
    france = by_id["countries/france/capital"]
    assert (france.question, france.answer) == ("What is the capital of France?", "Paris")
    assert by_id["countries/france/calling_code"].answers == ["+33", "33"]
    brazil = by_id["countries/brazil/capital"]
    assert brazil.answer == "Brasília" and "Brasilia" in brazil.aliases
    assert len(load_qa("countries", limit=10)) == 10
    with pytest.raises(MemtuneError, match="unknown country relation 'flag'"):
        load_qa("countries:flag")


def test_prose_parts_are_disjoint_and_deterministic():
    background, heldout = load_documents("prose:background"), load_documents("prose:heldout")
    everything = load_documents("prose")
    assert len(background) + len(heldout) == len(everything) and heldout and background
    topics = lambda docs: {d.id.split("#")[0] for d in docs}  # noqa: E731
    assert not topics(background) & topics(heldout)
    assert not {d.text for d in background} & {d.text for d in heldout}
    assert [d.text for d in heldout] == [d.text for d in load_documents("prose:heldout")]
    assert 0.1 < len(heldout) / len(everything) < 0.35
    assert max(len(d.text) for d in everything) < 20_000
    with pytest.raises(MemtuneError, match="unknown prose source 'prose:train'"):
        load_documents("prose:train")


def test_every_country_fact_states_itself():
    items = load_qa("countries")
    assert all(q.statement and q.statement.endswith(".") and q.answer in q.statement for q in items)
    chad = next(q for q in items if q.id == "countries/chad/capital")
    assert chad.statement == "The capital of Chad is N'Djamena."


def test_a_part_of_a_continent_answers_the_continent_question():
    from memtune.probes import is_correct

    facts = {q.id: q for q in country_facts(["continent", "language", "capital_of"])}
    mali, china = facts["countries/mali/continent"], facts["countries/china/language"]
    assert is_correct("Mali is located in West Africa.", mali.answers)
    assert is_correct("Mali is in Sub-Saharan Africa.", mali.answers)
    assert not is_correct("Mali is located in West Asia.", mali.answers)
    assert is_correct("The official language of China is Mandarin Chinese.", china.answers)
    sudan = facts["countries/sudan/capital_of"]
    assert is_correct("Khartoum is the capital of Sudan.", sudan.answers)
    assert not is_correct("Khartoum is a city in South Sudan.", sudan.answers)
