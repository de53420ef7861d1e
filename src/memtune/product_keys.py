"""Product-key top-k: the exact top-k over n_keys² slots at the cost of 2·n_keys scores.

Each query is cut in two halves; half h is scored against its own n_keys half-keys. The score
of slot (i1, i2) is s1[i1] + s2[i2], so the best knn slots all lie in the Cartesian product of
each half's best knn (Lample et al., 2019).
"""

from __future__ import annotations

import torch
from torch import Tensor


def product_key_topk(query: Tensor, keys: Tensor, knn: int) -> tuple[Tensor, Tensor]:
    """Top-knn slots for every query and head.

    query: (N, H, 2, h) — two half-queries per head.
    keys:  (H, 2, n_keys, h) — each head's two half-key tables.
    Returns scores (N, H, knn), sorted descending, and slot indices (N, H, knn) in
    [0, n_keys²), index = i1 * n_keys + i2.
    """
    n_keys = keys.shape[2]
    half_scores = torch.einsum("nhpd,hpkd->nhpk", query, keys)  # (N, H, 2, n_keys)
    top_s, top_i = half_scores.topk(knn, dim=-1)  # (N, H, 2, knn)
    pair = top_s[:, :, 0, :, None] + top_s[:, :, 1, None, :]  # (N, H, knn, knn)
    scores, flat = pair.flatten(-2).topk(knn, dim=-1)  # (N, H, knn)
    i1 = top_i[:, :, 0].gather(-1, flat // knn)
    i2 = top_i[:, :, 1].gather(-1, flat % knn)
    return scores, i1 * n_keys + i2


def brute_force_topk(query: Tensor, keys: Tensor, knn: int) -> tuple[Tensor, Tensor]:
    """Reference: score all n_keys² slots and take the top knn. Memory O(N·H·n_keys²)."""
    half_scores = torch.einsum("nhpd,hpkd->nhpk", query, keys)
    full = half_scores[:, :, 0, :, None] + half_scores[:, :, 1, None, :]  # (N, H, n_keys, n_keys)
    return full.flatten(-2).topk(knn, dim=-1)
