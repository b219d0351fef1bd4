"""The leaderboard as data: Bradley-Terry standings of active policies from human votes."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from rlhf.ranking import Comparison, leaderboard, win_rate_matrix
from storage import models, votes
from storage.db import Store


def _comparisons(store: Store) -> list[Comparison]:
    rows = votes.human_comparisons(store.db)
    return [Comparison(r["model_a"], r["model_b"], r["choice"]) for r in rows for _ in range(r["n"])]


def standings(store: Store) -> list[dict]:
    """One row per policy with a story pool or votes, best first, with names and lineage."""
    records = {m.id: m for m in models.list_models(store.db)}
    comparisons = _comparisons(store)
    rows = []
    for rank, standing in enumerate(leaderboard(comparisons, list(records)), start=1):
        record = records[standing.model_id]
        parent = records.get(record.parent_id)
        rows.append({"rank": rank, "policy": record.name, "kind": record.kind,
                     "parent": parent.name if parent else "", "active": record.active,
                     **asdict(standing)})
    return rows


def win_rates(store: Store) -> tuple[np.ndarray, list[str]]:
    """Win-rate matrix among active policies, and their names in matrix order."""
    active = models.list_models(store.db, active_only=True)
    matrix = win_rate_matrix(_comparisons(store), [m.id for m in active])
    return matrix, [m.name for m in active]
