"""Slot rankers: which of the slots a step read should be updated.

A ranker is a pure function of the step's read counts and the background statistics:
`ranker(counts, df, n_background, generator) -> scores`, all over the U slots read in the step.
Register your own with `@register_ranker("name")`; `memtune learn --ranker name` then finds it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from memtune.errors import MemtuneError

# (counts (U,), df (U,) of the same slots or None, background batches N, df total Σ_j(df_j+1), generator) -> (U,)
Ranker = Callable[..., Tensor]
RANKERS: dict[str, Ranker] = {}
# Rankers that need background statistics.
NEEDS_BACKGROUND: set[str] = set()
KL_EPS = 1e-10


def register_ranker(name: str, needs_background: bool = False) -> Callable[[Ranker], Ranker]:
    def wrap(fn: Ranker) -> Ranker:
        RANKERS[name] = fn
        if needs_background:
            NEEDS_BACKGROUND.add(name)
        return fn

    return wrap


def get_ranker(name: str) -> Ranker:
    if name not in RANKERS:
        raise MemtuneError(f"ranker={name!r} is unknown: expected one of {', '.join(sorted(RANKERS))}")
    return RANKERS[name]


@register_ranker("tfidf", needs_background=True)
def tfidf(counts: Tensor, df: Tensor, n_background: int, **_) -> Tensor:
    """s(i) = c(i)/C · log((N+1)/(df(i)+1))."""
    c = counts.double()
    return c / c.sum() * torch.log((n_background + 1) / (df.double() + 1))


@register_ranker("kl", needs_background=True)
def kl(counts: Tensor, df: Tensor, df_total: float, **_) -> Tensor:
    """p(i) = c(i)/C, p_bg(i) = (df(i)+1)/Σ_j(df(j)+1), s(i) = p(i) · log((p(i)+ε)/(p_bg(i)+ε))."""
    p = counts.double() / counts.sum()
    p_bg = (df.double() + 1) / df_total
    return p * torch.log((p + KL_EPS) / (p_bg + KL_EPS))


@register_ranker("count")
def count(counts: Tensor, **_) -> Tensor:
    """The raw number of reads."""
    return counts.double()


@register_ranker("random")
def random(counts: Tensor, generator: torch.Generator | None = None, **_) -> Tensor:
    """A uniformly random order of the slots read."""
    return torch.rand(counts.shape, generator=generator, dtype=torch.float64)


def select_top(slots: Tensor, scores: Tensor, top_t: int) -> Tensor:
    """The (at most) top_t slots by score, as a sorted index tensor. Ties break by slot index."""
    if top_t <= 0:
        raise MemtuneError(f"top_t={top_t} is invalid: expected a positive integer")
    if slots.numel() <= top_t:
        return slots.sort().values
    # Stable sort by descending score keeps ties in slot order (slots arrive sorted).
    order = torch.sort(scores, descending=True, stable=True).indices[:top_t]
    return slots[order].sort().values
