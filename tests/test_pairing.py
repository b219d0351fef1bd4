"""rlhf/pairing.py: which two policies an annotator judges next."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from rlhf.pairing import PARENT_VOTES_TARGET, draw_order, pair_weights


def stat(lo: int, hi: int, lo_wins: int, hi_wins: int, ties: int = 0, both_bad: int = 0) -> dict:
    return {"model_lo": lo, "model_hi": hi, "votes": lo_wins + hi_wins + ties + both_bad,
            "lo_wins": lo_wins, "hi_wins": hi_wins, "ties": ties, "both_bad": both_bad}


def test_every_unordered_pair_gets_a_positive_weight():
    weights = pair_weights({3: None, 1: None, 2: None}, [])
    assert set(weights) == {(1, 2), (1, 3), (2, 3)}
    assert all(w > 0 for w in weights.values())
    # Nothing known about any pair: all equal.
    assert len(set(weights.values())) == 1
    assert pair_weights({1: None}, []) == {}


def test_close_pairs_beat_lopsided_ones():
    # Same number of votes everywhere; only the balance of wins differs.
    stats = [stat(1, 2, 10, 10), stat(3, 4, 19, 1)]
    w = pair_weights({1: None, 2: None, 3: None, 4: None}, stats)
    assert w[(1, 2)] > w[(3, 4)]
    # Ties count as half a win each side, so a tie-heavy pair is close too.
    w = pair_weights({1: None, 2: None, 3: None, 4: None}, [stat(1, 2, 2, 2, ties=16), stat(3, 4, 18, 2)])
    assert w[(1, 2)] > w[(3, 4)]


def test_lopsided_in_either_direction_is_equally_uninformative():
    w = pair_weights({1: None, 2: None, 3: None, 4: None}, [stat(1, 2, 19, 1), stat(3, 4, 1, 19)])
    assert w[(1, 2)] == pytest.approx(w[(3, 4)])


def test_few_vote_pairs_beat_well_sampled_ones():
    # Both pairs perfectly balanced; one has 2 votes, the other 40.
    stats = [stat(1, 2, 1, 1), stat(3, 4, 20, 20)]
    w = pair_weights({1: None, 2: None, 3: None, 4: None}, stats)
    assert w[(1, 2)] > w[(3, 4)]
    # A never-compared pair beats a compared one.
    w = pair_weights({1: None, 2: None, 3: None}, [stat(1, 2, 5, 5)])
    assert w[(1, 3)] > w[(1, 2)] and w[(2, 3)] > w[(1, 2)]


def test_weights_shrink_as_a_pair_collects_votes():
    policies = {1: None, 2: None}
    series = [pair_weights(policies, [stat(1, 2, n, n)])[(1, 2)] for n in (0, 1, 5, 25, 100)]
    assert series == sorted(series, reverse=True) and len(set(series)) == len(series)


def test_parent_child_pair_boosted_until_vote_target():
    # 2 is a child of 1; 3 and 4 are unrelated. Identical stats on (1, 2) and (3, 4).
    policies = {1: None, 2: 1, 3: None, 4: None}
    below = PARENT_VOTES_TARGET // 2
    w = pair_weights(policies, [stat(1, 2, below // 2, below - below // 2),
                                stat(3, 4, below // 2, below - below // 2)])
    assert w[(1, 2)] > w[(3, 4)]
    # No votes at all: the new checkpoint meets its parent first.
    w = pair_weights(policies, [])
    assert w[(1, 2)] == max(w.values()) and w[(1, 2)] > w[(1, 3)]
    # The parent may be the higher id too (lineage is about the relation, not the order).
    w = pair_weights({5: 9, 9: None, 7: None}, [])
    assert w[(5, 9)] > w[(5, 7)]
    # Once the child has enough votes against its parent, the boost ends.
    at = PARENT_VOTES_TARGET
    w = pair_weights(policies, [stat(1, 2, at // 2, at - at // 2), stat(3, 4, at // 2, at - at // 2)])
    assert w[(1, 2)] == pytest.approx(w[(3, 4)])


def test_draw_order_lists_each_positive_pair_once():
    weights = {(1, 2): 3.0, (1, 3): 0.5, (2, 3): 1.0, (3, 4): 0.0}
    for seed in range(20):
        order = draw_order(weights, random.Random(seed))
        assert sorted(order) == [(1, 2), (1, 3), (2, 3)]
    assert draw_order({}, random.Random(0)) == []


def test_draw_order_is_reproducible_with_a_seed():
    weights = {(i, j): float(i + j) for i in range(1, 6) for j in range(i + 1, 6)}
    assert draw_order(weights, random.Random(7)) == draw_order(weights, random.Random(7))


def test_heavier_pairs_tend_to_come_first():
    rng = random.Random(1234)
    weights = {(1, 2): 4.0, (3, 4): 1.0}
    n = 4000
    firsts = Counter(draw_order(weights, rng)[0] for _ in range(n))
    assert firsts[(1, 2)] > firsts[(3, 4)] > 0  # the light pair keeps a chance
    # Drawn in proportion to weight: P(first) = 4 / (4 + 1).
    assert firsts[(1, 2)] / n == pytest.approx(0.8, abs=0.03)


def test_first_draw_frequencies_are_proportional_to_weights():
    rng = random.Random(99)
    weights = {(1, 2): 1.0, (1, 3): 2.0, (2, 3): 5.0}
    n = 6000
    firsts = Counter(draw_order(weights, rng)[0] for _ in range(n))
    total = sum(weights.values())
    for pair, w in weights.items():
        assert firsts[pair] / n == pytest.approx(w / total, abs=0.03)
