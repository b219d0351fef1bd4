"""Gold pairs, the votes quality is measured on, and excluded annotators."""

from __future__ import annotations

import time

from sqlite_utils import Database

from storage.db import write_transaction


def add_gold_pair(db: Database, better: int, worse: int, created_by: int | None = None) -> int:
    """Store a gold pair (two stories of one prompt, `better` the known answer); returns its id."""
    if better == worse:
        raise ValueError("A gold pair needs two different stories.")
    rows = {r["id"]: r["prompt_id"] for r in db.query(
        "SELECT id, prompt_id FROM completions WHERE id IN (?, ?)", [better, worse])}
    for story in (better, worse):
        if story not in rows:
            raise LookupError(f"No story with id {story}.")
    if rows[better] != rows[worse]:
        raise ValueError("The two stories of a gold pair must answer the same prompt.")
    lo, hi = sorted((better, worse))
    with write_transaction(db):
        existing = db.execute(
            "SELECT id FROM gold_pairs WHERE completion_lo = ? AND completion_hi = ?", [lo, hi]
        ).fetchone()
        if existing:
            raise ValueError(f"These two stories are already gold pair {existing[0]}.")
        return db["gold_pairs"].insert({
            "completion_lo": lo, "completion_hi": hi, "better": better,
            "created_by": created_by, "created_at": time.time(),
        }).last_pk


# SQL: vote v (on gold pair g) picked the story known to be better.
PICKED_BETTER = "((v.choice = 'a' AND v.completion_a = g.better) OR (v.choice = 'b' AND v.completion_b = g.better))"


def list_gold_pairs(db: Database) -> list[dict]:
    """Every gold pair with its prompt, both policies, and how its votes went."""
    return list(db.query(
        "SELECT g.id, g.completion_lo, g.completion_hi, g.better, c.prompt_id, p.text AS prompt,"
        " mb.name AS better_policy, mw.name AS worse_policy,"
        " (SELECT count(*) FROM votes v WHERE v.gold_id = g.id) AS votes,"
        " (SELECT count(*) FROM votes v WHERE v.gold_id = g.id AND"
        f"   {PICKED_BETTER}) AS correct"
        " FROM gold_pairs g JOIN completions c ON c.id = g.better JOIN prompts p ON p.id = c.prompt_id"
        " JOIN models mb ON mb.id = c.model_id"
        " JOIN completions cw ON cw.id ="
        " (CASE WHEN g.better = g.completion_lo THEN g.completion_hi ELSE g.completion_lo END)"
        " JOIN models mw ON mw.id = cw.model_id"
        " ORDER BY g.id"
    ))


def unseen_gold_pair(db: Database, annotator_id: int) -> dict | None:
    """A random gold pair this annotator has neither voted on nor skipped (gold_pairs is small),
    leaving out retired or blocked prompts and blocked stories, as for every pair."""
    row = db.execute(
        "SELECT g.id, clo.prompt_id, g.completion_lo, clo.model_id, g.completion_hi, chi.model_id"
        " FROM gold_pairs g JOIN completions clo ON clo.id = g.completion_lo"
        " JOIN completions chi ON chi.id = g.completion_hi"
        " JOIN prompts p ON p.id = clo.prompt_id AND p.retired_at IS NULL AND p.blocked_reason IS NULL"
        " WHERE clo.blocked_reason IS NULL AND chi.blocked_reason IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM seen_pairs s WHERE s.annotator_id = ?"
        "   AND s.completion_lo = g.completion_lo AND s.completion_hi = g.completion_hi)"
        " ORDER BY random() LIMIT 1",
        [annotator_id],
    ).fetchone()
    if row is None:
        return None
    keys = ("gold_id", "prompt_id", "completion_lo", "model_lo", "completion_hi", "model_hi")
    return dict(zip(keys, row))


def gold_results(db: Database) -> list[dict]:
    """Per annotator: gold votes and how many picked the known better story."""
    return list(db.query(
        "SELECT v.annotator_id, count(*) AS gold_votes,"
        f" sum({PICKED_BETTER}) AS gold_correct"
        " FROM votes v JOIN gold_pairs g ON g.id = v.gold_id"
        " WHERE v.source = 'gold' AND v.annotator_id IS NOT NULL GROUP BY v.annotator_id"
    ))


def human_judgements(db: Database) -> list[dict]:
    """People's verdicts on story pairs, side-independent: `lo`/`hi` names the winning story
    by the lower or higher story id, else `tie` or `both_bad`."""
    return list(db.query(
        "SELECT v.annotator_id, min(v.completion_a, v.completion_b) AS completion_lo,"
        " max(v.completion_a, v.completion_b) AS completion_hi,"
        " CASE WHEN v.choice NOT IN ('a', 'b') THEN v.choice"
        "      WHEN (v.choice = 'a') = (v.completion_a < v.completion_b) THEN 'lo' ELSE 'hi' END AS label"
        " FROM votes v WHERE v.source = 'human' AND v.annotator_id IS NOT NULL"
    ))


def annotator_rows(db: Database) -> list[dict]:
    """Everyone who signed in, with their human vote count and exclusion."""
    return list(db.query(
        "SELECT a.id, a.name, a.role, a.excluded_at, a.excluded_reason,"
        " (SELECT count(*) FROM votes v WHERE v.annotator_id = a.id AND v.source = 'human') AS votes"
        " FROM annotators a ORDER BY a.id"
    ))


def set_excluded(db: Database, annotator_ids: list[int], reason: str | None) -> int:
    """Exclude (reason given) or include again (reason None); returns how many rows changed."""
    if not annotator_ids:
        return 0
    marks = ", ".join("?" for _ in annotator_ids)
    excluded_at = time.time() if reason is not None else None
    with write_transaction(db):
        return db.execute(
            f"UPDATE annotators SET excluded_at = ?, excluded_reason = ? WHERE id IN ({marks})",
            [excluded_at, reason, *annotator_ids],
        ).rowcount


def excluded_annotator_ids(db: Database) -> tuple[int, ...]:
    return tuple(r[0] for r in db.execute(
        "SELECT id FROM annotators WHERE excluded_at IS NOT NULL ORDER BY id").fetchall())
