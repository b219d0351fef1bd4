"""Weak labels: the pool's unlabelled pairs, and the weak votes a label model stores on them.

Weak votes live in the votes table with source 'weak', no annotator and the label model's
confidence; the pair-statistics triggers and every leaderboard query count source 'human'
only, so they never reach the leaderboard. A new labelling replaces the previous one whole.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from sqlite_utils import Database

from storage.db import write_transaction

_HUMAN_VOTE_ON_PAIR = (
    "EXISTS (SELECT 1 FROM votes h WHERE h.source = 'human' AND h.prompt_id = {a}.prompt_id"
    " AND min(h.completion_a, h.completion_b) = {a}.id AND max(h.completion_a, h.completion_b) = {b}.id)"
)


def pool_pairs(db: Database) -> list[dict]:
    """Every pair of stories two policies wrote for the same prompt (A: the lower completion
    id), with its prompt and texts and whether people voted on it. The `external` writers of
    imported preference data are left out: their pairs already carry a label."""
    human = _HUMAN_VOTE_ON_PAIR.format(a="ca", b="cb")
    return [dict(r) for r in db.query(
        "SELECT ca.prompt_id, ca.id AS completion_a, cb.id AS completion_b,"
        " ca.model_id AS model_a, cb.model_id AS model_b,"
        f" p.text AS prompt, ca.text AS text_a, cb.text AS text_b, {human} AS human_voted"
        " FROM completions ca JOIN completions cb"
        "   ON cb.prompt_id = ca.prompt_id AND cb.id > ca.id AND cb.model_id != ca.model_id"
        " JOIN prompts p ON p.id = ca.prompt_id"
        " WHERE NOT EXISTS (SELECT 1 FROM models m WHERE m.id IN (ca.model_id, cb.model_id) AND m.kind = 'external')"
        " ORDER BY ca.id, cb.id"
    )]


def replace_weak_votes(db: Database, labels: Iterable[dict]) -> int:
    """Delete every weak vote and store these instead, in one transaction; returns the count.

    Each label names a pool pair (prompt_id, completion_a/b, model_a/b), a choice ('a' or
    'b') and the label model's confidence in it.
    """
    now = time.time()
    rows = [
        {"prompt_id": x["prompt_id"], "completion_a": x["completion_a"], "completion_b": x["completion_b"],
         "model_a": x["model_a"], "model_b": x["model_b"], "annotator_id": None, "choice": x["choice"],
         "rationale": "", "shown_at": None, "voted_at": now, "source": "weak",
         "confidence": float(x["confidence"]), "client_key": f"weak:{x['completion_a']}:{x['completion_b']}"}
        for x in labels
    ]
    with write_transaction(db):
        db.execute("DELETE FROM votes WHERE source = 'weak'")
        if rows:
            db["votes"].insert_all(rows)
    return len(rows)


def weak_votes_clear_of_humans(db: Database, min_confidence: float) -> set[int]:
    """Ids of weak votes at or above a confidence on pairs people have not voted on (since
    the labelling, too): a pair people judged is theirs alone, in training and evaluation."""
    human = _HUMAN_VOTE_ON_PAIR.format(a="ca", b="cb")
    return {r[0] for r in db.execute(
        "SELECT w.id FROM votes w"
        " JOIN completions ca ON ca.id = min(w.completion_a, w.completion_b)"
        " JOIN completions cb ON cb.id = max(w.completion_a, w.completion_b)"
        f" WHERE w.source = 'weak' AND w.confidence >= ? AND NOT {human}",
        [min_confidence],
    ).fetchall()}
