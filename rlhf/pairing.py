"""Which two policies an annotator judges next.

The rule (documented in the README too): every pair of active policies with stories
gets a weight

    w(i, j) = closeness(i, j) * (1/sqrt(1 + n_ij) + 1/sqrt(1 + min(n_i, n_j))) * lineage(i, j)

where n_ij is the number of human votes on the pair, n_i a policy's total, closeness =
4 p (1 - p) with p the Laplace-smoothed win rate between the two (ties count half), so
close pairs and rarely compared policies are favoured, and lineage = 4 when one policy
is the other's parent and the child has fewer than PARENT_VOTES_TARGET votes against it
(a new checkpoint meets its parent first), else 1. Pairs are drawn without replacement
in proportion to their weights (Efraimidis-Spirakis keys), so every pair keeps a chance;
the first pair with a prompt the annotator has not seen for it wins. All reads are
indexed or trigger-maintained, so the cost does not grow with the votes table.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import defaultdict

PARENT_BOOST = 4.0
PARENT_VOTES_TARGET = 50


def pair_weights(
    policies: dict[int, int | None], stats: list[dict]
) -> dict[tuple[int, int], float]:
    """Weights for every unordered pair of `policies` (id -> parent id) from pair stats."""
    by_pair = {(s["model_lo"], s["model_hi"]): s for s in stats}
    totals: dict[int, int] = defaultdict(int)
    for s in stats:
        totals[s["model_lo"]] += s["votes"]
        totals[s["model_hi"]] += s["votes"]
    weights = {}
    for lo, hi in itertools.combinations(sorted(policies), 2):
        s = by_pair.get((lo, hi))
        votes = s["votes"] if s else 0
        decided = (s["lo_wins"] + s["hi_wins"] + s["ties"]) if s else 0
        lo_score = (s["lo_wins"] + 0.5 * s["ties"]) if s else 0.0
        p = (lo_score + 1.0) / (decided + 2.0)
        closeness = 4.0 * p * (1.0 - p)
        novelty = 1.0 / math.sqrt(1 + votes) + 1.0 / math.sqrt(1 + min(totals[lo], totals[hi]))
        related = policies[lo] == hi or policies[hi] == lo
        lineage = PARENT_BOOST if related and votes < PARENT_VOTES_TARGET else 1.0
        weights[(lo, hi)] = closeness * novelty * lineage
    return weights


def draw_order(weights: dict[tuple[int, int], float], rng: random.Random) -> list[tuple[int, int]]:
    """All pairs in a weighted random order (heavier pairs tend to come first)."""
    keyed = [(rng.random() ** (1.0 / w), pair) for pair, w in weights.items() if w > 0]
    return [pair for _, pair in sorted(keyed, reverse=True)]
