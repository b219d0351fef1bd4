"""One SQLite file, one connection per thread, schema brought up to date on open.

Gradio runs handlers in worker threads and jobs run in subprocesses, so every thread
gets its own connection (WAL lets readers run beside the single writer; the busy timeout
makes concurrent writers wait instead of failing).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from storage.schema import MIGRATIONS

BUSY_TIMEOUT_MS = 10_000


def connect(path: Path | str) -> sqlite_utils.Database:
    """Open a connection with the pragmas every connection needs."""
    db = sqlite_utils.Database(str(path))
    db.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.conn.execute("PRAGMA foreign_keys = ON")
    # FULL: an acknowledged vote survives a power cut, not only a crash of the app.
    db.conn.execute("PRAGMA synchronous = FULL")
    return db


class Store:
    """Hands each thread its own connection to the arena database."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = connect(self.path)
        if db.journal_mode != "wal":
            db.enable_wal()
        MIGRATIONS.apply(db)
        self._local.db = db

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = connect(self.path)
        return db


@contextlib.contextmanager
def write_transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """A transaction that takes the write lock up front (BEGIN IMMEDIATE).

    sqlite-utils' atomic() begins DEFERRED: a read-then-write transaction then fails at
    once with "database is locked" when another connection committed in between, and the
    busy timeout cannot help. Taking the lock first makes concurrent writers queue instead.
    Inside another write transaction it becomes a savepoint of it: the outer one holds the
    lock, and the inner block commits or rolls back with it (e.g. a job queued while a
    training job's models are registered).
    """
    if db.conn.in_transaction:
        db.conn.execute("SAVEPOINT nested_write")
        try:
            yield db
        except BaseException:
            db.conn.execute("ROLLBACK TO nested_write")
            db.conn.execute("RELEASE nested_write")
            raise
        db.conn.execute("RELEASE nested_write")
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.conn.execute("ROLLBACK")
        raise
    db.conn.execute("COMMIT")
