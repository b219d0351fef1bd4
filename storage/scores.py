"""Reward-model scores of pool stories, and how well they agree with human votes.

A reward model scores every story in the pool once (table reward_scores). When a vote
comes in, the newest reward model that scored both stories predicts P(A better) =
sigmoid(score_a - score_b); the vote row keeps that prediction (votes.predicted,
votes.predicted_by), so agreement with humans is measured on votes the model never saw.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

from sqlite_utils import Database


def save_scores(
    db: Database, reward_model_id: int, scores: Mapping[int, float] | Iterable[tuple[int, float]],
) -> int:
    """Store (completion id -> score) for one reward model; a rescored story is overwritten."""
    items = scores.items() if isinstance(scores, Mapping) else scores
    now = time.time()
    rows = [
        {"completion_id": int(cid), "reward_model_id": reward_model_id, "score": float(score), "created_at": now}
        for cid, score in items
    ]
    if rows:
        db["reward_scores"].upsert_all(rows, pk=("completion_id", "reward_model_id"))
    return len(rows)


def scores_for(db: Database, reward_model_id: int, completion_ids: Iterable[int] | None = None) -> dict[int, float]:
    """One reward model's scores, by completion id (all of them, or just the given ids)."""
    sql = "SELECT completion_id, score FROM reward_scores WHERE reward_model_id = ?"
    params: list = [reward_model_id]
    if completion_ids is not None:
        ids = sorted({int(i) for i in completion_ids})
        if not ids:
            return {}
        sql += f" AND completion_id IN ({', '.join('?' for _ in ids)})"
        params += ids
    return {row[0]: row[1] for row in db.execute(sql, params).fetchall()}


def unscored_completions(db: Database, reward_model_id: int, model_id: int | None = None) -> list[dict]:
    """Stories (id, prompt, text) this reward model has not scored yet, optionally of one policy."""
    sql = (
        "SELECT c.id, p.text AS prompt, c.text FROM completions c JOIN prompts p ON p.id = c.prompt_id"
        " WHERE NOT EXISTS (SELECT 1 FROM reward_scores s"
        "   WHERE s.completion_id = c.id AND s.reward_model_id = ?)"
    )
    params: list = [reward_model_id]
    if model_id is not None:
        sql += " AND c.model_id = ?"
        params.append(model_id)
    return [dict(r) for r in db.query(sql + " ORDER BY c.id", params)]


def newest_reward_model_id(db: Database) -> int | None:
    """The most recently added reward model, or None."""
    row = db.execute("SELECT max(id) FROM models WHERE kind = 'reward'").fetchone()
    return row[0] if row else None


def vote_completions(db: Database, vote_ids: Iterable[int]) -> dict[int, tuple[int, int, str]]:
    """(completion_a, completion_b, choice) of each vote id."""
    ids = sorted({int(i) for i in vote_ids})
    result: dict[int, tuple[int, int, str]] = {}
    for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
        chunk = ids[start:start + 500]
        rows = db.execute(
            f"SELECT id, completion_a, completion_b, choice FROM votes WHERE id IN ({', '.join('?' for _ in chunk)})",
            chunk,
        ).fetchall()
        result.update({r[0]: (r[1], r[2], r[3]) for r in rows})
    return result


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def score_pair(db: Database, completion_a: int, completion_b: int) -> tuple[float, int] | None:
    """(P(A better), reward model id) from the newest reward model that scored both, or None."""
    row = db.execute(
        "SELECT a.reward_model_id, a.score, b.score FROM reward_scores a"
        " JOIN reward_scores b ON b.reward_model_id = a.reward_model_id AND b.completion_id = ?"
        " WHERE a.completion_id = ? ORDER BY a.reward_model_id DESC LIMIT 1",
        [completion_b, completion_a],
    ).fetchone()
    if row is None:
        return None
    reward_model_id, score_a, score_b = row
    return _sigmoid(score_a - score_b), reward_model_id


def agreement(db: Database, sources: tuple[str, ...] = ("human",)) -> dict:
    """How often the stored predictions picked the side people picked.

    Counts votes, votes with a prediction, decided (A or B) votes with a prediction and
    those where the predicted side (P(A better) above or below 0.5) matched; `agreement`
    is their share (None before any). `by_model` breaks it down per reward model.
    """
    marks = ", ".join("?" for _ in sources)
    matched = "((v.choice = 'a' AND v.predicted > 0.5) OR (v.choice = 'b' AND v.predicted < 0.5))"
    decided = "(v.predicted IS NOT NULL AND v.choice IN ('a', 'b'))"
    total = db.execute(
        f"SELECT count(*), count(v.predicted), coalesce(sum({decided}), 0),"
        f" coalesce(sum({decided} AND {matched}), 0)"
        f" FROM votes v WHERE v.source IN ({marks})",
        list(sources),
    ).fetchone()
    by_model = [
        {"reward_model_id": r[0], "reward_model": r[1], "decided": r[2], "agreed": r[3],
         "agreement": r[3] / r[2] if r[2] else None}
        for r in db.execute(
            f"SELECT v.predicted_by, m.name, count(*), coalesce(sum({matched}), 0)"
            f" FROM votes v LEFT JOIN models m ON m.id = v.predicted_by"
            f" WHERE v.source IN ({marks}) AND {decided}"
            " GROUP BY v.predicted_by ORDER BY v.predicted_by",
            list(sources),
        ).fetchall()
    ]
    votes, predicted, decided_n, agreed = total
    return {
        "votes": votes, "predicted": predicted, "decided": decided_n, "agreed": agreed,
        "agreement": agreed / decided_n if decided_n else None, "by_model": by_model,
    }
