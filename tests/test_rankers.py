import math

import pytest
import torch

from memtune.errors import MemtuneError
from memtune.rankers import RANKERS, get_ranker, register_ranker, select_top


def test_tfidf_by_hand():
    # Three slots read 2, 1, 1 times (C = 4); background N = 9 batches, df = 0, 4, 9.
    counts, df = torch.tensor([2, 1, 1]), torch.tensor([0, 4, 9])
    scores = RANKERS["tfidf"](counts=counts, df=df, n_background=9)
    expected = [2 / 4 * math.log(10 / 1), 1 / 4 * math.log(10 / 5), 1 / 4 * math.log(10 / 10)]
    assert scores.tolist() == pytest.approx(expected)


def test_kl_by_hand():
    # 4 slots in the layer with df = 0, 1, 2, 0 -> Σ(df+1) = 7. The step read slots 0 and 2.
    counts, df = torch.tensor([3, 1]), torch.tensor([0, 2])
    scores = RANKERS["kl"](counts=counts, df=df, df_total=7.0)
    eps = 1e-10
    p, q = [0.75, 0.25], [1 / 7, 3 / 7]
    assert scores.tolist() == pytest.approx([pi * math.log((pi + eps) / (qi + eps)) for pi, qi in zip(p, q)])
    assert scores[0] > 0 > scores[1]  # read more than background predicts vs less


def test_count_and_random():
    counts = torch.tensor([5, 1, 3])
    assert RANKERS["count"](counts=counts).tolist() == [5, 1, 3]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    r1, r2 = RANKERS["random"](counts=counts, generator=g1), RANKERS["random"](counts=counts, generator=g2)
    assert torch.equal(r1, r2) and r1.shape == (3,)


def test_select_top_keeps_best_and_breaks_ties_by_slot():
    slots = torch.tensor([3, 7, 9, 12])
    scores = torch.tensor([0.5, 2.0, 0.5, 1.0], dtype=torch.float64)
    assert select_top(slots, scores, 2).tolist() == [7, 12]
    assert select_top(slots, scores, 3).tolist() == [3, 7, 12]
    assert select_top(slots, scores, 10).tolist() == [3, 7, 9, 12]


def test_bad_top_t_and_unknown_ranker():
    with pytest.raises(MemtuneError, match="top_t=0"):
        select_top(torch.tensor([1]), torch.tensor([1.0]), 0)
    with pytest.raises(MemtuneError, match="ranker='nope' is unknown"):
        get_ranker("nope")


def test_user_ranker_plugs_in():
    @register_ranker("inverse-count")
    def inverse(counts, **_):
        return -counts.double()

    try:
        assert get_ranker("inverse-count")(counts=torch.tensor([1, 2])).tolist() == [-1, -2]
    finally:
        RANKERS.pop("inverse-count")
