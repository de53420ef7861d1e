"""Product-key top-k: the exact top-k over n_keys² slots at the cost of 2·n_keys scores.

Each query is cut in two halves; half h is scored against its own n_keys half-keys. The score
of slot (i1, i2) is s1[i1] + s2[i2], so the best knn slots all lie in the Cartesian product of
each half's best knn (Lample et al., 2019).

Two facts make the lookup cheap on CPU:
- the half scores of all heads are one batched matmul, (H·2, N, h) @ (H·2, h, n_keys), laid out
  so that the top-k runs over the contiguous last dimension;
- both halves' top lists are sorted, so the pair of ranks (a, b) has at least (a+1)(b+1)
  pairs scoring at least as high. Only pairs with (a+1)(b+1) <= knn can be in the top knn:
  119 candidates instead of knn² = 1024 for knn = 32, and the result is still exact.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=16)
def _candidate_ranks(knn: int) -> tuple[Tensor, Tensor]:
    """Rank pairs (a, b) with (a+1)(b+1) <= knn: the only pairs that can reach the top knn."""
    a, b = zip(*[(i, j) for i in range(knn) for j in range(knn // (i + 1))])
    return torch.tensor(a), torch.tensor(b)


def product_key_topk(query: Tensor, keys: Tensor, knn: int) -> tuple[Tensor, Tensor]:
    """Top-knn slots for every query and head.

    query: (N, H, 2, h) — two half-queries per head.
    keys:  (H, 2, n_keys, h) — each head's two half-key tables.
    Returns scores (N, H, knn), sorted descending, and slot indices (N, H, knn) in
    [0, n_keys²), index = i1 * n_keys + i2.
    """
    n, heads, _, h = query.shape
    n_keys = keys.shape[2]
    q = query.reshape(n, heads * 2, h).transpose(0, 1)  # (H·2, N, h)
    k = keys.reshape(heads * 2, n_keys, h)  # (H·2, n_keys, h)
    half_scores = torch.bmm(q, k.transpose(1, 2))  # (H·2, N, n_keys)
    top_s, top_i = half_scores.topk(knn, dim=-1)  # (H·2, N, knn), sorted descending
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
