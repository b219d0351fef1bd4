"""Background jobs as rows: queued -> running -> succeeded | failed | cancelled | interrupted."""

from __future__ import annotations

import time
from collections.abc import Collection

from sqlite_utils import Database

from storage.codec import dumps, loads
from storage.db import write_transaction

ACTIVE = ("queued", "running", "cancelling")
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")


def _decode(row: dict) -> dict:
    return {**row, "params": loads(row["params"]), "metrics": loads(row["metrics"]),
            "result_model_ids": None if row.get("result_model_ids") is None else loads(row["result_model_ids"])}


def check_queue_room(db: Database, created_by: int | None, max_queued: int) -> None:
    """Refuse (ValueError) when `created_by` already has max_queued jobs waiting; 0 = no cap."""
    if not max_queued or created_by is None:
        return
    waiting = db.execute("SELECT count(*) FROM jobs WHERE status = 'queued' AND created_by = ?",
                         [created_by]).fetchone()[0]
    if waiting >= max_queued:
        raise ValueError(f"Too many queued jobs: at most {max_queued} waiting per researcher; "
                         "wait for one to start or cancel one.")


def create_job(db: Database, kind: str, params: dict, created_by: int | None = None, max_queued: int = 0) -> int:
    """Queue a job; refused while its creator has max_queued jobs waiting (check_queue_room)."""
    with write_transaction(db):
        check_queue_room(db, created_by, max_queued)
        return db["jobs"].insert({
            "kind": kind, "params": dumps(params), "status": "queued", "progress": 0.0,
            "message": "queued", "created_at": time.time(), "created_by": created_by,
        }).last_pk


def get_job(db: Database, job_id: int) -> dict:
    rows = list(db["jobs"].rows_where("id = ?", [job_id]))
    if not rows:
        raise LookupError(f"No job with id {job_id}.")
    return _decode(rows[0])


def list_jobs(db: Database, limit: int = 50, kind: str | None = None) -> list[dict]:
    where, params = ("kind = ?", [kind]) if kind else (None, [])
    return [_decode(r) for r in db["jobs"].rows_where(where, params, order_by="id DESC", limit=limit)]


def claim_next_job(db: Database, kinds: Collection[str] | None = None, *, other_kinds: bool = False) -> dict | None:
    """Atomically move the oldest queued job to running; None when there is none to claim.

    A worker lane claims only its own jobs: those whose kind is in `kinds`, or with
    other_kinds=True those whose kind is not (None: any kind)."""
    where, params = "status = 'queued'", []
    if kinds is not None:
        kinds = sorted(kinds)
        where += f" AND kind {'NOT IN' if other_kinds else 'IN'} ({', '.join('?' * len(kinds))})"
        params = kinds
    with write_transaction(db):
        row = db.execute(f"SELECT id FROM jobs WHERE {where} ORDER BY id LIMIT 1", params).fetchone()
        if row is None:
            return None
        db.execute(
            "UPDATE jobs SET status = 'running', started_at = ?, message = 'starting' WHERE id = ?",
            [time.time(), row[0]],
        )
    return get_job(db, row[0])


def update_job(db: Database, job_id: int, **fields) -> None:
    for key in ("params", "metrics"):
        if key in fields:
            fields[key] = dumps(fields[key])
    db["jobs"].update(job_id, fields)


def report_progress(db: Database, job_id: int, fraction: float, message: str) -> bool:
    """Write progress; returns False when the job was asked to stop."""
    db.execute(
        "UPDATE jobs SET progress = ?, message = ? WHERE id = ? AND status = 'running'",
        [max(0.0, min(1.0, fraction)), message[:500], job_id],
    )
    return get_job(db, job_id)["status"] == "running"


def finish_job(db: Database, job_id: int, status: str, *, error: str | None = None,
               result_model_id: int | None = None, metrics: dict | None = None) -> None:
    if status not in FINISHED:
        raise ValueError(f"Not a final job status: {status!r}.")
    fields = {"status": status, "finished_at": time.time(), "error": error}
    if status == "succeeded":
        fields.update(progress=1.0, message="done")
    if result_model_id is not None:
        fields["result_model_id"] = result_model_id
    if metrics is not None:
        fields["metrics"] = dumps(metrics)
    db["jobs"].update(job_id, fields)


def request_cancel(db: Database, job_id: int) -> str:
    """Queued jobs cancel at once; running ones are flagged for the worker to stop."""
    with write_transaction(db):
        status = get_job(db, job_id)["status"]
        if status == "queued":
            finish_job(db, job_id, "cancelled")
            return "cancelled"
        if status == "running":
            db["jobs"].update(job_id, {"status": "cancelling", "message": "cancelling"})
            return "cancelling"
    return status


def running_jobs(db: Database) -> list[dict]:
    return [_decode(r) for r in db["jobs"].rows_where("status IN ('running', 'cancelling')")]


def requeue(db: Database, job_id: int) -> None:
    """Queue an interrupted or failed job again; it resumes from its last checkpoint."""
    with write_transaction(db):
        status = get_job(db, job_id)["status"]
        if status not in ("interrupted", "failed", "cancelled"):
            raise ValueError(f"Job {job_id} is {status}; only interrupted, failed or cancelled jobs can be resumed.")
        db["jobs"].update(job_id, {"status": "queued", "message": "queued to resume", "error": None,
                                   "finished_at": None, "pid": None})


def record_results(db: Database, job_id: int, model_ids: list[int], metrics: dict | None) -> None:
    """What a job produced (its models, first the main one, and metrics): once recorded, a
    re-run of the job does not train again. Part of the caller's registering transaction."""
    db["jobs"].update(job_id, {"result_model_ids": dumps(model_ids), "metrics": dumps(metrics),
                               "result_model_id": model_ids[0] if model_ids else None})


def recorded_results(db: Database, job_id: int) -> list[int] | None:
    """The model ids a run of this job recorded ([] for a job that makes none); None: not yet."""
    return get_job(db, job_id)["result_model_ids"]
