"""What keeps texts unfit for young children out of the arena, as stored data: the
researcher-edited list of unsuitable themes, and annotators' reports of a prompt or story.

A reported item leaves the arena (its blocked_reason is set) once `hide_after` annotators
have reported it, or as soon as a researcher confirms a report; dismissing the reports
brings an item hidden by reports back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlite_utils import Database

from storage.db import write_transaction

REPORTED = "reported"
CONFIRMED = f"{REPORTED}: confirmed by a researcher"


def themes(db: Database) -> list[str]:
    return [row[0] for row in db.execute("SELECT phrase FROM content_themes ORDER BY phrase")]


def set_themes(db: Database, phrases: Sequence[str]) -> list[str]:
    """Replace the theme list (one transaction); returns it as stored."""
    now = time.time()
    with write_transaction(db):
        db.execute("DELETE FROM content_themes")
        db["content_themes"].insert_all(({"phrase": p, "created_at": now} for p in phrases), ignore=True)
    return themes(db)


def _item(completion_id: int | None) -> tuple[str, list]:
    """SQL matching the reports of one item: a story, or the prompt itself (no story)."""
    return ("completion_id = ?", [completion_id]) if completion_id is not None else ("completion_id IS NULL", [])


def _block(db: Database, prompt_id: int, completion_id: int | None, reason: str | None) -> None:
    table, row_id = ("completions", completion_id) if completion_id is not None else ("prompts", prompt_id)
    db.execute(f"UPDATE {table} SET blocked_reason = ? WHERE id = ?", [reason, row_id])


def add_report(db: Database, annotator_id: int, prompt_id: int, completion_id: int | None, hide_after: int) -> bool:
    """Record an annotator's report of a prompt (completion_id None) or a story, once per
    annotator and item; returns whether the item has now left the arena."""
    where, args = _item(completion_id)
    with write_transaction(db):
        # checked here, not by the unique index alone: SQLite lets NULL (prompt) reports repeat
        if not db.execute(f"SELECT 1 FROM reports WHERE annotator_id = ? AND prompt_id = ? AND {where}",
                          [annotator_id, prompt_id, *args]).fetchone():
            db["reports"].insert({"annotator_id": annotator_id, "prompt_id": prompt_id, "completion_id": completion_id,
                                  "created_at": time.time(), "status": "open"})
        count = db.execute(f"SELECT count(*) FROM reports WHERE prompt_id = ? AND {where} AND status = 'open'",
                           [prompt_id, *args]).fetchone()[0]
        if count >= hide_after:
            _block(db, prompt_id, completion_id, f"{REPORTED} by {count} annotators")
            return True
    return False


def open_reports(db: Database) -> list[dict]:
    """Reported items awaiting review, one row per item, most reported first."""
    return list(db.query(
        "SELECT min(r.id) AS report_id, r.prompt_id, r.completion_id, count(*) AS reports,"
        " coalesce(c.text, p.text) AS text, coalesce(c.blocked_reason, p.blocked_reason) AS blocked_reason"
        " FROM reports r JOIN prompts p ON p.id = r.prompt_id LEFT JOIN completions c ON c.id = r.completion_id"
        " WHERE r.status = 'open' GROUP BY r.prompt_id, r.completion_id ORDER BY reports DESC, report_id"
    ))


def review(db: Database, report_id: int, confirm: bool, reviewer_id: int | None) -> dict:
    """Confirm (the item leaves the arena) or dismiss (an item hidden by reports comes back)
    every open report of the item that report `report_id` is about."""
    rows = list(db["reports"].rows_where("id = ?", [report_id]))
    if not rows:
        raise LookupError(f"No report with id {report_id}.")
    prompt_id, completion_id = rows[0]["prompt_id"], rows[0]["completion_id"]
    where, args = _item(completion_id)
    with write_transaction(db):
        db.execute(f"UPDATE reports SET status = ?, reviewed_by = ?, reviewed_at = ?"
                   f" WHERE prompt_id = ? AND {where} AND status = 'open'",
                   ["confirmed" if confirm else "dismissed", reviewer_id, time.time(), prompt_id, *args])
        table, row_id = ("completions", completion_id) if completion_id is not None else ("prompts", prompt_id)
        current = db.execute(f"SELECT blocked_reason FROM {table} WHERE id = ?", [row_id]).fetchone()[0]
        if confirm:
            _block(db, prompt_id, completion_id, CONFIRMED)
        elif current and current.startswith(REPORTED):
            _block(db, prompt_id, completion_id, None)
    return {"prompt_id": prompt_id, "completion_id": completion_id, "confirmed": confirm}
