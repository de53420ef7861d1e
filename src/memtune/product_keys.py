"""Product-key top-k: the exact top-k over n_keys² slots at the cost of 2·n_keys scores.

Each query is cut in two halves; half h is scored against its own n_keys half-keys. The score
of slot (i1, i2) is s1[i1] + s2[i2], so the best knn slots all lie in the Cartesian product of
each half's best knn (Lample et al., 2019).

Four facts make the lookup cheap on CPU:
- the half scores are matmuls (N, h) @ (h, n_keys), one per head and half, in row blocks of
  ~4 MiB that the top-k reads back from cache; the top-k runs over the contiguous last dimension;
- ATen's CPU top-k costs ~9 ns per element scanned, so each half's top knn is taken from the
  knn blocks of 4 with the highest maxima, found the same way (for n_keys = 1024 and knn = 32,
  64 + 128 + 128 elements scanned instead of 1024);
- only the knn kept half scores of each half query get a gradient, so backward gathers and
  segment-sums knn key rows per half query instead of two dense matmuls over all n_keys;
- both halves' top lists are sorted, so the pair of ranks (a, b) has at least (a+1)(b+1)
  pairs scoring at least as high. Only pairs with (a+1)(b+1) <= knn can be in the top knn:
  119 candidates instead of knn² = 1024 for knn = 32, and the result is still exact.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


@lru_cache(maxsize=16)
def _candidate_ranks(knn: int) -> tuple[Tensor, Tensor]:
    """Rank pairs (a, b) with (a+1)(b+1) <= knn: the only pairs that can reach the top knn."""
    a, b = zip(*[(i, j) for i in range(knn) for j in range(knn // (i + 1))])
    return torch.tensor(a), torch.tensor(b)


_BLOCK = 4
_SCORE_CHUNK_ELEMENTS = 2**20


def blocked_topk(scores: Tensor, knn: int, sorted: bool = True) -> tuple[Tensor, Tensor]:
    """scores.topk(knn, dim=-1, sorted=sorted), scanning fewer elements.

    Block j holds the elements j, j + w, j + 2w, j + 3w (w = n / 4). Every top-knn element lies in
    one of the knn blocks with the highest maxima: a block outside them has knn blocks whose
    maxima — knn distinct elements — are at least its own maximum. So a top-k over the w block
    maxima (itself blocked, while that saves anything) and one over the 4·knn elements of the
    chosen blocks give the exact result.
    """
    n = scores.shape[-1]
    w = n // _BLOCK
    if n % _BLOCK or w < knn or w + _BLOCK * knn >= n:
        return scores.topk(knn, dim=-1, sorted=sorted)
    lead = scores.shape[:-1]
    maxima = scores.view(*lead, _BLOCK, w).amax(-2)  # (..., w)
    blocks = blocked_topk(maxima, knn, sorted=False)[1]  # (..., knn)
    offsets = torch.arange(0, n, w, device=scores.device)
    cand = (blocks[..., None] + offsets).view(*lead, knn * _BLOCK)  # (..., 4·knn) positions
    top_s, j = scores.gather(-1, cand).topk(knn, dim=-1, sorted=sorted)
    return top_s, cand.gather(-1, j)


class _HalfTopK(torch.autograd.Function):
    """The knn best half scores of every half query against its own half keys.

    q: (P, N, h), keys: (P, n_keys, h) -> scores (P, N, knn) sorted descending, indices (P, N, knn).
    Backward touches only the kept (query, key) pairs: the gradient of score = <q[p, n], keys[p, i]>
    is keys[p, i] for the query and q[p, n] for the key.
    """

    @staticmethod
    def forward(ctx, q: Tensor, keys: Tensor, knn: int) -> tuple[Tensor, Tensor]:
        p, n, _ = q.shape
        n_keys = keys.shape[1]
        top_s = q.new_empty(p, n, knn)
        top_i = torch.empty(p, n, knn, dtype=torch.long, device=q.device)
        # Scores are made and consumed in blocks of ~4 MiB: the top-k then reads them from cache,
        # and no large buffer is page-faulted afresh each step.
        rows = max(1, min(n, _SCORE_CHUNK_ELEMENTS // n_keys))
        buf = q.new_empty(rows, n_keys)
        for i in range(p):
            for s in range(0, n, rows):
                e = min(n, s + rows)
                scores = torch.mm(q[i, s:e], keys[i].T, out=buf[: e - s])  # (rows, n_keys)
                top_s[i, s:e], top_i[i, s:e] = blocked_topk(scores, knn)
        ctx.mark_non_differentiable(top_i)
        ctx.save_for_backward(q, keys, top_i)
        return top_s, top_i

    @staticmethod
    def backward(ctx, grad_s: Tensor, _grad_i: Tensor | None):
        q, keys, top_i = ctx.saved_tensors
        p, n, h = q.shape
        n_keys, knn = keys.shape[1], top_i.shape[-1]
        rows = (top_i + torch.arange(p, device=q.device)[:, None, None] * n_keys).view(p * n, knn)
        grad_s = grad_s.contiguous().view(p * n, knn).to(q.dtype)
        grad_q = grad_k = None
        if ctx.needs_input_grad[0]:  # grad_q[p, n] = Σ_j grad_s[p, n, j] · keys[p, top_i[p, n, j]]
            grad_q = F.embedding_bag(rows, keys.reshape(p * n_keys, h), per_sample_weights=grad_s, mode="sum")
            grad_q = grad_q.view(p, n, h)
        if ctx.needs_input_grad[1]:  # segment-sum of grad_s · q over the queries that kept each key
            # Two thirds of the kept half scores reach no selected pair: their gradient is 0.
            live = grad_s.reshape(-1).nonzero().squeeze(1)
            sorted_rows, order = rows.reshape(-1)[live].sort()
            order = live[order]
            unique, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
            sums = F.embedding_bag(
                order // knn, q.reshape(p * n, h), offsets=counts.cumsum(0) - counts,
                per_sample_weights=grad_s.reshape(-1)[order], mode="sum",
            )  # (U, h)
            grad_k = q.new_zeros(p * n_keys, h).index_copy_(0, unique, sums).view(p, n_keys, h)
        return grad_q, grad_k, None


def product_key_topk(query: Tensor, keys: Tensor, knn: int) -> tuple[Tensor, Tensor]:
    """Top-knn slots for every query and head.

    query: (N, H, 2, h) — two half-queries per head.
    keys:  (H, 2, n_keys, h) — each head's two half-key tables.
    Returns scores (N, H, knn), sorted descending, and slot indices (N, H, knn) in
    [0, n_keys²), index = i1 * n_keys + i2.
    """
    n, heads, _, h = query.shape
    n_keys = keys.shape[2]
    q = query.reshape(n, heads * 2, h).transpose(0, 1).contiguous()  # (H·2, N, h)
    k = keys.reshape(heads * 2, n_keys, h)  # (H·2, n_keys, h)
    top_s, top_i = _HalfTopK.apply(q, k, knn)  # (H·2, N, knn), sorted descending
    top_s = top_s.view(heads, 2, n, knn)
    top_i = top_i.view(heads, 2, n, knn)
    ra, rb = _candidate_ranks(knn)
    ra, rb = ra.to(query.device), rb.to(query.device)
    pair = top_s[:, 0].index_select(-1, ra) + top_s[:, 1].index_select(-1, rb)  # (H, N, C)
    scores, best = pair.topk(knn, dim=-1)  # (H, N, knn)
    i1 = top_i[:, 0].gather(-1, ra[best])
    i2 = top_i[:, 1].gather(-1, rb[best])
    indices = i1 * n_keys + i2  # (H, N, knn)
    return scores.transpose(0, 1).contiguous(), indices.transpose(0, 1).contiguous()


def brute_force_topk(query: Tensor, keys: Tensor, knn: int) -> tuple[Tensor, Tensor]:
    """Reference: score all n_keys² slots and take the top knn. Memory O(N·H·n_keys²)."""
    half_scores = torch.einsum("nhpd,hpkd->nhpk", query, keys)
    full = half_scores[:, :, 0, :, None] + half_scores[:, :, 1, None, :]  # (N, H, n_keys, n_keys)
    return full.flatten(-2).topk(knn, dim=-1)
