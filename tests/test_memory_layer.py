"""The memory layer's fast paths against brute-force and dense references (issue #2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memtune.config import MemoryConfig
from memtune.memory import (
    ProductKeyMemory,
    ValueTable,
    _gathered_dots,
    empty_huge,
    read_values,
)
from memtune.product_keys import blocked_topk, brute_force_topk, product_key_topk


@pytest.mark.parametrize("knn", [1, 2, 7, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_product_key_topk_equals_brute_force(knn: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(knn)
    query = torch.randn(50, 3, 2, 8, generator=g, dtype=dtype)
    keys = torch.randn(3, 2, 40, 8, generator=g, dtype=dtype)
    scores, indices = product_key_topk(query, keys, knn)
    ref_scores, ref_indices = brute_force_topk(query, keys, knn)
    assert scores.shape == indices.shape == (50, 3, knn)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores)
    assert (scores[..., :-1] >= scores[..., 1:]).all()


def test_product_key_topk_in_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half scores made in blocks of 7 rows (the last one short) give the brute-force top-k."""
    monkeypatch.setattr("memtune.product_keys._SCORE_CHUNK_ELEMENTS", 7 * 64)
    g = torch.Generator().manual_seed(3)
    query = torch.randn(50, 3, 2, 8, generator=g)
    keys = torch.randn(3, 2, 64, 8, generator=g)
    scores, indices = product_key_topk(query, keys, 6)
    ref_scores, ref_indices = brute_force_topk(query, keys, 6)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores)


@pytest.mark.parametrize(("n", "knn"), [(1024, 32), (256, 32), (64, 4), (40, 7), (36, 1), (40, 16), (30, 3)])
def test_blocked_topk_equals_topk(n: int, knn: int) -> None:
    """Both the blocked path (n/4 + 4·knn < n) and the fallback (n not a multiple of 4, too few
    blocks, nothing saved) give torch.topk's values and indices."""
    g = torch.Generator().manual_seed(n + knn)
    scores = torch.randn(3, 70, n, generator=g)
    values, indices = blocked_topk(scores, knn)
    ref_values, ref_indices = scores.topk(knn, dim=-1)
    assert torch.equal(values, ref_values)
    assert torch.equal(indices, ref_indices)
    if n % 4 == 0:  # the whole top knn packed into as few blocks (j, j + n/4, ...) as possible
        scores = torch.randn(5, 4, n // 4, generator=g)
        scores[:, :, : -(-knn // 4)] += 100.0
        scores = scores.view(5, n)
        assert torch.equal(blocked_topk(scores, knn)[1], scores.topk(knn, dim=-1).indices)


@pytest.mark.parametrize(("n_keys", "knn"), [(64, 4), (20, 16)])  # blocked top-k and plain top-k
def test_product_key_topk_gradients_match_brute_force(n_keys: int, knn: int) -> None:
    g = torch.Generator().manual_seed(0)
    query = torch.randn(30, 2, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 2, n_keys, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 2, knn, generator=g, dtype=torch.float64)
    scores, indices = product_key_topk(query, keys, knn)
    ref_scores, ref_indices = brute_force_topk(query, keys, knn)
    assert torch.equal(indices, ref_indices)
    grads = torch.autograd.grad((scores * weight).sum(), (query, keys))
    ref = torch.autograd.grad((ref_scores * weight).sum(), (query, keys))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)
    torch.autograd.gradcheck(lambda q, k: product_key_topk(q, k, min(knn, 5))[0], (query[:6], keys))
    # Only one input needing a gradient.
    (gk,) = torch.autograd.grad((product_key_topk(query.detach(), keys, knn)[0] * weight).sum(), (keys,))
    torch.testing.assert_close(gk, ref[1])


def _read_case(n: int = 12, k: int = 9, slots: int = 40, v: int = 5, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(n, k, generator=g, dtype=dtype).requires_grad_()
    indices = torch.randint(0, slots, (n, k), generator=g)
    table = torch.randn(slots, v, generator=g, dtype=dtype).requires_grad_()
    return weights, indices, table


def test_read_values_matches_dense_reference() -> None:
    weights, indices, table = _read_case()
    grad_out = torch.randn(12, 5, dtype=torch.float64)
    out = read_values(weights, indices, table)
    out.backward(grad_out)
    w_ref = weights.detach().clone().requires_grad_()
    t_ref = table.detach().clone().requires_grad_()
    ref = (w_ref[..., None] * t_ref[indices]).sum(1)  # dense: (N, K, v) then sum
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(weights.grad, w_ref.grad)
    assert table.grad.is_sparse
    torch.testing.assert_close(table.grad.to_dense(), t_ref.grad)


def test_read_values_gradcheck() -> None:
    """Central finite differences along random directions against the analytic gradients.
    (torch.autograd.gradcheck rejects a sparse gradient of a strided input.)"""
    weights, indices, table = _read_case(n=4, k=3, slots=10, v=3)
    g = torch.Generator().manual_seed(2)
    grad_out = torch.randn(4, 3, generator=g, dtype=torch.float64)
    gw, gt = torch.autograd.grad(read_values(weights, indices, table), (weights, table), grad_out)
    eps = 1e-6
    with torch.no_grad():
        for _ in range(5):
            dw = torch.randn(weights.shape, generator=g, dtype=torch.float64)
            dt = torch.randn(table.shape, generator=g, dtype=torch.float64)
            plus = (read_values(weights + eps * dw, indices, table + eps * dt) * grad_out).sum()
            minus = (read_values(weights - eps * dw, indices, table - eps * dt) * grad_out).sum()
            numeric = (plus - minus) / (2 * eps)
            analytic = (gw * dw).sum() + (gt.to_dense() * dt).sum()
            torch.testing.assert_close(numeric, analytic, rtol=1e-6, atol=1e-8)


def test_sparse_table_gradient_is_coalesced_and_holds_only_read_rows() -> None:
    weights, indices, table = _read_case(n=6, k=4, slots=500, v=7)
    (grad,) = torch.autograd.grad(read_values(weights, indices, table).sum(), (table,))
    assert grad.is_sparse and grad.is_coalesced()
    rows = grad._indices()[0]
    assert torch.equal(rows, indices.unique())  # sorted, unique, exactly the rows read
    assert grad._values().shape == (rows.numel(), 7)

    # In .grad too: autograd's accumulation drops the flag, ValueTable puts it back.
    values = ValueTable(500, 7, init="normal", dtype=torch.float64)
    read_values(weights, indices, values.weight).sum().backward()
    assert values.weight.grad.is_coalesced()
    assert torch.equal(values.weight.grad._indices()[0], rows)
    # Two reads summed (one table shared by two layers): concatenated rows, not marked coalesced,
    # and the values are still the sum.
    other = torch.randint(0, 500, (6, 4), generator=torch.Generator().manual_seed(5))
    read_values(weights, other, values.weight).sum().backward()
    grad = values.weight.grad
    assert grad.is_coalesced() == bool((grad._indices()[0].diff() > 0).all())
    (ref,) = torch.autograd.grad(
        (weights[..., None] * (values.weight[indices] + values.weight[other])).sum(), (values.weight,)
    )
    torch.testing.assert_close(grad.to_dense(), ref)


def test_empty_huge_is_a_plain_tensor() -> None:
    """Huge-page advice changes the page size only: shape, dtype, writes and reads as usual."""
    t = empty_huge((40 * 2**20 // 4 // 3, 3), torch.float32)  # above the madvise threshold
    assert t.shape == (40 * 2**20 // 4 // 3, 3) and t.dtype == torch.float32 and t.is_contiguous()
    t.fill_(2.0)
    assert float(t[-1, -1]) == 2.0 and float(t.sum()) == 2.0 * t.numel()
    small = empty_huge((4, 5), torch.float64)
    assert small.shape == (4, 5) and small.dtype == torch.float64
    values = ValueTable(10, 3, init="zeros", dtype=torch.bfloat16)
    assert values.weight.dtype == torch.bfloat16 and not values.weight.any()


@pytest.mark.parametrize("huge_pages", [True, False])
def test_table_gradient_with_many_repeated_reads(monkeypatch: pytest.MonkeyPatch, huge_pages: bool) -> None:
    """Rows read many times (small table), through both ways of writing the rows: first reads
    then repeats in chunks smaller than the rows (huge pages), or one segment-sum (without)."""
    monkeypatch.setattr("memtune.memory._GRAD_ROWS_CHUNK", 5)
    monkeypatch.setattr("memtune.memory.huge_pages_granted", lambda: huge_pages)
    weights, indices, table = _read_case(n=30, k=8, slots=17, v=6)
    grad_out = torch.randn(30, 6, dtype=torch.float64)
    (grad,) = torch.autograd.grad(read_values(weights, indices, table), (table,), grad_out)
    (ref,) = torch.autograd.grad((weights[..., None] * table[indices]).sum(1), (table,), grad_out)
    assert grad.is_sparse and grad.is_coalesced()
    torch.testing.assert_close(grad.to_dense(), ref)


def test_gathered_dots_sampled_and_chunked_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    _, indices, table = _read_case(n=20, k=6, slots=50, v=4)
    rows = torch.randn(20, 4, dtype=torch.float64)
    ref = (table.detach()[indices] * rows[:, None]).sum(-1)
    torch.testing.assert_close(_gathered_dots(table.detach(), indices, rows), ref)
    monkeypatch.setattr("memtune.memory._GRAD_CHUNK_ELEMENTS", 7 * 6 * 4)  # several chunks
    torch.testing.assert_close(_gathered_dots(table.detach().float(), indices, rows.float()), ref.float())
    torch.testing.assert_close(
        _gathered_dots(table.detach().bfloat16(), indices, rows.bfloat16()).double(), ref, atol=0.1, rtol=0.05
    )


def _layer(n_keys: int, dtype=torch.float64):
    torch.manual_seed(0)
    config = MemoryConfig(layers=[0], n_keys=n_keys, heads=2, knn=8, k_dim=16)
    return ProductKeyMemory(config, 24, dtype=dtype), ValueTable(n_keys**2, 24, init="normal", dtype=dtype)


def test_memory_layer_gradients_match_dense_reference() -> None:
    layer, table = _layer(12)
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    layer.record = True
    y = layer(x, table)
    assert layer.last_indices.shape == (2, 5, 16)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    table_grad = table.weight.grad.to_dense()
    x_grad = x.grad.clone()

    # Dense reference: the same lookup, values read by indexing (dense table gradient).
    for p in [*layer.parameters(), table.weight, x]:
        p.grad = None
    weights, indices = layer.lookup(x)
    ref = (weights[..., None] * table.weight[indices]).sum(1).view(2, 5, -1)
    ref = layer.out(ref * F.silu(layer.gate(x)))
    torch.testing.assert_close(y, ref)
    ref.square().sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    torch.testing.assert_close(table_grad, table.weight.grad)
    torch.testing.assert_close(x_grad, x.grad)


def test_backward_memory_does_not_grow_with_slots() -> None:
    """The table gradient holds at most N·K rows, whatever the slot count."""
    sizes = []
    for n_keys in (16, 64):
        layer, table = _layer(n_keys, torch.float32)
        x = torch.randn(1, 6, 24)
        layer(x, table).sum().backward()
        grad = table.weight.grad
        assert grad.is_sparse
        sizes.append(grad._values().numel())
        assert grad._values().shape[0] <= 6 * 16
    assert sizes[1] <= 6 * 16 * 24
