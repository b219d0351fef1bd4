"""Story prompts: the seed set, user-written ones, and evolved ones (rlhf.teams) with lineage."""

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


def add_evolved_prompt(db: Database, text: str, parent_id: int, operation: str) -> int:
    """Store one evolved prompt (source 'teams') with its lineage; returns its id (the stored
    prompt's id when the text already exists)."""
    add_prompts(db, [text], "teams", parent_id=parent_id, operation=operation)
    return db.execute("SELECT id FROM prompts WHERE text = ?", [text]).fetchone()[0]


def get_prompt(db: Database, prompt_id: int) -> dict:
    rows = list(db["prompts"].rows_where("id = ?", [prompt_id]))
    if not rows:
        raise LookupError(f"No prompt with id {prompt_id}.")
    return rows[0]


def list_prompts(db: Database, limit: int | None = None, sources: Iterable[str] | None = None) -> list[dict]:
    """Prompts in id order, only those of `sources` when given."""
    if sources is None:
        return list(db["prompts"].rows_where(order_by="id", limit=limit))
    sources = list(sources)
    marks = ", ".join("?" for _ in sources)
    return list(db["prompts"].rows_where(f"source IN ({marks})", sources, order_by="id", limit=limit))


def prompts_with_parents(db: Database, source: str | None = None, limit: int = 200) -> list[dict]:
    """The newest prompts (of one source, or all) with their parent's text, for the lineage view."""
    where, args = ("WHERE p.source = ?", [source]) if source else ("", [])
    return list(db.query(
        "SELECT p.id, p.text, p.source, p.operation, p.parent_id, parent.text AS parent_text"
        f" FROM prompts p LEFT JOIN prompts parent ON parent.id = p.parent_id {where}"
        " ORDER BY p.id DESC LIMIT ?",
        [*args, limit],
    ))


def lineage(db: Database, prompt_id: int) -> list[dict]:
    """A prompt and its ancestors, the root first."""
    chain = [get_prompt(db, prompt_id)]
    while chain[-1]["parent_id"] is not None and len(chain) <= db["prompts"].count:
        chain.append(get_prompt(db, chain[-1]["parent_id"]))
    return chain[::-1]


def prompt_count(db: Database) -> int:
    return db["prompts"].count
