"""Automatic metric values: per story (story_metrics) and per policy (policy_metrics).

Per-story values make per-policy means and intervals one aggregate query, and adding
stories to a pool only adds rows: nothing already measured is measured again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from sqlite_utils import Database

from storage.codec import dumps, loads


def stories_without_metrics(db: Database, model_id: int | None = None) -> list[dict]:
    """Stories (id, prompt, text, truncated) with no metric value yet, optionally of one policy."""
    sql = (
        "SELECT c.id, p.text AS prompt, c.text, c.truncated FROM completions c JOIN prompts p ON p.id = c.prompt_id"
        " WHERE NOT EXISTS (SELECT 1 FROM story_metrics s WHERE s.completion_id = c.id)"
    )
    params: list = []
    if model_id is not None:
        sql += " AND c.model_id = ?"
        params.append(model_id)
    return [dict(r) for r in db.query(sql + " ORDER BY c.id", params)]


def save_story_metrics(db: Database, values: Mapping[int, Mapping[str, float]]) -> int:
    """Store {completion id: {metric: value}}; returns how many values were written."""
    rows = [{"completion_id": int(cid), "metric": metric, "value": float(value)}
            for cid, metrics in values.items() for metric, value in metrics.items()]
    if rows:
        db["story_metrics"].upsert_all(rows, pk=("completion_id", "metric"))
    return len(rows)


def story_metric_values(db: Database, completion_ids: Iterable[int]) -> dict[int, dict[str, float]]:
    """{completion id: {metric: value}} for the given stories."""
    ids = sorted({int(i) for i in completion_ids})
    result: dict[int, dict[str, float]] = {}
    for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
        chunk = ids[start:start + 500]
        for cid, metric, value in db.execute(
            f"SELECT completion_id, metric, value FROM story_metrics"
            f" WHERE completion_id IN ({', '.join('?' for _ in chunk)})",
            chunk,
        ).fetchall():
            result.setdefault(cid, {})[metric] = value
    return result


def policy_story_metric_stats(db: Database) -> list[dict]:
    """Per (policy, metric): count, mean and mean square of its stories' values."""
    return [dict(r) for r in db.query(
        "SELECT c.model_id, s.metric, count(*) AS n, avg(s.value) AS mean, avg(s.value * s.value) AS mean_square"
        " FROM story_metrics s JOIN completions c ON c.id = s.completion_id GROUP BY c.model_id, s.metric"
    )]


def policy_reward_stats(db: Database) -> list[dict]:
    """Per (policy, reward model): count, mean and mean square of the reward scores of its stories."""
    return [dict(r) for r in db.query(
        "SELECT c.model_id, s.reward_model_id, m.name AS reward_model, count(*) AS n, avg(s.score) AS mean,"
        " avg(s.score * s.score) AS mean_square"
        " FROM reward_scores s JOIN completions c ON c.id = s.completion_id"
        " JOIN models m ON m.id = s.reward_model_id GROUP BY c.model_id, s.reward_model_id"
    )]


def save_policy_metric(db: Database, model_id: int, metric: str, value: float, detail: dict | None = None) -> None:
    db["policy_metrics"].upsert(
        {"model_id": model_id, "metric": metric, "value": float(value), "detail": dumps(detail),
         "computed_at": time.time()},
        pk=("model_id", "metric"),
    )


def policy_metrics(db: Database, metric: str | None = None) -> list[dict]:
    """Whole-policy metrics (model id, metric, value, decoded detail)."""
    sql, params = "SELECT model_id, metric, value, detail FROM policy_metrics", []
    if metric is not None:
        sql, params = sql + " WHERE metric = ?", [metric]
    return [{**dict(r), "detail": loads(r["detail"])} for r in db.query(sql + " ORDER BY model_id", params)]
