"""Hub datasets: each mapping on fixture rows in the dataset's real schema, read as a local
copy (`data_file=`) and through the `datasets.load_dataset` path; fast one-line offline errors."""

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memtune.data import QA, Choice, hub, load_choices, load_documents, load_qa
from memtune.errors import MemtuneError

TRIVIA_QA = [{
    "question": "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
    "question_id": "tc_33", "question_source": "http://www.triviacountry.com/",
    "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
    "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [], "search_context": []},
    "answer": {"aliases": ["Sunset Blvd", "West Sunset Boulevard", "Sunset Boulevard", "Sunset Bulevard"],
               "normalized_aliases": ["sunset blvd", "west sunset boulevard", "sunset boulevard", "sunset bulevard"],
               "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
               "normalized_value": "sunset boulevard", "type": "WikipediaEntity", "value": "Sunset Boulevard"},
}]
NQ_OPEN = [
    {"question": "where did they film hot tub time machine", "answer": ["Fernie Alpine Resort"]},
    {"question": "who has the right of way in international waters", "answer": ["Neither", "no one"]},
]
SIMPLEQA = [{
    "metadata": "{'topic': 'Science and technology', 'answer_type': 'Person', 'urls': ['https://en.wikipedia.org/wiki/IEEE_Frank_Rosenblatt_Award']}",
    "problem": "Who received the IEEE Frank Rosenblatt Award in 2010?", "answer": "Michio Sugeno",
}]
GSM8K = [{
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}]
MEDMCQA = [
    {"id": "45258d3d-b974-44dd-a161-c3fccbdadd88", "question": "Which of the following is not true for myelinated nerve fibers:",
     "opa": "Impulse through myelinated fibers is slower than non-myelinated fibers",
     "opb": "Membrane currents are generated at nodes of Ranvier", "opc": "Saltatory conduction of impulses is seen",
     "opd": "Local anesthesia is effective only when the nerve is not covered by myelin sheath",
     "cop": 0, "choice_type": "multi", "exp": None, "subject_name": "Physiology", "topic_name": None},
    {"id": "hidden", "question": "A test-split question", "opa": "a", "opb": "b", "opc": "c", "opd": "d",
     "cop": -1, "choice_type": "single", "exp": None, "subject_name": "Anatomy", "topic_name": None},
]
HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"},
    {"ind": 92, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill [title] Heat the grill.",
     "ctx_b": "", "ctx": "[header] How to clean a grill [title] Heat the grill.",
     "endings": ["[step] Scrub it.", "Eat it.", "Paint it.", "Sell it."],
     "source_id": "wikihow~1", "split": "val", "split_type": "zeroshot", "label": "0"},
    {"ind": 7, "activity_label": "Test", "ctx_a": "x", "ctx_b": "y", "ctx": "x y", "endings": ["a", "b", "c", "d"],
     "source_id": "t", "split": "test", "split_type": "indomain", "label": ""},
]
WIKITEXT = [{"text": t} for t in [
    "", " = Robert Boulter = \n", "", " Robert Boulter is an English film , television and theatre actor . \n",
    " = = Career = = \n", " In 2000 Boulter had a guest @-@ starring role . \n", "", " = Du Fu = \n",
    " Du Fu was a prominent Chinese poet . \n",
]]


def _msg(mid, parent, role, text, rank=None, lang="en", deleted=False):
    return {"message_id": mid, "parent_id": parent, "user_id": "u", "created_date": "2023-02-05T14:23:50+00:00",
            "text": text, "role": role, "lang": lang, "review_count": 3, "review_result": True, "deleted": deleted,
            "rank": rank, "synthetic": False, "model_name": None, "message_tree_id": "t1", "tree_state": "ready_for_export"}


OASST1 = [
    _msg("p1", None, "prompter", "Explain entropy briefly."),
    _msg("a1", "p1", "assistant", "A worse reply.", rank=1),
    _msg("a2", "p1", "assistant", "Entropy measures disorder.", rank=0),
    _msg("p2", "a2", "prompter", "And in information theory?"),
    _msg("a3", "p2", "assistant", "Average surprise of a message."),
    _msg("p3", None, "prompter", "Was ist Entropie?", lang="de"),
    _msg("a4", "p3", "assistant", "Ein Maß für Unordnung.", rank=0, lang="de"),
    _msg("a5", "p1", "assistant", "Deleted reply.", rank=0, deleted=True),
]


def write_rows(path, rows):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_trivia_qa(tmp_path):
    [q] = load_qa("trivia_qa", data_file=write_rows(tmp_path / "tqa.jsonl", TRIVIA_QA))
    assert q.question.startswith("Which Lloyd Webber") and q.answer == "Sunset Boulevard" and q.id == "tc_33"
    assert "Sunset Blvd" in q.aliases and "Sunset Boulevard" not in q.aliases


def test_nq_open(tmp_path):
    items = load_qa("nq_open", data_file=write_rows(tmp_path / "nq.jsonl", NQ_OPEN))
    assert items[0] == QA("where did they film hot tub time machine?", "Fernie Alpine Resort", id="nq_open/0")
    assert items[1].answer == "Neither" and items[1].aliases == ["no one"]


def test_simpleqa(tmp_path):
    [q] = load_qa("simpleqa", data_file=write_rows(tmp_path / "s.jsonl", SIMPLEQA))
    assert (q.question, q.answer) == ("Who received the IEEE Frank Rosenblatt Award in 2010?", "Michio Sugeno")


def test_gsm8k_answer_is_solution_and_final_number_an_alias(tmp_path):
    [q] = load_qa("gsm8k", data_file=write_rows(tmp_path / "g.jsonl", GSM8K))
    assert q.answer.endswith("#### 72") and q.aliases == ["72"]


def test_medmcqa_skips_unlabelled_rows(tmp_path):
    [c] = load_choices("medmcqa", data_file=write_rows(tmp_path / "m.jsonl", MEDMCQA))
    assert c.label == 0 and len(c.choices) == 4 and c.choices[1].startswith("Membrane currents")
    assert c.question == "Question: Which of the following is not true for myelinated nerve fibers:\nAnswer:"


def test_hellaswag_lm_eval_preprocessing(tmp_path):
    items = load_choices("hellaswag", data_file=write_rows(tmp_path / "h.parquet", HELLASWAG))
    assert len(items) == 2  # the unlabelled test row is skipped
    assert items[0] == Choice("Roof shingle removal: A man is sitting on a roof. He", HELLASWAG[0]["endings"], 3, "24")
    assert "[" not in items[1].question and items[1].choices[0] == "Scrub it."


def test_wikitext_groups_lines_into_articles(tmp_path):
    docs = load_documents("wikitext", data_file=write_rows(tmp_path / "w.jsonl", WIKITEXT))
    assert [d.id for d in docs] == ["wikitext/Robert Boulter", "wikitext/Du Fu"]
    assert docs[0].text.startswith("= Robert Boulter =") and "= = Career = =" in docs[0].text
    assert docs[1].text.endswith("Chinese poet .")


def test_oasst1_best_ranked_english_replies(tmp_path):
    path = write_rows(tmp_path / "o.jsonl", OASST1)
    pairs = load_qa("oasst1", data_file=path)
    assert [(p.question, p.answer) for p in pairs] == [
        ("Explain entropy briefly.", "Entropy measures disorder."),
        ("And in information theory?", "Average surprise of a message."),
    ]
    docs = load_documents("oasst1", data_file=path)
    assert len(docs) == 5 and all("Entropie" not in d.text and "Deleted" not in d.text for d in docs)


def test_wrong_schema_and_wrong_kind_are_one_line_errors(tmp_path):
    path = write_rows(tmp_path / "nq.jsonl", NQ_OPEN)
    with pytest.raises(MemtuneError, match=r"line 1: row does not match the trivia_qa schema") as info:
        load_qa("trivia_qa", data_file=path)
    assert "\n" not in str(info.value)
    with pytest.raises(MemtuneError, match="has no choices items"):
        load_choices("nq_open", data_file=path)


def test_hub_path_uses_the_same_mapping(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return list(TRIVIA_QA if path == "mandarjoshi/trivia_qa" else HELLASWAG)

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=2.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from_hub = load_qa("trivia_qa")
    assert calls == [("mandarjoshi/trivia_qa", "rc.nocontext", "validation")]
    assert from_hub == load_qa("trivia_qa", data_file=write_rows(tmp_path / "t.jsonl", TRIVIA_QA))
    load_choices("hellaswag", split="train")
    assert calls[-1] == ("Rowan/hellaswag", None, "train")


@pytest.mark.parametrize("offline_env", [True, False])
def test_uncached_dataset_without_network_fails_fast(monkeypatch, offline_env):
    if not offline_env:  # no offline variables: the reachability check must catch it
        from huggingface_hub import constants

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
        assert not hub.hub_reachable(timeout=1.0)
    start = time.perf_counter()
    with pytest.raises(MemtuneError) as info:
        load_qa("nq_open", limit=3)
    message = str(info.value)
    assert time.perf_counter() - start < 15
    assert "\n" not in message and "--data-file" in message and "nq_open" in message and "cache" in message
