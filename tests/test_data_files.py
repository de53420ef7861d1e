"""Local data files: every format and kind, and one-line errors for bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memtune.data import QA, Choice, Document, load_choices, load_documents, load_qa, save_jsonl
from memtune.errors import MemtuneError

QA_ROWS = [
    {"question": "What is the capital of France?", "answer": "Paris", "aliases": ["Paris, France"],
     "paraphrases": ["Which city is France's capital?"], "id": "q1"},
    {"question": "Who wrote Hamlet?", "answer": "Shakespeare"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_qa_jsonl(tmp_path):
    items = load_qa(str(write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)))
    assert items == [
        QA("What is the capital of France?", "Paris", ["Paris, France"], ["Which city is France's capital?"], "q1"),
        QA("Who wrote Hamlet?", "Shakespeare"),
    ]
    assert items[0].answers == ["Paris", "Paris, France"]


def test_qa_csv_lists_as_json_or_pipes(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text(
        'question,answer,aliases,paraphrases,id\n'
        '"What is the capital of France?",Paris,"[""Paris, France""]",Which city is France\'s capital?,q1\n'
        'Who wrote Hamlet?,Shakespeare,William Shakespeare|the Bard,,\n'
    )
    items = load_qa(str(path))
    assert items[0] == QA("What is the capital of France?", "Paris", ["Paris, France"], ["Which city is France's capital?"], "q1")
    assert items[1].aliases == ["William Shakespeare", "the Bard"] and items[1].id is None


def test_qa_parquet_and_limit(tmp_path):
    path = tmp_path / "qa.parquet"
    rows = [{**r, "aliases": r.get("aliases", []), "paraphrases": r.get("paraphrases", []), "id": r.get("id")} for r in QA_ROWS]
    pq.write_table(pa.Table.from_pylist(rows), path)
    items = load_qa(str(path))
    assert [q.answer for q in items] == ["Paris", "Shakespeare"] and items[0].aliases == ["Paris, France"]
    assert len(load_qa(str(path), limit=1)) == 1


def test_save_jsonl_round_trip(tmp_path):
    items = [QA("q?", "a", ["b"], ["p?"], "x"), QA("r?", "c")]
    assert load_qa(str(save_jsonl(items, tmp_path / "out.jsonl"))) == items


def test_qa_errors_name_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q?", "answer": "a"}, {"question": "q2?"}])
    with pytest.raises(MemtuneError, match=r"bad\.jsonl line 2: missing field 'answer'"):
        load_qa(str(path))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(MemtuneError, match="is empty"):
        load_qa(str(tmp_path / "empty.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"question": "q?", "answer": "a"}\n{"question": \n')
    with pytest.raises(MemtuneError, match=r"broken\.jsonl line 2: malformed JSON"):
        load_qa(str(tmp_path / "broken.jsonl"))
    with pytest.raises(MemtuneError, match="does not exist"):
        load_qa(str(tmp_path / "missing.jsonl"))
    with pytest.raises(MemtuneError, match="unknown QA source 'nonsense'.*countries"):
        load_qa("nonsense")
    for err in (MemtuneError,):
        with pytest.raises(err) as info:
            load_qa(str(path))
        assert "\n" not in str(info.value)


def test_documents_all_formats(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two", "id": "b"}])
    assert load_documents(str(tmp_path / "d.jsonl")) == [Document("one"), Document("two", "b")]
    (tmp_path / "d.txt").write_text("First paragraph\nstill first.\n\n\nSecond one.\n  \nThird.")
    docs = load_documents(str(tmp_path / "d.txt"))
    assert [d.text for d in docs] == ["First paragraph\nstill first.", "Second one.", "Third."]
    (tmp_path / "d.csv").write_text("text\nalpha\nbeta\n")
    assert [d.text for d in load_documents(str(tmp_path / "d.csv"))] == ["alpha", "beta"]
    pq.write_table(pa.Table.from_pylist([{"text": "gamma"}]), tmp_path / "d.parquet")
    assert [d.text for d in load_documents(str(tmp_path / "d.parquet"))] == ["gamma"]
    write_jsonl(tmp_path / "bad.jsonl", [{"body": "x"}])
    with pytest.raises(MemtuneError, match=r"line 1: missing field 'text'"):
        load_documents(str(tmp_path / "bad.jsonl"))


def test_choices_all_formats(tmp_path):
    row = {"question": "2 + 2 =", "choices": ["3", "4"], "label": 1}
    write_jsonl(tmp_path / "c.jsonl", [row])
    assert load_choices(str(tmp_path / "c.jsonl")) == [Choice("2 + 2 =", ["3", "4"], 1)]
    (tmp_path / "c.csv").write_text('question,choices,label\n2 + 2 =,3|4,1\n')
    assert load_choices(str(tmp_path / "c.csv")) == [Choice("2 + 2 =", ["3", "4"], 1)]
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "c.parquet")
    assert load_choices(str(tmp_path / "c.parquet")) == [Choice("2 + 2 =", ["3", "4"], 1)]
    write_jsonl(tmp_path / "bad.jsonl", [{**row, "label": 5}])
    with pytest.raises(MemtuneError, match="label 5 is out of range"):
        load_choices(str(tmp_path / "bad.jsonl"))
