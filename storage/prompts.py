"""Story prompts: the seed set, user-written ones, and (later) evolved ones with lineage."""

from __future__ import annotations

import time
from collections.abc import Iterable

from sqlite_utils import Database

SOURCES = ("seed", "user", "teams")


def add_prompts(
    db: Database, texts: Iterable[str], source: str = "seed",
    parent_id: int | None = None, operation: str | None = None,
) -> int:
    """Insert prompts, skipping ones already stored; returns how many were new."""
    if source not in SOURCES:
        raise ValueError(f"Unknown prompt source {source!r}.")
    before = db["prompts"].count
    now = time.time()
    db["prompts"].insert_all(
        ({"text": t, "source": source, "parent_id": parent_id, "operation": operation,
          "created_at": now} for t in texts),
        ignore=True,
    )
    return db["prompts"].count - before


def get_prompt(db: Database, prompt_id: int) -> dict:
    rows = list(db["prompts"].rows_where("id = ?", [prompt_id]))
    if not rows:
        raise LookupError(f"No prompt with id {prompt_id}.")
    return rows[0]


def list_prompts(db: Database, limit: int | None = None) -> list[dict]:
    return list(db["prompts"].rows_where(order_by="id", limit=limit))


def prompt_count(db: Database) -> int:
    return db["prompts"].count
