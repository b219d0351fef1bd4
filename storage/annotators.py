"""People who vote, and their role."""

from __future__ import annotations

import time

from sqlite_utils import Database

from storage.db import write_transaction

ROLES = ("annotator", "researcher", "admin")


def sign_in(db: Database, name: str, role: str) -> dict:
    """Find or create the annotator; the role always follows the current configuration."""
    if role not in ROLES:
        raise ValueError(f"Unknown role {role!r}.")
    with write_transaction(db):
        db["annotators"].insert({"name": name, "role": role, "created_at": time.time()}, ignore=True)
        db.execute("UPDATE annotators SET role = ? WHERE name = ?", [role, name])
    return next(db["annotators"].rows_where("name = ?", [name]))


def sign_in_hub(db: Database, username: str, role: str) -> dict:
    """Find or create the annotator for a Hugging Face login (display name "@username")."""
    if role not in ROLES:
        raise ValueError(f"Unknown role {role!r}.")
    with write_transaction(db):
        db["annotators"].insert(
            {"name": f"@{username}", "hub_username": username, "role": role, "created_at": time.time()},
            ignore=True,
        )
        db.execute("UPDATE annotators SET role = ? WHERE hub_username = ?", [role, username])
    return next(db["annotators"].rows_where("hub_username = ?", [username]))
