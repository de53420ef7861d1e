"""Data-parallel learning at 2 processes (gloo) equals one process on the same global batch."""

from __future__ import annotations

import pytest
import torch

from memtune import distributed
from memtune.batches import encode_qa
from memtune.retrofit import retrofit
from memtune.train import LearnConfig, make_method, train
from multiproc import run_ranks
from tiny import tiny_memory_config, tiny_model, tiny_tokenizer

PAIRS = [("What is the capital of Zorbia?", "Quenta"), ("Who founded it?", "Marla Venn"),
         ("What currency is used there?", "The flim"), ("Which river runs through it?", "The Ost"),
         ("What is the capital of Italy?", "Rome"), ("What is the currency of Japan?", "The yen"),
         ("Which region is Chile in?", "South America")]
# 7 examples, 8 per step: at 2 ranks the shares are 3 and 4, in micro-batches of 2 (2+1 and 2+2).
BATCH = dict(batch_size=2, grad_accum=4, max_steps=2, epochs=2)


def scenario(name: str) -> dict[str, torch.Tensor]:
    """Two optimizer steps of one method; the parameters it trains, afterwards."""
    tokenizer = tiny_tokenizer()
    examples = encode_qa(tokenizer, PAIRS)
    if name.startswith("smf"):  # smf-sharded: the value table split by columns over the ranks
        model = retrofit(tiny_model(init_range=0.2), tiny_memory_config(layers=[0, 1], shard_values=name != "smf"))
        cfg = LearnConfig(method="smf", ranker="count", top_t=12, optimizer="sgd", lr=10.0, **BATCH)
    elif name == "full":
        model = tiny_model(init_range=0.2)
        cfg = LearnConfig(method="full", lr=1e-3, **BATCH)
    else:
        model = tiny_model(init_range=0.2)
        cfg = LearnConfig(method="lora", lr=1e-3, lora_dropout=0.0, lora_rank=4, **BATCH)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, history = train(model, tokenizer, examples, cfg, make_method(cfg, None), progress=False)
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if name == "smf-sharded":  # the whole table, gathered from the ranks' columns
        after = {"memory.values.0.weight": model.memory.state_dict()["values.0.weight"]}
    out = {f"after.{n}": p for n, p in after.items()}
    out |= {f"before.{n}": before[n] for n in after if n in before}
    out["loss"] = torch.tensor([h["loss"] for h in history], dtype=torch.float64)
    return out


def _ranks_worker(rank: int, folder: str) -> None:
    assert distributed.world_size() == 2 and distributed.rank() == rank
    for name in ("smf", "full", "lora"):
        torch.save(scenario(name), f"{folder}/{name}.{rank}.pt")
    torch.manual_seed(rank)  # two different memories: rank 0's wins
    model = retrofit(tiny_model(), tiny_memory_config(value_init="normal"))
    distributed.sync_memory(model)
    torch.save({"memory": model.memory.state_dict(), "decided": distributed.from_main([rank])},
               f"{folder}/synced.{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranks")
    run_ranks(_ranks_worker, str(folder))
    return lambda name, rank: torch.load(folder / f"{name}.{rank}.pt")


def test_ranks_start_from_rank_0s_memory_and_decisions(two_ranks):
    r0, r1 = two_ranks("synced", 0), two_ranks("synced", 1)
    assert r0["decided"] == r1["decided"] == [0]
    assert r0["memory"].keys() == r1["memory"].keys()
    for key in r0["memory"]:
        assert torch.equal(r0["memory"][key], r1["memory"][key]), key


def test_local_micro_batches_split_the_step_and_keep_counts_equal(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    chunk = list(range(7))
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert distributed.local_micro_batches(chunk, 2) == [([0, 1], True), ([2], True)]
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.local_micro_batches(chunk, 2) == [([3, 4], True), ([5, 6], True)]
    # A step of one example: rank 0 has nothing and runs a stand-in weighted by zero.
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert distributed.local_micro_batches([9], 2) == [([9], False)]
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.local_micro_batches([9], 2) == [([9], True)]


def test_smf_steps_at_two_ranks_equal_one_process(two_ranks):
    ref = scenario("smf")
    r0, r1 = two_ranks("smf", 0), two_ranks("smf", 1)
    key = "after.memory.values.0.weight"
    assert torch.equal(r0[key], r1[key])  # identical memory on every rank
    moved = (ref[key] != ref["before.memory.values.0.weight"]).any(dim=1)
    assert 0 < int(moved.sum()) <= 2 * 2 * 12  # 2 steps, 2 layers sharing the table, top_t rows each
    assert (r0[key] - ref[key]).abs().max().item() <= 1e-6
    assert torch.equal(r0[key][~moved], ref["before.memory.values.0.weight"][~moved])  # unselected rows bitwise fixed
    assert torch.equal((r0[key] != r0["before.memory.values.0.weight"]).any(dim=1), moved)  # the same rows moved
    assert torch.allclose(r0["loss"], ref["loss"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["full", "lora"])
def test_dense_steps_at_two_ranks_equal_one_process(two_ranks, name):
    ref = scenario(name)
    r0, r1 = two_ranks(name, 0), two_ranks(name, 1)
    assert ref.keys() == r0.keys()
    for key in ref:
        assert torch.equal(r0[key], r1[key]), key
        assert (r0[key] - ref[key]).abs().max().item() <= 1e-5, key
    moved = [k for k in ref if k.startswith("after.") and (ref[k] != ref.get("before." + k[6:], 0)).any()]
    assert moved  # the steps did something (LoRA's B matrices start at zero)


# --- the CLI under torchrun, and a rank that fails -------------------------------------------

QA = [{"question": q, "answer": a} for q, a in PAIRS]
RETROFIT = ["--layers", "0,1", "--n-keys", "16", "--heads", "2", "--knn", "4", "--k-dim", "8"]
LEARN = ["--ranker", "count", "--optimizer", "sgd", "--lr", "10", "--top-t", "12", "--batch-size", "2",
         "--grad-accum", "4", "--epochs", "2", "--related", "0", "--threads", "1"]


@pytest.fixture(params=[False, True], ids=["replicated", "sharded"])
def memory_and_data(tiny_model_dir, tmp_path, request):
    """A memory checkpoint (its value table sharded over the ranks of a torchrun run, or not)
    and 7 facts."""
    import json

    from memtune.cli import main

    shard = ["--shard-values"] if request.param else []
    assert main(["retrofit", "--model", str(tiny_model_dir), *RETROFIT, "--value-init", "normal", *shard,
                 "--out", str(tmp_path / "mem")]) == 0
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return tmp_path / "mem", data


def test_torchrun_learn_equals_one_process(memory_and_data, tmp_path):
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from memtune.cli import main
    from multiproc import free_port

    memory, data = memory_and_data
    args = ["learn", "--model", str(memory), "--data", str(data), *LEARN]
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "memtune", *args, "--out", str(out / "two")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*args, "--out", str(out / "one")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["one", "two"]  # rank 1 wrote nothing beside
    for name in ("config.json", "metrics.jsonl", "results.json", "model"):
        assert (out / "two" / name).exists()
    one = [json.loads(x) for x in (out / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (out / "two" / "metrics.jsonl").read_text().splitlines()]
    examples = json.loads((out / "one" / "results.json").read_text())["examples"]  # facts + word-dropout variants
    assert len(one) == len(two) == 2 * -(-examples // 8)  # one process wrote the metrics, once: 2 epochs of 8s
    assert [m["selected"] for m in one] == [m["selected"] for m in two]
    assert [m["loss_tokens"] for m in one] == [m["loss_tokens"] for m in two]
    a = load_file(out / "one" / "model" / "memory.safetensors")
    b = load_file(out / "two" / "model" / "memory.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key


def _failing_worker(rank: int, memory: str, data: str, out: str, folder: str) -> None:
    import contextlib
    import io

    from memtune.cli import main
    from memtune.errors import MemtuneError
    from memtune.methods import SparseMemoryFinetuning

    if rank == 1:  # rank 1 fails in its second optimizer step
        step = SparseMemoryFinetuning.step

        def failing(self, usage):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2:
                raise MemtuneError("simulated failure")
            return step(self, usage)

        SparseMemoryFinetuning.step = failing
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["learn", "--model", memory, "--data", data, *LEARN, "--out", out])
    with open(f"{folder}/rank{rank}.txt", "w") as f:
        f.write(f"{rc}\n{err.getvalue()}")


@pytest.mark.parametrize("memory_and_data", [False], indirect=True, ids=["replicated"])
def test_a_failing_rank_stops_every_rank_and_writes_nothing(memory_and_data, tmp_path):
    memory, data = memory_and_data
    out = tmp_path / "runs" / "run"
    out.parent.mkdir()
    run_ranks(_failing_worker, str(memory), str(data), str(out), str(tmp_path))
    rc1, err1 = (tmp_path / "rank1.txt").read_text().split("\n", 1)
    rc0, err0 = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    lines1 = [x for x in err1.splitlines() if "error" in x]  # (these workers' ranks keep INFO logs: no torchrun)
    assert rc1 == "2" and lines1 == ["memtune learn: error: rank 1/2: simulated failure"]
    lines0 = [x for x in err0.splitlines() if "error" in x]
    assert rc0 != "0" and len(lines0) == 1
    assert lines0[0].startswith("memtune learn: error: rank 0/2: stopped because another rank failed")
    assert list(out.parent.iterdir()) == []  # no run folder, no temporary left behind
