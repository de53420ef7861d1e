"""`memtune slots` and memtune.slot_access: the slots facts read at the answer, and their overlap."""

from __future__ import annotations

import json
import math

import pytest
import torch

from memtune.batches import IGNORE, encode_qa
from memtune.cli import main
from memtune.data import QA
from memtune.retrofit import retrofit
from memtune.slot_access import answer_reads, hub_share, jaccard, layer_summary, share_of_reads, slot_access, unrelated_pairs
from tiny import cli_error, tiny_memory_config, tiny_model

FACTS = [
    QA("Who founded Zorbia?", "Quenta", paraphrases=["Zorbia was founded by whom?", "Name the founder of Zorbia."],
       statement="Zorbia was founded by Quenta."),
    QA("What is the capital of Ostland?", "Varn", paraphrases=["Which city is Ostland's capital?"]),
    QA("What is the currency of Pell?", "the dunn"),
]
T = torch.tensor


def memory_model(layers=(0, 1)):
    model = tiny_model()
    retrofit(model, tiny_memory_config(layers=list(layers)))
    return model.eval()


def test_answer_reads_match_a_hand_count(tokenizer):
    """Each phrasing run alone, its answer positions found from the labels, its reads counted."""
    model = memory_model()
    reads = answer_reads(model, tokenizer, FACTS, batch_size=2)  # padded batches mixing facts
    c = model.memory.config
    model.memory.set_record(True)
    for q, fact in zip(FACTS, reads):
        assert len(fact) == 1 + len(q.paraphrases)
        for question, got in zip([q.question, *q.paraphrases], fact):
            [e] = encode_qa(tokenizer, [(question, q.statement or q.answer)])
            with torch.no_grad():
                model(torch.tensor([e.input_ids]))
            positions = [t for t in range(len(e.labels) - 1) if e.labels[t + 1] != IGNORE]
            for name, layer in model.memory.layers.items():
                expected = [int(s) for t in positions for s in layer.last_indices[0, t]]
                assert len(expected) == len(positions) * c.heads * c.knn
                assert sorted(got[name].tolist()) == sorted(expected)
    model.memory.set_record(False)


def test_answer_reads_train_the_answer_when_asked(tokenizer):
    model = memory_model(layers=[1])
    stated = answer_reads(model, tokenizer, FACTS[:1])[0][0]["1"]
    bare = answer_reads(model, tokenizer, FACTS[:1], target="answer")[0][0]["1"]
    [e] = encode_qa(tokenizer, [(FACTS[0].question, "Quenta")])
    answer_positions = sum(y != IGNORE for y in e.labels[1:])
    assert bare.numel() == answer_positions * 2 * 4 < stated.numel()  # heads 2 × knn 4 per position


def test_jaccard_and_share_of_reads_on_hand_made_multisets():
    a, b = T([1, 1, 2, 3]), T([2, 3, 4])
    assert jaccard(a, b) == pytest.approx(2 / 4)  # {2, 3} of {1, 2, 3, 4}
    # a: 2 of its 4 reads fall in b's slots; b: 2 of 3 in a's
    assert share_of_reads(a, b) == pytest.approx((2 / 4 + 2 / 3) / 2)
    assert share_of_reads(a, b) == share_of_reads(b, a)
    assert jaccard(a, a) == share_of_reads(a, a) == 1.0
    assert jaccard(T([1]), T([2])) == share_of_reads(T([1]), T([2])) == 0.0
    empty = torch.empty(0, dtype=torch.long)
    assert jaccard(empty, empty) == 0.0 and share_of_reads(empty, a) == 0.0


def test_hub_share_on_a_hand_example():
    hub = [7] * 50 + list(range(100, 199))  # 100 distinct slots: the top 1 % is slot 7
    assert hub_share(T(hub)) == (pytest.approx(50 / 149), 1)
    two = hub + [500, 500, 500]  # 101 distinct slots: ⌈1.01⌉ = 2, slot 7 and slot 500
    assert hub_share(T(two)) == (pytest.approx(53 / 152), 2)
    assert hub_share(T(list(range(10)))) == (pytest.approx(0.1), 1)  # spread evenly
    assert hub_share(torch.empty(0, dtype=torch.long)) == (0.0, 0)


def test_unrelated_pairs_are_all_pairs_or_a_seeded_sample():
    assert unrelated_pairs(4, 10) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    sample = unrelated_pairs(30, 20, seed=3)
    assert len(set(sample)) == 20 and all(i < j < 30 for i, j in sample)
    assert sample == unrelated_pairs(30, 20, seed=3) != unrelated_pairs(30, 20, seed=4)
    assert unrelated_pairs(1, 10) == []


def test_layer_summary_on_hand_made_reads():
    reads = [
        [{"0": T([1, 1, 2])}, {"0": T([1, 3])}, {"0": T([2, 3])}],  # a fact with two paraphrases
        [{"0": T([4, 5, 5, 1])}],
    ]
    known = [[{"0": T([5, 9])}]]
    s = layer_summary(reads, "0", known)
    pairs = [(T([1, 1, 2]), T([1, 3])), (T([1, 1, 2]), T([2, 3])), (T([1, 3]), T([2, 3]))]
    assert s["phrasing"] == {"jaccard": pytest.approx((1 / 3 + 1 / 3 + 1 / 3) / 3),
                             "share": pytest.approx(sum(share_of_reads(a, b) for a, b in pairs) / 3), "facts": 1}
    # the two questions: {1, 2} and {1, 4, 5}; [1, 1, 2] has 2 of 3 reads in the other, [4, 5, 5, 1] 1 of 4
    assert s["unrelated"] == {"jaccard": pytest.approx(1 / 4), "share": pytest.approx((2 / 3 + 1 / 4) / 2), "pairs": 1}
    assert s["reads"] == 11 and s["slots_read"] == 5
    assert s["reads_per_fact"] == pytest.approx(3.5) and s["slots_per_fact"] == pytest.approx(2.5)
    assert s["slots_per_fact_all_phrasings"] == pytest.approx(3)
    assert s["hub_share"] == pytest.approx(4 / 11) and s["hub_slots"] == 1  # slot 1: 4 of 11 reads
    assert s["known"] == {"share": pytest.approx(2 / 11), "slots_read": 2}  # the two reads of slot 5
    alone = layer_summary(reads[1:], "0")
    assert alone["phrasing"] is None and alone["unrelated"] is None and "known" not in alone and "written" not in alone
    # rows 1 and 5 written: the questions [1, 1, 2] and [4, 5, 5, 1] read them 2 + 3 of 7 times, the paraphrases
    # [1, 3] and [2, 3] 1 of 4 times
    w = layer_summary(reads, "0", written=T([1, 5]))["written"]
    assert w == {"question": pytest.approx(5 / 7), "paraphrases": pytest.approx(1 / 4), "rows": 2}
    assert layer_summary(reads[1:], "0", written=T([1, 5]))["written"]["paraphrases"] is None


def test_slot_access_summary(tokenizer):
    model = memory_model()
    s = slot_access(model, tokenizer, FACTS, known=FACTS[1:], n_pairs=2)
    assert (s["facts"], s["phrasings"], s["facts_with_paraphrases"], s["known_facts"]) == (3, 6, 2, 2)
    assert set(s["layers"]) == {"0", "1"}
    for layer in s["layers"].values():
        assert layer["unrelated"]["pairs"] == 2 and layer["phrasing"]["facts"] == 2
        assert 0 < layer["known"]["share"] < 1  # the known facts are two of the three
        assert layer["slots_per_fact"] <= layer["slots_per_fact_all_phrasings"] <= layer["slots_read"]
        assert "written" not in layer  # a fresh memory: no learn call
    # a learn call that wrote every row of the (shared) value table, then one that wrote none
    bank = model.memory
    n_slots = bank.config.n_slots
    bank.ledger.record({"data": "all"}, {0: torch.arange(n_slots)})
    s = slot_access(model, tokenizer, FACTS, n_pairs=2)
    for layer in s["layers"].values():
        assert layer["written"] == {"question": 1.0, "paraphrases": 1.0, "rows": n_slots}
    bank.ledger = type(bank.ledger)()
    bank.ledger.record({"data": "none"}, {})
    for layer in slot_access(model, tokenizer, FACTS, n_pairs=2)["layers"].values():
        assert layer["written"] == {"question": 0.0, "paraphrases": 0.0, "rows": 0}
    # one value table per layer: a call that wrote every row of layer 1's table only
    model = tiny_model()
    retrofit(model, tiny_memory_config(layers=[0, 1], share_values=False))
    model.memory.ledger.record({"data": "layer 1"}, {1: torch.arange(model.memory.config.n_slots)})
    layers = slot_access(model.eval(), tokenizer, FACTS, n_pairs=2)["layers"]
    assert layers["0"]["written"]["question"] == 0.0 and layers["1"]["written"]["question"] == 1.0


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(q.to_dict()) + "\n" for q in items))
    return str(path)


def test_cli_writes_json_and_png(tiny_model_dir, tmp_path, capsys):
    assert main(["retrofit", "--model", str(tiny_model_dir), "--layers", "0,1", "--n-keys", "16", "--heads", "2",
                 "--knn", "4", "--k-dim", "8", "--out", str(tmp_path / "run" / "model")]) == 0
    data, known = write_jsonl(tmp_path / "facts.jsonl", FACTS), write_jsonl(tmp_path / "known.jsonl", FACTS[2:])
    out = tmp_path / "slots"
    assert main(["slots", "--model", str(tmp_path / "run"), "--data", data, "--known", known, "--out", str(out),
                 "--threads", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["slots.json", "slots.png"]
    assert (out / "slots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "slots.json").read_text())
    assert s["memory"] == {"layers": [0, 1], "n_slots": 256, "heads": 2, "knn": 4}
    assert (s["facts"], s["phrasings"], s["known_facts"], s["target"]) == (3, 6, 1, "statement")
    for layer in s["layers"].values():
        for value in (layer["phrasing"]["jaccard"], layer["phrasing"]["share"], layer["unrelated"]["jaccard"],
                      layer["unrelated"]["share"], layer["hub_share"], layer["known"]["share"]):
            assert 0 <= value <= 1 and math.isfinite(value)
    assert main(["slots", "--model", str(tmp_path / "run"), "--data", data, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_without_paraphrases_still_reports(tiny_model_dir, tmp_path, caplog):
    assert main(["retrofit", "--model", str(tiny_model_dir), "--layers", "1", "--n-keys", "16", "--heads", "2",
                 "--knn", "4", "--k-dim", "8", "--out", str(tmp_path / "mem")]) == 0
    data = write_jsonl(tmp_path / "plain.jsonl", [QA(q.question, q.answer) for q in FACTS])
    assert main(["slots", "--model", str(tmp_path / "mem"), "--data", data, "--out", str(tmp_path / "out")]) == 0
    assert "has no paraphrases" in caplog.text
    s = json.loads((tmp_path / "out" / "slots.json").read_text())["layers"]["1"]
    assert s["phrasing"] is None and s["slots_per_fact"] > 0 and 0 < s["hub_share"] <= 1
    assert s["unrelated"]["pairs"] == 3


def test_cli_bad_input(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    out = tmp_path / "out"
    err = cli_error(["slots", "--model", str(tiny_model_dir), "--data", data, "--out", str(out)], capsys,
                    "has no memory layers")
    assert "memtune retrofit" in err and "memtune learn" in err
    assert not out.exists()
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "Some prose."}) + "\n")
    cli_error(["slots", "--model", str(tiny_model_dir), "--data", str(tmp_path / "docs.jsonl"), "--out", str(out)],
              capsys, "question")
    cli_error(["slots", "--model", str(tiny_model_dir), "--data", data, "--out", str(out), "--pairs", "0"],
              capsys, "--pairs")
    assert not out.exists()
    full = tmp_path / "full"
    assert main(["learn", "--model", str(tiny_model_dir), "--method", "full", "--data", data, "--epochs", "1",
                 "--out", str(full)]) == 0
    capsys.readouterr()
    cli_error(["slots", "--model", str(full), "--data", data, "--out", str(out)], capsys,
              "is a run of --method full: it has no memory layers")
    assert not out.exists()
