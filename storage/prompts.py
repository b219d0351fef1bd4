"""Story prompts: the seed set, user-written ones (in named collections), evolved ones
(rlhf.teams) with lineage, and the prompts of imported preference data (never in the arena)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence

from sqlite_utils import Database

from storage.db import write_transaction

SOURCES = ("seed", "user", "teams", "import")
_WORD = re.compile(r"[^\W_]+")


def normalized_text(text: str) -> str:
    """The text as duplicate detection sees it: lower case, words only (punctuation and
    spacing ignored), so "A cat." and "a  cat" are one prompt."""
    return " ".join(_WORD.findall(text.lower()))


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
          "created_at": now, "normalized": normalized_text(t)} for t in texts),
        ignore=True,
    )
    return db["prompts"].count - before


def add_prompt_batch(
    db: Database, rows: Sequence[tuple[str, str | None]], source: str, collection: str,
) -> dict:
    """Store (text, blocked reason) rows in one transaction, skipping texts whose normalised
    form is already stored or earlier in the batch; returns the new ids and the skip count."""
    if source not in SOURCES:
        raise ValueError(f"Unknown prompt source {source!r}.")
    now, added, duplicates = time.time(), [], 0
    with write_transaction(db):
        for text, blocked_reason in rows:
            key = normalized_text(text)
            if db.execute("SELECT 1 FROM prompts WHERE normalized = ? OR text = ?", [key, text]).fetchone():
                duplicates += 1
                continue
            added.append(db["prompts"].insert({
                "text": text, "source": source, "collection": collection, "normalized": key,
                "blocked_reason": blocked_reason, "created_at": now,
            }).last_pk)
    return {"added": added, "duplicates": duplicates}


def prompt_id_for(
    db: Database, text: str, source: str, collection: str | None = None, blocked_reason: str | None = None,
) -> int:
    """The id of the prompt with this exact text, stored first (with `source`) if it is new."""
    db["prompts"].insert(
        {"text": text, "source": source, "collection": collection, "normalized": normalized_text(text),
         "blocked_reason": blocked_reason, "created_at": time.time()},
        ignore=True,
    )
    return db.execute("SELECT id FROM prompts WHERE text = ?", [text]).fetchone()[0]


def add_requested_prompt(db: Database, text: str, annotator_id: int, collection: str,
                         blocked_reason: str | None) -> dict:
    """Store a prompt an annotator typed (source `user`, their id), or return the stored prompt
    with the same normalised text untouched."""
    key = normalized_text(text)
    with write_transaction(db):
        found = db.execute("SELECT id FROM prompts WHERE normalized = ? OR text = ?", [key, text]).fetchone()
        prompt_id = found[0] if found else db["prompts"].insert({
            "text": text, "source": "user", "collection": collection, "normalized": key,
            "blocked_reason": blocked_reason, "requested_by": annotator_id, "created_at": time.time(),
        }).last_pk
    return get_prompt(db, prompt_id)


def requests_since(db: Database, annotator_id: int, since: float) -> int:
    """Prompts this annotator typed in live battles since `since` (a time.time())."""
    return db.execute("SELECT count(*) FROM prompts WHERE requested_by = ? AND created_at >= ?",
                      [annotator_id, since]).fetchone()[0]


def retire_prompt(db: Database, prompt_id: int) -> dict:
    """Take a prompt out of the arena; its stories and votes stay."""
    get_prompt(db, prompt_id)
    db.execute("UPDATE prompts SET retired_at = coalesce(retired_at, ?) WHERE id = ?", [time.time(), prompt_id])
    return get_prompt(db, prompt_id)


def block_prompts(db: Database, reasons: dict[int, str]) -> None:
    """Keep prompts out of the arena, each with the reason (content check, reports)."""
    with write_transaction(db):
        for prompt_id, reason in reasons.items():
            db.execute("UPDATE prompts SET blocked_reason = ? WHERE id = ?", [reason, prompt_id])


def collections(db: Database) -> list[dict]:
    """Named collections with their prompt counts (retired and blocked ones too)."""
    return list(db.query(
        "SELECT collection, count(*) AS prompts, sum(retired_at IS NOT NULL) AS retired,"
        " sum(blocked_reason IS NOT NULL) AS blocked FROM prompts"
        " WHERE collection IS NOT NULL GROUP BY collection ORDER BY collection"
    ))


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


def list_prompts(
    db: Database, limit: int | None = None, sources: Iterable[str] | None = None,
    collection: str | None = None,
) -> list[dict]:
    """Prompts in id order, only those of `sources` and of `collection` when given."""
    where, args = [], []
    if sources is not None:
        sources = list(sources)
        where.append(f"source IN ({', '.join('?' for _ in sources)})")
        args += sources
    if collection is not None:
        where.append("collection = ?")
        args.append(collection)
    return list(db["prompts"].rows_where(" AND ".join(where) or None, args, order_by="id", limit=limit))


def prompts_with_parents(db: Database, source: str | None = None, limit: int = 200) -> list[dict]:
    """The newest prompts (of one source, or all) with their parent's text, for the lineage view."""
    where, args = ("WHERE p.source = ?", [source]) if source else ("", [])
    return list(db.query(
        "SELECT p.id, p.text, p.source, p.collection, p.retired_at, p.blocked_reason, p.operation,"
        " p.parent_id, parent.text AS parent_text"
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
