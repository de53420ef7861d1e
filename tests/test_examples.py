"""examples/compare.py, the demo's before/after table."""

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("compare", Path(__file__).parent.parent / "examples" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def test_cell_is_one_line_without_column_breaks_and_cut_with_an_ellipsis():
    assert compare.cell("a\n b | c") == "a b \\| c"
    long = "The city of Guangzhou is located in the southern part of " + "very " * 20 + "China."
    assert compare.cell(long) == long[:99] + "…" and len(compare.cell(long)) == 100
    assert compare.cell("x" * 100) == "x" * 100


def _probe(tmp_path, prefix, name, predictions, paraphrases=None):
    qa = {"n": len(predictions), "contains": sum(p["correct"] for p in predictions) / len(predictions),
          "predictions": predictions, "paraphrases": paraphrases}
    (tmp_path / f"{prefix}.{name}.json").write_text(json.dumps({"probes": {"qa": qa}}))


def test_table_from_eval_predictions(tmp_path, monkeypatch, capsys):
    for prefix, ok in (("before", False), ("after", True)):
        facts = [{"question": f"Q{i}?", "prediction": f"A{i} " + "word " * 30, "correct": ok or i == 0}
                 for i in range(3)]
        _probe(tmp_path, prefix, "learned", facts, {"n": 3, "contains": 0.5 if ok else 0.0})
        _probe(tmp_path, prefix, "known", [{"question": "K?", "prediction": "k", "correct": True}])
    monkeypatch.setattr("sys.argv", ["compare", str(tmp_path / "before"), str(tmp_path / "after"), "--parts", "1,2"])
    compare.main()
    out = capsys.readouterr().out
    assert "| facts of learn call 2 (n=2) | 0% | 100% |" in out and "| learned facts (n=3) | 33% | 100% |" in out
    assert "| their paraphrases (n=3) | 0% | 50% |" in out and "| known facts, never trained (n=1) | 100% | 100% |" in out
    assert out.count("✓") == 3 and "…" in out
    monkeypatch.setattr("sys.argv", ["compare", str(tmp_path / "before"), str(tmp_path / "after"), "--parts", "2,2"])
    with pytest.raises(SystemExit, match="--parts 2,2: expected positive sizes adding up to the 3"):
        compare.main()
