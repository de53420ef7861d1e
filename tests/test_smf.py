"""Slot statistics and the exact-sparsity invariants of sparse memory finetuning."""

import pytest
import torch

from memtune.batches import collate, encode_qa
from memtune.errors import MemtuneError
from memtune.methods import SMFConfig, SparseMemoryFinetuning
from memtune.retrofit import retrofit
from memtune.sparse_optim import SparseAdam, SparseSGD
from memtune.stats import Background, StepUsage, compute_background, group_stats
from memtune.train import LearnConfig, train
from tiny import tiny_memory_config, tiny_model

PAIRS = [("What is the capital of Zorbia?", "Quenta"), ("Who founded it?", "Marla Venn"),
         ("What currency is used there?", "The flim"), ("Which river runs through it?", "The Ost")]


def memory_model(seed=0, init_range=0.02, **kw):
    return retrofit(tiny_model(seed=seed, init_range=init_range), tiny_memory_config(layers=[0, 1], **kw))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_rows(before, after):
    return torch.nonzero((before != after).any(dim=1)).flatten()


def hand_counts(model, batch, positions):
    """Count reads by running each example alone, unpadded."""
    bank = model.memory
    counts = {k: torch.zeros(bank.config.n_slots, dtype=torch.long) for k in bank.layers}
    bank.set_record(True)
    with torch.no_grad():
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            model(input_ids=batch["input_ids"][i : i + 1, :n])
            for k, layer in bank.layers.items():
                idx = layer.last_indices[0][positions[i, :n]]
                counts[k] += torch.bincount(idx.flatten(), minlength=bank.config.n_slots)
    bank.set_record(False)
    return counts


def test_step_counts_ignore_padding_and_sum_over_micro_batches(tokenizer):
    model = memory_model().double()
    batch = collate(encode_qa(tokenizer, PAIRS), tokenizer.pad_token_id, "loss")
    assert (batch["attention_mask"] == 0).any()  # there is padding to ignore
    expected = hand_counts(model, batch, batch["count_mask"])
    bank = model.memory
    bank.set_record(True)
    usage = StepUsage(bank)
    with torch.no_grad():
        for half in (slice(0, 2), slice(2, 4)):  # two micro-batches of one step
            mb = collate(encode_qa(tokenizer, PAIRS[half]), tokenizer.pad_token_id, "loss")
            model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
            usage.add(mb["count_mask"])
    for k, (slots, c) in usage.counts().items():
        dense = torch.zeros_like(expected[k])
        dense[slots] = c
        assert torch.equal(dense, expected[k])
        assert c.sum() == batch["count_mask"].sum() * bank.config.heads * bank.config.knn


def test_count_positions_all_counts_every_real_token(tokenizer):
    batch = collate(encode_qa(tokenizer, PAIRS), tokenizer.pad_token_id, "all")
    assert torch.equal(batch["count_mask"], batch["attention_mask"].bool())
    loss_only = collate(encode_qa(tokenizer, PAIRS), tokenizer.pad_token_id, "loss")["count_mask"]
    assert loss_only.sum() < batch["count_mask"].sum() and not (loss_only & ~batch["count_mask"]).any()


def test_background_df_and_counts_match_hand_count(tokenizer):
    model = memory_model().double()
    batches = [collate(encode_qa(tokenizer, PAIRS[i : i + 2]), tokenizer.pad_token_id, "all") for i in (0, 2)]
    stats = compute_background(model, iter(batches), progress=False)
    assert stats.n_batches == 2
    per_batch = [hand_counts(model, b, b["count_mask"]) for b in batches]
    for k in model.memory.layers:
        assert torch.equal(stats.counts[k], per_batch[0][k] + per_batch[1][k])
        assert torch.equal(stats.df[k], (per_batch[0][k] > 0).long() + (per_batch[1][k] > 0).long())


def test_group_stats_count_groups_however_many_batches_each_takes(tokenizer):
    """Per layer, df counts the groups that read a slot there (a group of 3 examples in batches of
    2 counts once); read_by(2) keeps the slots two groups read, as one batch."""
    model = memory_model().double()
    examples = encode_qa(tokenizer, PAIRS)
    groups = [examples[:3], [], examples[3:]]
    stats = group_stats(model, groups, tokenizer.pad_token_id, batch_size=2, count_positions="all", progress=False)
    assert stats.n_batches == 2
    per_group = []
    for g in (examples[:3], examples[3:]):
        batch = collate(g, tokenizer.pad_token_id, "all")
        per_group.append(hand_counts(model, batch, batch["count_mask"]))
    both = stats.read_by(2)
    for k in model.memory.layers:
        assert torch.equal(stats.counts[k], per_group[0][k] + per_group[1][k])
        assert torch.equal(stats.df[k], (per_group[0][k] > 0).long() + (per_group[1][k] > 0).long())
        assert torch.equal(both.df[k], ((per_group[0][k] > 0) & (per_group[1][k] > 0)).long())
        assert torch.equal(both.counts[k], stats.counts[k] * both.df[k])
    assert both.n_batches == 1 and 0 < sum(int(v.sum()) for v in both.df.values()) < sum(
        int((v > 0).sum()) for v in stats.df.values())
    with pytest.raises(MemtuneError, match="at least one non-empty group"):
        group_stats(model, [[]], tokenizer.pad_token_id, batch_size=2, progress=False)
    for n in (0, 1.5, True):
        with pytest.raises(MemtuneError, match=r"read_by\(.*\) is invalid: expected an integer >= 1"):
            stats.read_by(n)


def test_background_round_trip_and_fingerprint(tokenizer, tmp_path):
    model = memory_model()
    batches = [collate(encode_qa(tokenizer, PAIRS), tokenizer.pad_token_id, "all")]
    stats = compute_background(model, iter(batches), progress=False)
    stats.save(tmp_path / "bg")
    loaded = Background.load(tmp_path / "bg")
    assert loaded.n_batches == 1 and all(torch.equal(loaded.df[k], stats.df[k]) for k in stats.df)
    loaded.check(model.memory)
    with pytest.raises(MemtuneError, match="different memory model"):
        loaded.check(memory_model(seed=1).memory)


def _one_step(model, method, tokenizer, pairs):
    from memtune.batches import token_loss_sum

    batch = collate(encode_qa(tokenizer, pairs), tokenizer.pad_token_id, "loss")
    usage = StepUsage(model.memory)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    token_loss_sum(out.logits, batch["labels"]).backward()
    usage.add(batch["count_mask"])
    selected = method.select(usage)
    method.step(usage)
    return torch.unique(torch.cat(list(selected.values())))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_step_changes_exactly_the_selected_rows(tokenizer, optimizer):
    model = memory_model()
    method = SparseMemoryFinetuning(SMFConfig("count", top_t=6, optimizer=optimizer, lr=0.5))
    model = method.prepare(model)
    before = snapshot(model)
    selected = _one_step(model, method, tokenizer, PAIRS)
    after = snapshot(model)
    rows = changed_rows(before["memory.values.0.weight"], after["memory.values.0.weight"])
    assert rows.numel() > 0 and torch.equal(rows, selected)
    for name in before:
        if name != "memory.values.0.weight":
            assert torch.equal(before[name], after[name]), name


def test_adam_never_moves_a_row_outside_the_current_selection(tokenizer):
    model = memory_model()
    method = SparseMemoryFinetuning(SMFConfig("count", top_t=4, optimizer="adam", lr=0.5))
    model = method.prepare(model)
    s1 = _one_step(model, method, tokenizer, PAIRS[:2])
    mid = model.memory.values[0].weight.detach().clone()
    s2 = _one_step(model, method, tokenizer, PAIRS[2:])
    end = model.memory.values[0].weight.detach()
    only_first = s1[~torch.isin(s1, s2)]
    assert only_first.numel() > 0  # the case under test occurs
    assert torch.equal(mid[only_first], end[only_first])  # has Adam state, was not selected: frozen
    assert torch.equal(changed_rows(mid, end), s2)
    assert method.optimizer.rows_with_state() == torch.unique(torch.cat([s1, s2])).numel()


def test_sparse_adam_matches_dense_adam_on_always_selected_rows():
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(10, 3))
    ref = torch.nn.Parameter(table.detach()[[2, 5]].clone())
    opt, ref_opt = SparseAdam(lr=0.1), torch.optim.Adam([ref], lr=0.1)
    rows = torch.tensor([2, 5])
    for _ in range(3):
        g = torch.randn(2, 3)
        table.grad = torch.sparse_coo_tensor(rows[None], g, (10, 3), check_invariants=True)
        ref.grad = g.clone()
        opt.step(table, rows)
        ref_opt.step()
    assert torch.allclose(table.detach()[[2, 5]], ref.detach(), atol=1e-6)


def test_sgd_update_is_lr_times_gradient():
    table = torch.nn.Parameter(torch.zeros(6, 2))
    table.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), (6, 2),
                                         check_invariants=True)
    SparseSGD(lr=0.5).step(table, torch.tensor([4]))
    assert table.detach().tolist() == [[0, 0], [0, 0], [0, 0], [0, 0], [-1.5, -2.0], [0, 0]]


@pytest.mark.parametrize("ranker", ["count", "random"])
def test_same_seed_gives_bitwise_identical_results(tokenizer, ranker):
    def run():
        model = memory_model()
        cfg = LearnConfig(ranker=ranker, top_t=8, epochs=2, batch_size=2, seed=7)
        method = SparseMemoryFinetuning(cfg.smf())
        model, history = train(model, tokenizer, encode_qa(tokenizer, PAIRS), cfg, method, progress=False)
        return model.memory.values[0].weight.detach().clone(), [h["loss"] for h in history]

    (w1, l1), (w2, l2) = run(), run()
    assert torch.equal(w1, w2) and l1 == l2
    assert w1.abs().sum() > 0


def test_smf_learns_the_training_data(tokenizer):
    model = memory_model(init_range=0.5)  # logits large enough to express a confident answer
    cfg = LearnConfig(ranker="count", top_t=64, epochs=40, batch_size=4, lr=0.3)
    method = SparseMemoryFinetuning(cfg.smf())
    _, history = train(model, tokenizer, encode_qa(tokenizer, PAIRS), cfg, method, progress=False)
    assert history[-1]["loss"] < 0.85 * history[0]["loss"]


def test_tfidf_without_background_is_an_error():
    with pytest.raises(MemtuneError, match="needs background statistics"):
        SparseMemoryFinetuning(SMFConfig("tfidf", 10, "adam", 0.1))


def test_fingerprint_follows_the_lookup_only():
    from memtune.stats import memory_fingerprint

    model = memory_model()
    before = memory_fingerprint(model.memory)
    with torch.no_grad():
        model.memory.values[0].weight.add_(1.0)
        model.memory.layers["0"].out.weight.add_(1.0)
    assert memory_fingerprint(model.memory) == before
    with torch.no_grad():
        model.memory.layers["1"].keys.add_(1e-3)
    assert memory_fingerprint(model.memory) != before


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_learned_keeps_earlier_rows_when_learning_later_data(tokenizer, freeze):
    model = memory_model()
    cfg = LearnConfig(ranker="count", top_t=64, epochs=2, batch_size=2, freeze_learned=freeze)
    method = SparseMemoryFinetuning(SMFConfig(cfg.ranker, cfg.top_t, cfg.optimizer, cfg.lr, freeze_learned=freeze))
    model, _ = train(model, tokenizer, encode_qa(tokenizer, PAIRS[:2]), cfg, method, progress=False)
    first = [t.weight.detach().clone() for t in model.memory.values]
    first_rows = {t: rows.clone() for t, rows in method.touched.items()}
    model, _ = train(model, tokenizer, encode_qa(tokenizer, PAIRS[2:]), cfg, method, progress=False)
    for t, table in enumerate(model.memory.values):
        rewritten = changed_rows(first[t], table.weight.detach())
        assert rewritten.numel() > 0  # the later data was learned ...
        overwritten = torch.isin(rewritten, first_rows[t])
        assert not overwritten.any() if freeze else overwritten.any()  # ... over the earlier rows unless frozen


def test_protect_reads_keeps_every_row_earlier_data_reads(tokenizer):
    model = memory_model()
    cfg = LearnConfig(ranker="count", top_t=64, epochs=2, batch_size=2)
    method = SparseMemoryFinetuning(cfg.smf())
    first = encode_qa(tokenizer, PAIRS[:2])
    model, _ = train(model, tokenizer, first, cfg, method, progress=False)
    reads = compute_background(model, iter([collate(first, tokenizer.pad_token_id, "all")]), progress=False)
    method.protect_reads(reads)
    before = [t.weight.detach().clone() for t in model.memory.values]
    model, _ = train(model, tokenizer, encode_qa(tokenizer, PAIRS[2:]), cfg, method, progress=False)
    read = torch.unique(torch.cat([reads.df[k].nonzero().flatten() for k in model.memory.layers]))
    for t, table in enumerate(model.memory.values):
        changed = changed_rows(before[t], table.weight.detach())
        assert changed.numel() > 0 and not torch.isin(changed, read).any()


def test_unwrite_gives_read_rows_their_values_from_before_training_and_protects_them(tokenizer):
    model = memory_model()
    with torch.no_grad():  # values already written, as in a memory that learned before
        for table in model.memory.values:
            table.weight.normal_()
    cfg = LearnConfig(ranker="count", top_t=64, epochs=2, batch_size=2)
    method = SparseMemoryFinetuning(cfg.smf())
    start = [t.weight.detach().clone() for t in model.memory.values]
    reads = compute_background(model, iter([collate(encode_qa(tokenizer, PAIRS[:1]), tokenizer.pad_token_id, "loss")]),
                               progress=False)  # where the first question's answer is predicted
    with pytest.raises(RuntimeError, match="remember_originals"):
        method.prepare(model)
        method.unwrite(reads)
    method.remember_originals()
    model, _ = train(model, tokenizer, encode_qa(tokenizer, PAIRS[:2]), cfg, method, progress=False)
    trained = [t.weight.detach().clone() for t in model.memory.values]
    touched = {t: rows.clone() for t, rows in method.touched.items()}
    read = torch.unique(torch.cat([reads.df[k].nonzero().flatten() for k in model.memory.layers]))
    back = torch.unique(read[torch.isin(read, touched[0])])
    assert 0 < back.numel() < touched[0].numel()
    assert method.unwrite(reads) == back.numel()
    weight = model.memory.values[0].weight.detach()
    assert torch.equal(weight[back], start[0][back])  # bitwise: the value before its first update
    rest = touched[0][~torch.isin(touched[0], back)]
    assert torch.equal(weight[rest], trained[0][rest]) and not torch.equal(weight[rest], start[0][rest])
    assert not torch.isin(back, method.touched[0]).any() and torch.isin(back, method.protected[0]).all()
    assert not torch.isin(back, method.optimizer.state[id(model.memory.values[0].weight)].rows).any()  # state gone
    model, _ = train(model, tokenizer, encode_qa(tokenizer, PAIRS[:2]), cfg, method, progress=False)
    assert torch.equal(model.memory.values[0].weight.detach()[back], start[0][back])  # protected from then on
    moved = changed_rows(trained[0][rest], model.memory.values[0].weight.detach()[rest])
    assert moved.numel() > 0  # learning the same data again may move its own rows (freeze_learned or not)


def test_unwrite_refuses_rows_updated_before_their_values_were_kept(tokenizer):
    model = memory_model()
    cfg = LearnConfig(ranker="count", top_t=64, epochs=1, batch_size=2)
    method = SparseMemoryFinetuning(cfg.smf())
    model, _ = train(model, tokenizer, encode_qa(tokenizer, PAIRS[:2]), cfg, method, progress=False)
    method.remember_originals()
    reads = compute_background(model, iter([collate(encode_qa(tokenizer, PAIRS[:2]), tokenizer.pad_token_id, "loss")]),
                               progress=False)
    with pytest.raises(RuntimeError, match="before remember_originals"):
        method.unwrite(reads)


def test_extrapolate_scales_each_updated_rows_change_from_its_value_before(tokenizer):
    """before + f x (after - before) on the rows updated (the values before are not zero here, as
    in a memory that learned before), every other row as it was; a factor that overflows changes nothing."""
    model = memory_model()
    with torch.no_grad():
        for table in model.memory.values:
            table.weight.normal_()
    cfg = LearnConfig(ranker="count", top_t=64, epochs=2, batch_size=2)
    method = SparseMemoryFinetuning(cfg.smf())
    method.prepare(model)
    with pytest.raises(RuntimeError, match="remember_originals"):
        method.extrapolate(1.5)
    start = [t.weight.detach().clone() for t in model.memory.values]
    method.remember_originals()
    model, _ = train(model, tokenizer, encode_qa(tokenizer, PAIRS[:2]), cfg, method, progress=False)
    trained = [t.weight.detach().clone() for t in model.memory.values]
    rows = method.touched[0]
    assert torch.equal(changed_rows(start[0], trained[0]), rows)  # (the rows touched are the rows changed)
    assert method.extrapolate(1.5) == rows.numel()
    weight = model.memory.values[0].weight.detach()
    expected = start[0][rows] + 1.5 * (trained[0][rows] - start[0][rows])
    torch.testing.assert_close(weight[rows], expected)
    assert torch.equal(changed_rows(trained[0], weight), rows)  # nothing else moved
    method.extrapolate(1 / 1.5)  # back (the values before are still known)
    torch.testing.assert_close(model.memory.values[0].weight.detach(), trained[0])
    with pytest.raises(MemtuneError, match="extrapolate=1e\\+39: the scaled value rows overflow float32"):
        method.extrapolate(1e39)
    assert torch.equal(model.memory.values[0].weight.detach()[rows], weight[rows])  # nothing changed


def test_protected_slots_are_never_updated(tokenizer):
    model = memory_model()
    protect_batch = collate(encode_qa(tokenizer, PAIRS[:2]), tokenizer.pad_token_id, "loss")
    protect = compute_background(model, iter([protect_batch]), progress=False)
    cfg = LearnConfig(ranker="count", top_t=64, epochs=2, batch_size=2)
    method = SparseMemoryFinetuning(cfg.smf(), protect=protect)
    before = model.memory.values[0].weight.detach().clone()
    model, _ = train(model, tokenizer, encode_qa(tokenizer, PAIRS), cfg, method, progress=False)
    protected = torch.unique(torch.cat([protect.df[k].nonzero().flatten() for k in model.memory.layers]))
    changed = changed_rows(before, model.memory.values[0].weight.detach())
    assert protected.numel() > 0 and changed.numel() > 0
    assert not torch.isin(changed, protected).any()  # the same questions are learned, around their slots


def test_linear_schedule_decays_the_rate_each_step_uses_and_restarts_per_chunk(tokenizer):
    model = memory_model()
    cfg = LearnConfig(ranker="count", top_t=64, epochs=2, batch_size=1, lr=0.5, schedule="linear")
    method = SparseMemoryFinetuning(cfg.smf())
    used = []
    step = method.optimizer.step
    method.optimizer.step = lambda table, rows: used.append(method.optimizer.lr) or step(table, rows)
    for chunk in (PAIRS[:2], PAIRS[2:]):
        model, history = train(model, tokenizer, encode_qa(tokenizer, chunk), cfg, method, progress=False)
        expected = [0.5 * (1 - i / 4) for i in range(4)]  # 2 examples x 2 epochs, from --lr down
        assert [r["lr"] for r in history] == pytest.approx(expected)
    n_tables = len(model.memory.values)
    assert used == pytest.approx([lr for lr in expected for _ in range(n_tables)] * 2)


def test_smf_config_is_the_one_object_the_method_takes():
    from memtune.errors import MemtuneError
    from memtune.train import LearnConfig

    cfg = LearnConfig(ranker="count", top_t=7, optimizer="sgd", count_positions="all", freeze_learned=False, seed=3)
    smf = cfg.smf()
    assert smf == SMFConfig("count", 7, "sgd", cfg.lr, "all", False, True, 3)
    method = SparseMemoryFinetuning(smf)
    assert method.config is smf and method.freeze_learned is False
    for bad, message in [({"ranker": "bm25"}, "ranker"), ({"top_t": 0}, "top_t=0"), ({"optimizer": "lion"}, "optimizer='lion'"),
                         ({"lr": -1.0}, "lr=-1.0"), ({"count_positions": "some"}, "count_positions='some'"),
                         ({"lr": True}, "lr=True"), ({"top_t": True}, "top_t=True"), ({"write_knn": 2.0}, "write_knn=2.0")]:
        with pytest.raises(MemtuneError, match=message):
            SMFConfig(**bad)
        with pytest.raises(MemtuneError, match=message):
            LearnConfig(**bad)
    assert LearnConfig(method="full", top_t=0).lr == 2e-5  # not SMF's to check (the CLI refuses it: check_options)


def test_options_that_do_nothing_for_a_method_are_refused():
    from memtune.errors import MemtuneError
    from memtune.train import check_options

    check_options("smf", {"top_t": 5, "lr": 1.0})
    check_options("lora", {"lora_rank": 4, "epochs": 2})
    with pytest.raises(MemtuneError, match="^--top-t is for SMF: method 'full' does not use it$"):
        check_options("full", {"top_t": 5, "lr": 1.0})
    with pytest.raises(MemtuneError, match="^--lora-alpha is for LoRA: method 'smf'"):
        check_options("smf", {"lora_alpha": 8})
    with pytest.raises(MemtuneError, match="^--related is for SMF"):
        check_options("lora", {"related": 0}, ("related",))


def test_write_knn_trains_a_superset_of_the_slots_read_and_reads_stay_at_knn(tokenizer):
    model = memory_model(knn=2)
    method = SparseMemoryFinetuning(SMFConfig("count", top_t=10_000, optimizer="sgd", lr=1e3, write_knn=6))
    model = method.prepare(model)
    batch = collate(encode_qa(tokenizer, PAIRS), tokenizer.pad_token_id, "loss")
    bank = model.memory
    with torch.no_grad():
        reads = {}
        for mode in (False, True):
            model.train(mode)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            reads[mode] = {k: layer.last_indices.view(*batch["input_ids"].shape, 2, -1) for k, layer in bank.layers.items()}
    for k in bank.layers:
        read, written = reads[False][k], reads[True][k]  # (B, T, heads, knn)
        assert read.shape[-1] == 2 and written.shape[-1] == 6
        assert (read.unsqueeze(-1) == written.unsqueeze(-2)).any(-1).all()  # every slot read is written
    model.train()
    before = snapshot(model)["memory.values.0.weight"]
    _one_step(model, method, tokenizer, PAIRS)
    changed = changed_rows(before, model.memory.values[0].weight.detach())
    read_rows = torch.unique(torch.cat([r[batch["count_mask"]].flatten() for r in reads[False].values()]))
    assert changed.numel() > read_rows.numel() and torch.isin(read_rows, changed).all()  # wider than the read
    with pytest.raises(MemtuneError, match="write_knn=1 is invalid"):
        SparseMemoryFinetuning(SMFConfig("count", write_knn=1)).prepare(memory_model(knn=2))
    for bad in (0, True, 2.5):
        with pytest.raises(MemtuneError, match=f"write_knn={bad} is invalid"):
            SMFConfig("count", write_knn=bad)


def test_query_noise_jitters_training_reads_only_and_writes_the_slots_near_the_query(tokenizer):
    batch = collate(encode_qa(tokenizer, PAIRS), tokenizer.pad_token_id, "loss")
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def reads(model, training):
        model.train(training)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
        return out, {k: layer.last_indices.clone() for k, layer in model.memory.layers.items()}

    exact = memory_model(knn=2)
    noisy = memory_model(knn=2)
    SparseMemoryFinetuning(SMFConfig("count", top_t=10_000, optimizer="sgd", lr=1e3)).prepare(exact)
    method = SparseMemoryFinetuning(SMFConfig("count", top_t=10_000, optimizer="sgd", lr=1e3, query_noise=1.0))
    method.prepare(noisy)
    assert all(layer.query_noise == 1.0 for layer in noisy.memory.layers.values())
    logits, read = reads(exact, False)
    logits_noisy, read_noisy = reads(noisy, False)  # eval mode: the exact query
    assert torch.equal(logits, logits_noisy) and all(torch.equal(read[k], read_noisy[k]) for k in read)
    assert all(torch.equal(read[k], reads(exact, True)[1][k]) for k in read)  # σ = 0 trains on the exact reads
    jittered = reads(noisy, True)[1]
    assert any(not torch.equal(read[k], jittered[k]) for k in read)
    # What one noisy step writes includes slots the exact query does not read.
    torch.manual_seed(0)
    noisy.train()
    before = snapshot(noisy)["memory.values.0.weight"]
    _one_step(noisy, method, tokenizer, PAIRS)
    changed = changed_rows(before, noisy.memory.values[0].weight.detach())
    count = batch["count_mask"]
    exact_rows = torch.unique(torch.cat([r[count].flatten() for r in read.values()]))
    assert changed.numel() > 0 and not torch.isin(changed, exact_rows).all()
    for bad in (-0.1, float("inf"), True, "0.2"):
        with pytest.raises(MemtuneError, match="query_noise=.* is invalid"):
            SMFConfig("count", query_noise=bad)


def test_slot_dropout_leaves_out_part_of_each_training_read_and_writes_only_what_was_kept(tokenizer):
    batch = collate(encode_qa(tokenizer, PAIRS), tokenizer.pad_token_id, "loss")
    x = torch.randn(3, 5, memory_model(knn=2).config.hidden_size)
    model = memory_model(knn=2)
    method = SparseMemoryFinetuning(SMFConfig("count", top_t=10_000, optimizer="sgd", lr=1e3, slot_dropout=0.5))
    method.prepare(model)
    layer = next(iter(model.memory.layers.values()))
    assert all(m.slot_dropout == 0.5 for m in model.memory.layers.values())
    layer.eval()
    weights, indices = layer.lookup(x)
    assert (weights > 0).all()  # eval mode reads every slot
    layer.train()
    torch.manual_seed(0)
    dropped, same = layer.lookup(x)
    assert torch.equal(same, indices)  # the same slots are looked up ...
    kept = dropped > 0
    assert 0.3 < kept.float().mean() < 0.7  # ... about half of them kept, not rescaled
    assert torch.equal(dropped[kept], weights[kept])
    # One step writes only slots a kept read took: fewer rows than the whole reads.
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    count = batch["count_mask"]
    read = torch.unique(torch.cat([m.last_indices[count].flatten() for m in model.memory.layers.values()]))
    torch.manual_seed(0)
    model.train()
    before = snapshot(model)["memory.values.0.weight"]
    _one_step(model, method, tokenizer, PAIRS)
    changed = changed_rows(before, model.memory.values[0].weight.detach())
    assert changed.numel() > 0 and torch.isin(changed, read).all() and changed.numel() < read.numel()
    for bad in (-0.1, 1.0, True, "0.2"):
        with pytest.raises(MemtuneError, match="slot_dropout=.* is invalid"):
            SMFConfig("count", slot_dropout=bad)
