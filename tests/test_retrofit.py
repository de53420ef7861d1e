import pytest
import torch

from memtune import bypass_memory, freeze_base, memory_parameters, retrofit
from memtune.errors import MemtuneError
from memtune.retrofit import MemoryFFN, decoder_layers, forward_to_memory, parameter_counts
from tiny import tiny_memory_config, tiny_model

ARCHS = ["llama", "qwen2"]


def _ids(n=2, t=12, vocab=320, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, vocab, (n, t), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_parallel_mode_is_exactly_the_base_model(arch):
    model = tiny_model(arch)
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
        retrofit(model, tiny_memory_config(layers=[0, 1], mode="parallel"))
        after = model(ids).logits
    assert (after - base).abs().max().item() == 0.0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["parallel", "replace"])
def test_retrofit_wraps_only_chosen_layers(arch, mode):
    model = tiny_model(arch, layers=3)
    retrofit(model, tiny_memory_config(layers=[0, 2], mode=mode))
    wrapped = [isinstance(layer.mlp, MemoryFFN) for layer in decoder_layers(model)]
    assert wrapped == [True, False, True]
    assert all(w.mode == mode for w in (decoder_layers(model)[i].mlp for i in (0, 2)))
    names = [n for n, _ in memory_parameters(model)]
    assert names and all(n.startswith("memory.") for n in names)
    assert {n.split(".")[2] for n in names if n.startswith("memory.layers.")} == {"0", "2"}


def test_replace_mode_changes_output_and_bypass_restores_base():
    model = tiny_model()
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
        retrofit(model, tiny_memory_config(layers=[1], mode="replace"))
        replaced = model(ids).logits
        with bypass_memory(model):
            restored = model(ids).logits
        again = model(ids).logits
    assert (replaced - base).abs().max() > 1e-4
    assert torch.equal(restored, base)
    assert torch.equal(again, replaced)


def test_shared_and_separate_value_tables():
    shared = retrofit(tiny_model(), tiny_memory_config(layers=[0, 1], share_values=True))
    separate = retrofit(tiny_model(), tiny_memory_config(layers=[0, 1], share_values=False))
    assert len(shared.memory.values) == 1 and len(separate.memory.values) == 2
    ffns = [layer.mlp for layer in decoder_layers(shared)]
    assert ffns[0].values is ffns[1].values
    # Each layer keeps its own query projection and keys.
    assert ffns[0].memory.keys is not ffns[1].memory.keys


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_values_keys_and_query(arch):
    model = retrofit(tiny_model(arch), tiny_memory_config(layers=[0, 1], value_init="normal"))
    freeze_base(model)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    grads = dict(memory_parameters(model))
    values = grads["memory.values.0.weight"].grad
    assert values.is_sparse and values.coalesce().values().abs().sum() > 0
    for name in ("memory.layers.0.keys", "memory.layers.0.query.weight", "memory.layers.1.gate.weight"):
        assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("memory."))


def test_freeze_base_leaves_only_memory_trainable():
    model = retrofit(tiny_model(), tiny_memory_config())
    freeze_base(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in memory_parameters(model)}


@pytest.mark.parametrize(
    "layers, message",
    [([2], r"\[2\] out of range; the model has 2 decoder layers"), ([], "at least one decoder layer")],
)
def test_bad_layer_indices_raise(layers, message):
    with pytest.raises(MemtuneError, match=message):
        retrofit(tiny_model(), tiny_memory_config(layers=layers))


def test_retrofit_twice_raises():
    model = retrofit(tiny_model(), tiny_memory_config())
    with pytest.raises(MemtuneError, match="already has memory"):
        retrofit(model, tiny_memory_config())


def test_generate_works_on_retrofitted_model(tokenizer):
    model = retrofit(tiny_model(), tiny_memory_config(value_init="normal"))
    ids = tokenizer("The capital of France", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, ids["input_ids"].shape[1] + 5)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_to_memory_reads_as_a_whole_pass_and_skips_what_is_above(arch):
    """The slots read (and the deepest layer's input) are a full forward's; the layers above the
    deepest memory layer and the LM head do not run; the model is whole again after."""
    model = retrofit(tiny_model(arch, layers=4), tiny_memory_config(layers=[0, 2], value_init="normal"))
    ids = _ids()
    bank = model.memory
    bank.set_record(True)
    with torch.no_grad():
        logits = model(ids).logits
        full = {k: layer.last_indices.clone() for k, layer in bank.layers.items()}
        for layer in bank.layers.values():
            layer.last_indices = None
        ran = []
        handles = [m.register_forward_hook(lambda *_, name=name: ran.append(name))
                   for name, m in [("layer3", decoder_layers(model)[3]), ("head", model.lm_head)]]
        forward_to_memory(model, input_ids=ids)
        assert ran == []
        for k, layer in bank.layers.items():
            assert torch.equal(layer.last_indices, full[k])
        assert torch.equal(model(ids).logits, logits) and ran == ["layer3", "head"]  # the stop is gone
        for h in handles:
            h.remove()


def test_parameter_counts_split_memory_and_base():
    model = tiny_model()
    base = parameter_counts(model)["total"]
    retrofit(model, tiny_memory_config())
    counts = parameter_counts(model)
    assert counts["base"] == base
    assert counts["memory"] == sum(p.numel() for _, p in memory_parameters(model))
    assert counts["memory"] >= 256 * 32  # the value table alone


def test_bfloat16_value_table_trains_and_keeps_parallel_mode_exact():
    from memtune.methods import SMFConfig, SparseMemoryFinetuning
    from memtune.stats import StepUsage

    model = tiny_model()
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    retrofit(model, tiny_memory_config(layers=[0, 1], value_dtype="bfloat16"))
    table = model.memory.values[0].weight
    assert table.dtype == torch.bfloat16 and model.memory.layers["0"].query.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    method = SparseMemoryFinetuning(SMFConfig("count", top_t=8, optimizer="adam", lr=0.1))
    model = method.prepare(model)
    usage = StepUsage(model.memory)
    model(ids, labels=ids).loss.backward()
    usage.add(torch.ones(ids.shape, dtype=torch.bool))
    assert table.grad.dtype == torch.bfloat16
    method.step(usage)
    assert 0 < int(table.detach().any(dim=1).sum()) <= 2 * 8  # top-T per layer, two layers
