import json

import pytest
import torch
from safetensors import safe_open

from memtune.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_memory, save_memory
from memtune.errors import MemtuneError
from memtune.models import load_model
from memtune.retrofit import retrofit
from tiny import tiny_memory_config, tiny_model


def _trained_memory_model(arch="llama"):
    model = retrofit(tiny_model(arch), tiny_memory_config(layers=[0, 1], value_init="normal"))
    with torch.no_grad():
        for _, p in model.memory.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_load_round_trip_is_bitwise(tmp_path, arch):
    model = _trained_memory_model(arch)
    ids = torch.randint(6, 320, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    save_memory(model, tmp_path / "mem")
    reloaded = load_memory(tiny_model(arch), tmp_path / "mem")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_checkpoint_holds_memory_weights_only(tmp_path):
    model = _trained_memory_model()
    save_memory(model, tmp_path / "mem")
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    with safe_open(tmp_path / "mem" / WEIGHTS_NAME, "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("memory.") for k in keys)
    config = json.loads((tmp_path / "mem" / CONFIG_NAME).read_text())
    assert config["memory"]["layers"] == [0, 1]


def test_load_model_dispatches_on_memory_checkpoint(tmp_path, tiny_model_dir):
    base, _ = load_model(str(tiny_model_dir))
    cfg = tiny_memory_config(value_init="normal", base_model=str(tiny_model_dir))
    retrofit(base, cfg)
    save_memory(base, tmp_path / "mem")
    model, tokenizer = load_model(str(tmp_path / "mem"))
    ids = torch.randint(6, 320, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    assert tokenizer.pad_token is not None


def test_existing_output_is_not_overwritten(tmp_path):
    model = _trained_memory_model()
    (tmp_path / "mem").mkdir()
    (tmp_path / "mem" / "keep.txt").write_text("x")
    with pytest.raises(MemtuneError, match="already exists"):
        save_memory(model, tmp_path / "mem")
    assert (tmp_path / "mem" / "keep.txt").exists()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import memtune.checkpoint as ckpt

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(RuntimeError):
        save_memory(_trained_memory_model(), tmp_path / "mem")
    assert list(tmp_path.iterdir()) == []


def test_mismatched_weights_are_an_error(tmp_path):
    save_memory(_trained_memory_model(), tmp_path / "mem")
    cfg = json.loads((tmp_path / "mem" / CONFIG_NAME).read_text())
    cfg["memory"]["layers"] = [0]
    (tmp_path / "mem" / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(MemtuneError, match="does not match"):
        load_memory(tiny_model(), tmp_path / "mem")


def test_mostly_zero_value_table_is_stored_compactly(tmp_path):
    model = retrofit(tiny_model(), tiny_memory_config(layers=[0, 1], mode="parallel"))  # zero values
    with torch.no_grad():
        model.memory.values[0].weight[[3, 17, 200]] = torch.randn(3, 32)
    save_memory(model, tmp_path / "mem")
    with safe_open(tmp_path / "mem" / WEIGHTS_NAME, "pt") as f:
        assert f.get_tensor("memory.values.0.weight.rows").tolist() == [3, 17, 200]
        assert "memory.values.0.weight" not in f.keys()
    reloaded = load_memory(tiny_model(), tmp_path / "mem")
    assert torch.equal(reloaded.memory.values[0].weight, model.memory.values[0].weight)
    ids = torch.randint(6, 320, (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
