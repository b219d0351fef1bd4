"""Rounds of automatic training as rows, and the round recipe (rlhf.rounds runs them).

Every change of a round's status is a compare-and-set on the status it was read in, so
two callers (the worker after a restart, a CLI) can never both queue a step or both
decide a round: the second finds the status changed and does nothing.
"""

from __future__ import annotations

import time

from sqlite_utils import Database

from storage import jobs as job_rows
from storage.codec import dumps, loads
from storage.db import write_transaction
from storage.votes import not_excluded

ACTIVE = ("queued", "training", "collecting")
FINISHED = ("decided", "failed", "cancelled")
_LISTS = ("job_ids", "child_ids")
RECIPE_ID = 1


def _decode(row: dict) -> dict:
    return {**row, "recipe": loads(row["recipe"]), "results": loads(row["results"]),
            **{key: loads(row[key]) if row[key] else [] for key in _LISTS}}


def get_recipe(db: Database) -> dict | None:
    """{recipe, version, set_by, set_by_name, set_at}, or None while no recipe was ever set."""
    rows = list(db.query("SELECT r.*, a.name AS set_by_name FROM round_recipe r"
                         " LEFT JOIN annotators a ON a.id = r.set_by WHERE r.id = ?", [RECIPE_ID]))
    return {**rows[0], "recipe": loads(rows[0]["recipe"])} if rows else None


def set_recipe(db: Database, recipe: dict, set_by: int | None) -> dict:
    """Replace the recipe; its version goes up by one."""
    with write_transaction(db):
        current = get_recipe(db)
        db["round_recipe"].upsert({"id": RECIPE_ID, "recipe": dumps(recipe), "set_by": set_by, "set_at": time.time(),
                                   "version": (current["version"] if current else 0) + 1}, pk="id")
    return get_recipe(db)


def decided_votes_after(db: Database, vote_id: int) -> tuple[int, int]:
    """(how many decided human votes have an id above vote_id, the newest such id or vote_id).
    Decided: A or B won (ties and both-bad say nothing about which story is better)."""
    count, newest = db.execute(
        "SELECT count(*), max(id) FROM votes v WHERE source = 'human' AND choice IN ('a', 'b')"
        f" AND id > ? AND {not_excluded('v')}", [vote_id]).fetchone()
    return count, newest or vote_id


def create_round(db: Database, *, trigger: str, recipe: dict, parent_id: int, votes_after: int,
                 created_by: int | None) -> int | None:
    """A new queued round, or None while another round is active (one at a time)."""
    now = time.time()
    with write_transaction(db):
        if active_round(db) is not None:
            return None
        return db["rounds"].insert({
            "status": "queued", "trigger": trigger, "recipe": dumps(recipe), "parent_id": parent_id,
            "job_ids": dumps([]), "child_ids": dumps([]), "results": dumps({}), "votes_after": votes_after,
            "created_by": created_by, "created_at": now, "updated_at": now,
        }).last_pk


def get_round(db: Database, round_id: int) -> dict:
    rows = list(db["rounds"].rows_where("id = ?", [round_id]))
    if not rows:
        raise LookupError(f"No round with id {round_id}.")
    return _decode(rows[0])


def active_round(db: Database) -> dict | None:
    rows = list(db["rounds"].rows_where(f"status IN ({', '.join('?' * len(ACTIVE))})", list(ACTIVE),
                                        order_by="id", limit=1))
    return _decode(rows[0]) if rows else None


def list_rounds(db: Database, limit: int = 100) -> list[dict]:
    """Rounds, oldest first (the last `limit`)."""
    rows = db["rounds"].rows_where(order_by="id DESC", limit=limit)
    return [_decode(r) for r in reversed(list(rows))]


def last_round(db: Database) -> dict | None:
    rows = list(db["rounds"].rows_where(order_by="id DESC", limit=1))
    return _decode(rows[0]) if rows else None


def last_promoted(db: Database) -> int | None:
    """The child promoted by the newest round that promoted one: the champion."""
    row = db.execute("SELECT promoted_id FROM rounds WHERE promoted_id IS NOT NULL ORDER BY id DESC LIMIT 1").fetchone()
    return row[0] if row else None


def _update_if(db: Database, round_id: int, status: str, fields: dict) -> bool:
    """Write fields when the round is still in `status`; False (nothing written) otherwise."""
    fields = {**fields, "updated_at": time.time()}
    for key in (*_LISTS, "results"):
        if key in fields:
            fields[key] = dumps(fields[key])
    if fields.get("status") in FINISHED:
        fields["finished_at"] = fields["updated_at"]
    columns = ", ".join(f"{key} = ?" for key in fields)
    cursor = db.execute(f"UPDATE rounds SET {columns} WHERE id = ? AND status = ?",
                        [*fields.values(), round_id, status])
    return cursor.rowcount == 1


def queue_step(db: Database, round_id: int, steps_done: int, kind: str, params: dict, **fields) -> int | None:
    """Queue the round's next step job and move it to training, in one transaction; None
    (nothing queued) when the round has moved on or that step is already queued."""
    with write_transaction(db):
        current = get_round(db, round_id)
        if current["status"] not in ("queued", "training") or len(current["job_ids"]) != steps_done:
            return None
        job_id = job_rows.create_job(db, kind, params, current["created_by"])
        _update_if(db, round_id, current["status"],
                   {**fields, "status": "training", "job_ids": [*current["job_ids"], job_id]})
    return job_id


def advance(db: Database, round_id: int, expected: str, **fields) -> bool:
    """Set fields (a new status among them) when the round is still in the `expected` status."""
    with write_transaction(db):
        return _update_if(db, round_id, expected, fields)


def decide(db: Database, round_id: int, *, retire: list[int], **fields) -> bool:
    """End a collecting round as decided and take the retired children out of the arena,
    in one transaction: a second call (a restarted worker) finds it decided and does nothing."""
    with write_transaction(db):
        if not _update_if(db, round_id, "collecting", {**fields, "status": "decided"}):
            return False
        for model_id in retire:
            db["models"].update(model_id, {"active": 0})
    return True


def head_to_head(db: Database, model_id: int, opponent_id: int) -> list[dict]:
    """Human votes between two policies (excluded annotators and both-bad left out), each as
    {prompt_id, outcome}: 1 when model_id won, 0 when it lost, 0.5 for a tie."""
    return list(db.query(
        "SELECT prompt_id, CASE WHEN choice = 'tie' THEN 0.5"
        " WHEN (choice = 'a') = (model_a = :me) THEN 1.0 ELSE 0.0 END AS outcome"
        " FROM votes v WHERE source = 'human' AND choice != 'both_bad'"
        " AND ((model_a = :me AND model_b = :other) OR (model_a = :other AND model_b = :me))"
        f" AND {not_excluded('v')} ORDER BY id", {"me": model_id, "other": opponent_id}))
