"""Rubric ratings: an annotator's optional 1-5 scores of the two stories of a pair they voted on."""

from __future__ import annotations

import time
from collections.abc import Mapping

from sqlite_utils import Database

from storage.votes import not_excluded

CRITERIA = ("coherence", "prompt_adherence", "engagement")
LOWEST, HIGHEST = 1, 5


def own_vote(db: Database, vote_id: int, annotator_id: int) -> dict | None:
    """The annotator's own vote with this id (its two stories and policies), or None.

    Any source: a gold pair must offer the rubric like every other pair, or it would show.
    """
    row = db.execute(
        "SELECT id, completion_a, completion_b, model_a, model_b FROM votes WHERE id = ? AND annotator_id = ?",
        [vote_id, annotator_id],
    ).fetchone()
    if row is None:
        return None
    return dict(zip(("id", "completion_a", "completion_b", "model_a", "model_b"), row))


def save_ratings(
    db: Database, annotator_id: int, vote_id: int, ratings: Mapping[int, Mapping[str, int]],
) -> int:
    """Store {completion id: {criterion: 1-5}}; a story rated again keeps the newest rating."""
    now = time.time()
    rows = []
    for completion_id, scores in ratings.items():
        for criterion, rating in scores.items():
            if criterion not in CRITERIA:
                raise ValueError(f"Unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}.")
            if isinstance(rating, bool) or not isinstance(rating, int) or not LOWEST <= rating <= HIGHEST:
                raise ValueError(f"{criterion} must be a whole number from {LOWEST} to {HIGHEST}, got {rating!r}.")
            rows.append({"completion_id": completion_id, "annotator_id": annotator_id, "criterion": criterion,
                         "rating": rating, "vote_id": vote_id, "created_at": now})
    if rows:
        db["ratings"].upsert_all(rows, pk=("completion_id", "annotator_id", "criterion"))
    return len(rows)


def ratings_by(db: Database, annotator_id: int) -> list[dict]:
    """One annotator's ratings, oldest story first."""
    return [dict(r) for r in db.query(
        "SELECT completion_id, criterion, rating, vote_id FROM ratings WHERE annotator_id = ?"
        " ORDER BY completion_id, criterion",
        [annotator_id],
    )]


def policy_rating_stats(db: Database) -> list[dict]:
    """Per (policy, criterion): count, mean and mean square of the ratings of its stories."""
    return [dict(r) for r in db.query(
        "SELECT c.model_id, r.criterion AS metric, count(*) AS n, avg(r.rating) AS mean,"
        " avg(r.rating * r.rating) AS mean_square"
        " FROM ratings r JOIN completions c ON c.id = r.completion_id"
        f" WHERE {not_excluded('r')} GROUP BY c.model_id, r.criterion"
    )]


def story_ratings(db: Database) -> list[dict]:
    """Per (story, criterion): the mean rating and how many people gave one."""
    return [dict(r) for r in db.query(
        "SELECT completion_id, criterion, avg(rating) AS mean, count(*) AS n FROM ratings r"
        f" WHERE {not_excluded('r')} GROUP BY completion_id, criterion ORDER BY completion_id"
    )]
