"""Policies: a model (local path, Hub id) plus decoding settings, with lineage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlite_utils import Database

from storage.codec import dumps, loads

# external: the writer of one side of an imported preference data set; it has no weights,
# is never active, and list_models leaves it out unless asked.
KINDS = ("starter", "pretrain", "sft", "reward", "rloo", "dpo", "dph", "raft", "hub", "local", "external")


@dataclass(frozen=True)
class ModelRecord:
    id: int
    name: str
    kind: str
    parent_id: int | None
    path: str | None
    hub_id: str | None
    job_id: int | None
    created_at: float
    active: bool
    decoding: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        """Where the weights load from: a local folder, else a Hub id."""
        return self.path or self.hub_id or ""

    @classmethod
    def from_row(cls, row: dict) -> "ModelRecord":
        return cls(
            id=row["id"], name=row["name"], kind=row["kind"], parent_id=row["parent_id"],
            path=row["path"], hub_id=row["hub_id"], job_id=row["job_id"],
            created_at=row["created_at"], active=bool(row["active"]),
            decoding=loads(row["decoding"]), metrics=loads(row["metrics"]),
        )


def add_model(
    db: Database, name: str, kind: str, *, path: str | None = None, hub_id: str | None = None,
    parent_id: int | None = None, decoding: dict | None = None, job_id: int | None = None,
    metrics: dict | None = None, active: bool = True,
) -> ModelRecord:
    if kind not in KINDS:
        raise ValueError(f"Unknown model kind {kind!r}; expected one of {', '.join(KINDS)}.")
    if not (path or hub_id):
        raise ValueError("A model needs a local path or a Hub id.")
    if get_model_by_name(db, name) is not None:
        raise ValueError(f"A policy named {name!r} already exists.")
    row_id = db["models"].insert({
        "name": name, "kind": kind, "parent_id": parent_id, "path": path, "hub_id": hub_id,
        "decoding": dumps(decoding), "job_id": job_id, "created_at": time.time(),
        "active": int(active), "metrics": dumps(metrics),
    }).last_pk
    return get_model(db, row_id)


def get_model(db: Database, model_id: int) -> ModelRecord:
    rows = list(db["models"].rows_where("id = ?", [model_id]))
    if not rows:
        raise LookupError(f"No policy with id {model_id}.")
    return ModelRecord.from_row(rows[0])


def get_model_by_name(db: Database, name: str) -> ModelRecord | None:
    rows = list(db["models"].rows_where("name = ?", [name]))
    return ModelRecord.from_row(rows[0]) if rows else None


def list_models(db: Database, active_only: bool = False, external: bool = False) -> list[ModelRecord]:
    """Policies in id order; the `external` writers of imported data only when asked."""
    where = ["active = 1"] if active_only else []
    if not external:
        where.append("kind != 'external'")
    return [ModelRecord.from_row(r) for r in db["models"].rows_where(" AND ".join(where) or None, order_by="id")]


def set_active(db: Database, model_id: int, active: bool) -> ModelRecord:
    get_model(db, model_id)
    db["models"].update(model_id, {"active": int(active)})
    return get_model(db, model_id)


def update_metrics(db: Database, model_id: int, metrics: dict) -> ModelRecord:
    """Merge new metrics into a policy's metrics (later values win)."""
    merged = {**get_model(db, model_id).metrics, **metrics}
    db["models"].update(model_id, {"metrics": dumps(merged)})
    return get_model(db, model_id)
