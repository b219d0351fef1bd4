"""The completion pool: one story per (prompt, policy)."""

from __future__ import annotations

import time

from sqlite_utils import Database

from storage.codec import dumps


def add_completion(
    db: Database, prompt_id: int, model_id: int, text: str,
    gen_params: dict | None = None, tokens: int | None = None, ms: float | None = None,
    blocked_reason: str | None = None, truncated: bool | None = None,
) -> int:
    """Store a story and return its id; an existing story for the same (prompt, policy) is kept.

    A `blocked_reason` (failed content check) keeps the story out of the arena. `truncated`:
    whether generation hit the token budget (None when unknown, e.g. imported text).
    """
    db["completions"].insert(
        {"prompt_id": prompt_id, "model_id": model_id, "text": text, "blocked_reason": blocked_reason,
         "gen_params": dumps(gen_params), "tokens": tokens, "ms": ms,
         "truncated": None if truncated is None else int(truncated), "created_at": time.time()},
        ignore=True,
    )
    row = db.execute(
        "SELECT id FROM completions WHERE prompt_id = ? AND model_id = ?", [prompt_id, model_id]
    ).fetchone()
    return row[0]


def prompts_without_completion(db: Database, model_id: int, first: int | None = None) -> list[dict]:
    """Arena prompts this policy has no story for yet, among the `first` seed prompts (all
    when None) and every evolved ('teams') and user prompt: those exist to be voted on, and
    they come after the seed set, where a "first N" limit would silently leave them out.
    Retired and blocked prompts, and those of imported preference data, get no stories."""
    return [dict(r) for r in db.query(
        "SELECT p.id, p.text FROM prompts p"
        " WHERE (p.source IN ('teams', 'user')"
        "   OR p.id IN (SELECT id FROM prompts WHERE source = 'seed' ORDER BY id LIMIT ?))"
        " AND p.retired_at IS NULL AND p.blocked_reason IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM completions c WHERE c.prompt_id = p.id AND c.model_id = ?)"
        " ORDER BY p.id",
        [-1 if first is None else first, model_id],
    )]


def completions_for_prompt(db: Database, prompt_id: int) -> list[dict]:
    """Every policy's story for one prompt, with the policy's name; stories kept out of the
    arena (blocked) and those of imported data (external writers) are left out."""
    return list(db.query(
        "SELECT c.id, c.model_id, m.name AS model_name, c.text, c.tokens, c.ms"
        " FROM completions c JOIN models m ON m.id = c.model_id AND m.kind != 'external'"
        " WHERE c.prompt_id = ? AND c.blocked_reason IS NULL ORDER BY c.model_id",
        [prompt_id],
    ))


def get_completion(db: Database, completion_id: int) -> dict:
    rows = list(db["completions"].rows_where("id = ?", [completion_id]))
    if not rows:
        raise LookupError(f"No completion with id {completion_id}.")
    return rows[0]


def pool_sizes(db: Database) -> dict[int, int]:
    """Stories per policy."""
    return {r["model_id"]: r["n"] for r in db.query(
        "SELECT model_id, count(*) AS n FROM completions GROUP BY model_id")}


def prompts_with_completions(db: Database, min_policies: int = 1) -> list[dict]:
    """Prompts that have stories from at least `min_policies` policies (blocked prompts and
    stories, and imported data, left out)."""
    return list(db.query(
        "SELECT p.id, p.text, count(c.id) AS stories FROM prompts p"
        " JOIN completions c ON c.prompt_id = p.id AND c.blocked_reason IS NULL"
        " JOIN models m ON m.id = c.model_id AND m.kind != 'external'"
        " WHERE p.blocked_reason IS NULL GROUP BY p.id"
        " HAVING count(c.id) >= ? ORDER BY p.id",
        [min_policies],
    ))
