"""A value table sharded by columns over 2 processes (gloo) behaves as the unsharded table."""

from __future__ import annotations

import pytest
import torch

from memtune import distributed
from memtune.checkpoint import load_memory, save_memory
from memtune.retrofit import retrofit
from memtune.sharding import ColumnShard, local_optimizer_state, whole_optimizer_state
from multiproc import run_ranks
from test_distributed import scenario
from tiny import tiny_memory_config, tiny_model

HIDDEN = 32  # tiny_model's; v_dim = hidden, 16 columns per rank


def sharded_config():
    return tiny_memory_config(layers=[0, 1], shard_values=True, value_init="normal")


def inputs(rank: int) -> torch.Tensor:
    """Different tokens, and a different number of them, on each rank."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, 320, (2 + rank, 7 + 3 * rank), generator=g)


def memory_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return retrofit(tiny_model(init_range=0.2), sharded_config())


def _forward_backward(model, ids: torch.Tensor) -> torch.Tensor:
    for p in model.parameters():
        p.grad = None
    model.memory.set_record(True)
    logits = model(input_ids=ids).logits
    g = torch.Generator().manual_seed(ids.numel())
    (logits * torch.randn(logits.shape, generator=g)).sum().backward()
    return logits.detach()


def _ranks_worker(rank: int, folder: str) -> None:
    model = memory_model()
    table = model.memory.values[0]
    assert table.shard == ColumnShard(rank, 2, HIDDEN) and table.weight.shape == (256, HIDDEN // 2)
    logits = _forward_backward(model, inputs(rank))
    out = {"logits": logits, "shard_grad": table.weight.grad.coalesce(),
           "query_grad": model.memory.layers["1"].query.weight.grad.clone(),
           "reads": torch.cat([m.last_indices.flatten() for m in model.memory.layers.values()])}
    save_memory(model, f"{folder}/saved-by-2" if rank == 0 else f"{folder}/scratch-{rank}")
    # A checkpoint saved by one process, loaded into this rank's shard.
    loaded = load_memory(tiny_model(init_range=0.2), f"{folder}/saved-by-1")
    assert loaded.memory.values[0].weight.shape == (256, HIDDEN // 2)
    with torch.no_grad():
        out["loaded_logits"] = loaded(input_ids=inputs(rank)).logits
    out |= {f"smf.{k}": v for k, v in scenario("smf-sharded").items()}
    # Sparse Adam state of the same 3 rows on every rank, this rank's columns: whole rows to save.
    local = {"table0.rows": torch.tensor([2, 5, 9]), "table0.exp_avg": torch.full((3, HIDDEN // 2), rank + 1.0),
             "table0.exp_avg_sq": torch.full((3, HIDDEN // 2), rank + 10.0), "table0.steps": torch.ones(3)}
    whole = whole_optimizer_state(local, model.memory.values)
    back = local_optimizer_state(whole, model.memory.values)
    assert all(torch.equal(back[k], local[k]) for k in local)
    out["adam_whole"] = whole
    torch.save(out, f"{folder}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    one = memory_model()  # one process: shard_values changes nothing
    assert one.memory.values[0].shard is None
    with torch.no_grad():
        one.memory.values[0].weight.add_(torch.randn(256, HIDDEN))  # not the init the ranks draw
    save_memory(one, folder / "saved-by-1")
    run_ranks(_ranks_worker, str(folder))
    return folder, [torch.load(folder / f"rank{r}.pt") for r in range(2)]


def test_sharded_forward_and_gradients_equal_unsharded(ranks):
    folder, results = ranks
    # The reference: the whole table the ranks saved, in one process, each rank's tokens alone.
    ref = load_memory(tiny_model(init_range=0.2), folder / "saved-by-2")
    assert ref.memory.values[0].shard is None
    grads = []
    for rank, res in enumerate(results):
        logits = _forward_backward(ref, inputs(rank))
        assert (logits - res["logits"]).abs().max().item() <= 1e-6
        # The weights' gradient (via the query) sees only this rank's tokens, as in one process.
        torch.testing.assert_close(res["query_grad"], ref.memory.layers["1"].query.weight.grad, rtol=1e-5, atol=1e-6)
        grads.append(ref.memory.values[0].weight.grad)
    whole = (grads[0] + grads[1]).coalesce()  # one process over both ranks' tokens
    read = torch.unique(torch.cat([r["reads"] for r in results]))
    assert torch.equal(whole.indices()[0], read)
    for rank, res in enumerate(results):
        shard = res["shard_grad"]
        assert torch.equal(shard.indices(), whole.indices())  # the same rows, on every rank
        cols = slice(rank * HIDDEN // 2, (rank + 1) * HIDDEN // 2)
        assert (shard.values() - whole.values()[:, cols]).abs().max().item() <= 1e-6


def test_save_from_two_ranks_load_in_one_and_back(ranks):
    folder, results = ranks
    one = load_memory(tiny_model(init_range=0.2), folder / "saved-by-2")
    for rank, res in enumerate(results):
        with torch.no_grad():
            assert torch.equal(one(input_ids=inputs(rank)).logits, res["logits"])
    back = load_memory(tiny_model(init_range=0.2), folder / "saved-by-1")
    for rank, res in enumerate(results):
        with torch.no_grad():
            assert torch.equal(back(input_ids=inputs(rank)).logits, res["loaded_logits"])


def test_optimizer_state_is_saved_as_whole_rows(ranks):
    _, results = ranks
    for res in results:
        whole = res["adam_whole"]
        assert whole["table0.exp_avg"].shape == (3, HIDDEN)
        assert torch.equal(whole["table0.exp_avg"][:, : HIDDEN // 2], torch.full((3, HIDDEN // 2), 1.0))
        assert torch.equal(whole["table0.exp_avg_sq"][:, HIDDEN // 2 :], torch.full((3, HIDDEN // 2), 11.0))
        assert torch.equal(whole["table0.rows"], torch.tensor([2, 5, 9]))


def test_sharded_smf_step_equals_one_process(ranks):
    _, results = ranks
    ref = scenario("smf")
    key = "after.memory.values.0.weight"
    before = ref["before.memory.values.0.weight"]
    moved = (ref[key] != before).any(dim=1)
    assert moved.any()
    for res in results:
        assert res[f"smf.{key}"].shape == (256, HIDDEN)  # gathered for the comparison
        assert (res[f"smf.{key}"] - ref[key]).abs().max().item() <= 1e-6
        assert torch.equal(res[f"smf.{key}"][~moved], before[~moved])
    assert distributed.world_size() == 1
