import json

import pytest
import torch

from memtune.batches import collate, encode_documents
from memtune.calibrate import calibrate_queries, load_calibration, save_calibration
from memtune.checkpoint import load_memory, save_memory
from memtune.errors import MemtuneError
from memtune.retrofit import memory_ffns, retrofit
from memtune.stats import memory_fingerprint
from tiny import tiny_memory_config, tiny_model, tiny_tokenizer

TEXTS = ["The capital of France is Paris.", "The capital of Italy is Rome.", "What is the currency of Japan?",
         "Python is a programming language.", "A function returns a value and a class defines objects.",
         "Which region is Chile in? South America."] * 3


def _batches(tokenizer, size=4):
    examples = encode_documents(tokenizer, TEXTS, max_length=32)
    return [collate(examples[i : i + size], tokenizer.pad_token_id, "all") for i in range(0, len(examples), size)]


def _layer_inputs(model, batches) -> dict[int, torch.Tensor]:
    """The inputs of each memory layer at the real tokens of `batches`, by brute force."""
    seen = {i: [] for i in range(len(memory_ffns(model)))}
    hooks = [w.register_forward_pre_hook(lambda _, a, i=i: seen[i].append(a[0])) for i, w in enumerate(memory_ffns(model))]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    masks = [b["attention_mask"].bool() for b in batches]
    return {i: torch.cat([x[m] for x, m in zip(xs, masks)]) for i, xs in seen.items()}


@pytest.mark.parametrize("mode", ["standardize", "whiten"])
def test_queries_see_standardized_inputs(mode):
    torch.manual_seed(0)
    model, tok = tiny_model(hidden=16), tiny_tokenizer()
    retrofit(model, tiny_memory_config(layers=[0, 1], k_dim=8))
    batches = _batches(tok)
    x = _layer_inputs(model, batches)
    before = {name: m.query.weight.detach().clone() for name, m in model.memory.layers.items()}
    n = calibrate_queries(model, batches, mode, progress=False)
    assert n == x[0].shape[0]
    for i, (name, m) in enumerate(model.memory.layers.items()):
        xi = x[i].double()
        assert torch.allclose(m.query_center.double(), xi.mean(0), atol=1e-5)
        # the new projection = the old one applied to standardized (or whitened) inputs
        t = torch.linalg.lstsq(before[name].double(), m.query.weight.double()).solution  # (d, d)
        z = (xi - xi.mean(0)) @ t.T
        if mode == "standardize":
            assert torch.allclose(z.std(0, unbiased=False), torch.ones(16, dtype=torch.float64), atol=1e-3)
        else:
            cov = z.T @ z / z.shape[0]
            assert torch.allclose(torch.diag(cov), torch.ones(16, dtype=torch.float64), atol=1e-2)
            assert (cov - torch.diag(torch.diag(cov))).abs().max() < 1e-2
    assert model.memory.config.query_calibration == mode


def test_calibration_changes_the_lookup_not_the_parallel_model():
    torch.manual_seed(0)
    model, tok = tiny_model(hidden=32), tiny_tokenizer()
    retrofit(model, tiny_memory_config(layers=[0, 1]))
    batches = _batches(tok)
    ids = batches[0]["input_ids"]
    layer = model.memory.layers["1"]
    x = torch.randn(10, 32)
    with torch.no_grad():
        logits = model(ids).logits
        slots = layer.lookup(x[None])[1]
    fingerprint = memory_fingerprint(model.memory)
    calibrate_queries(model, batches, progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)  # zero values: still exactly the base model
        assert not torch.equal(layer.lookup(x[None])[1], slots)
    assert memory_fingerprint(model.memory) != fingerprint  # background statistics must be redone


def test_calibrated_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model, tok = tiny_model(), tiny_tokenizer()
    retrofit(model, tiny_memory_config())
    calibrate_queries(model, _batches(tok), "whiten", progress=False)
    save_memory(model, tmp_path / "m")
    loaded = load_memory(tiny_model(), tmp_path / "m")
    for (name, a), (_, b) in zip(model.memory.state_dict().items(), loaded.memory.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.memory.config.query_calibration == "whiten"


def test_kept_calibration_gives_another_retrofit_the_same_lookup(tmp_path):
    torch.manual_seed(0)
    model, tok = tiny_model(), tiny_tokenizer()
    retrofit(model, tiny_memory_config(layers=[0, 1]))
    calibrate_queries(model, _batches(tok), "whiten", progress=False)
    save_calibration(model, tmp_path / "c")
    torch.manual_seed(0)
    other = tiny_model()
    retrofit(other, tiny_memory_config(layers=[0, 1]))
    assert memory_fingerprint(other.memory) != memory_fingerprint(model.memory)
    load_calibration(other, tmp_path / "c")
    assert memory_fingerprint(other.memory) == memory_fingerprint(model.memory)
    assert other.memory.config.query_calibration == "whiten"
    one_head = tiny_model()
    retrofit(one_head, tiny_memory_config(layers=[0], heads=1))
    with pytest.raises(MemtuneError, match="does not fit memory layer 0"):
        load_calibration(one_head, tmp_path / "c")


def test_bad_calibration_is_an_error():
    torch.manual_seed(0)
    model, tok = tiny_model(), tiny_tokenizer()
    retrofit(model, tiny_memory_config())
    with pytest.raises(MemtuneError, match="calibration='pca' is invalid"):
        calibrate_queries(model, _batches(tok), "pca", progress=False)
    empty = [{**b, "count_mask": torch.zeros_like(b["count_mask"])} for b in _batches(tok)]
    with pytest.raises(MemtuneError, match="calibration saw 0 position"):
        calibrate_queries(model, empty, progress=False)


def test_checkpoint_without_query_center_loads_uncalibrated(tmp_path):
    from safetensors.torch import load_file, save_file

    from memtune.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    torch.manual_seed(0)
    model = retrofit(tiny_model(), tiny_memory_config())
    save_memory(model, tmp_path / "m")
    path = tmp_path / "m" / WEIGHTS_NAME
    state = {k: v for k, v in load_file(path).items() if not k.endswith("query_center")}
    save_file(state, path)  # as written before calibration existed (and before checksums)
    config = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    del config["weights_sha256"]
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(config))
    loaded = load_memory(tiny_model(), tmp_path / "m")
    assert all(not m.query_center.any() for m in loaded.memory.layers.values())


def _phrasing_groups(tokenizer):
    """Three facts, each asked three ways, each answered by the same statement."""
    from memtune.batches import encode_qa

    facts = [(["What is the capital of Zorbia?", "Which city is Zorbia's capital?", "Zorbia has which capital?"],
              "The capital of Zorbia is Quenta."),
             (["Who founded Velm?", "Velm was founded by whom?", "Name the founder of Velm."],
              "Velm was founded by Marla Venn."),
             (["What does Ostrel export?", "Which goods leave Ostrel?", "Name Ostrel's export."],
              "Ostrel exports copper ore.")]
    return [encode_qa(tokenizer, [(q, answer) for q in questions]) for questions, answer in facts]


def test_phrasing_alignment_is_within_phrasing_whitening_and_leaves_the_parallel_model():
    from memtune.calibrate import align_queries

    torch.manual_seed(0)
    model, tok = tiny_model(hidden=16), tiny_tokenizer()
    retrofit(model, tiny_memory_config(layers=[0, 1], k_dim=8, heads=2))
    groups = _phrasing_groups(tok)
    batches = [collate(g, tok.pad_token_id, "loss") for g in groups]
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    # brute force: each layer's input at each phrasing's answer positions
    inputs = []
    for b in batches:
        seen = {}
        hooks = [w.register_forward_pre_hook(lambda _, a, i=i: seen.__setitem__(i, a[0]))
                 for i, w in enumerate(memory_ffns(model))]
        with torch.no_grad():
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        for h in hooks:
            h.remove()
        inputs.append({i: [x[m] for x, m in zip(seen[i], b["count_mask"])] for i in seen})
    before = {name: m.query.weight.detach().double().clone() for name, m in model.memory.layers.items()}
    report = align_queries(model, groups, tok.pad_token_id, floor=0.05, progress=False)
    assert report["groups"] == 3
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)  # zero values: still exactly the base model
    for i, (name, layer) in enumerate(model.memory.layers.items()):
        w, centre = before[name], layer.query_center.double()
        for h in range(2):
            rows = slice(8 * h, 8 * h + 8)
            deviations, queries = [], []
            for g in inputs:
                n = min(x.shape[0] for x in g[i])
                u = torch.stack([(x[:n].double() - centre) @ w[rows].T for x in g[i]])  # (phrasings, n, 8)
                deviations.append((u - u.mean(0)).reshape(-1, 8))
                queries.append(u.reshape(-1, 8))
            d = torch.cat(deviations)
            scatter = d.T @ d / d.shape[0]
            lam, vec = torch.linalg.eigh(scatter)
            lam = lam.clamp_min(0)
            t = vec @ torch.diag((lam + 0.05 * lam.mean()).rsqrt()) @ vec.T
            u = torch.cat(queries)
            t = t * (u.pow(2).sum(-1).mean() / (u @ t.T).pow(2).sum(-1).mean()).sqrt()
            assert torch.allclose(layer.query.weight.double()[rows], t @ w[rows], atol=1e-4)
            # and it does what it is for: phrasings of one fact move closer, relative to all queries
            new = d @ t.T
            assert (new.pow(2).sum() / (u @ t.T).pow(2).sum()) < (d.pow(2).sum() / u.pow(2).sum())
    with pytest.raises(MemtuneError, match="at least two phrasings"):
        align_queries(model, [g[:1] for g in groups], tok.pad_token_id, progress=False)
    # phrasings that never differ (e.g. prompts cut to the same tokens): the queries stay as they are
    kept = {name: m.query.weight.detach().clone() for name, m in model.memory.layers.items()}
    align_queries(model, [[g[0], g[0]] for g in groups], tok.pad_token_id, progress=False)
    assert all(torch.allclose(m.query.weight, kept[name]) for name, m in model.memory.layers.items())
