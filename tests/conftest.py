"""Shared fixtures: an empty store, and copies of one prepared tiny arena.

The tiny starter (a random 2-layer GPT-2) and its first stories are built once per test
session by running the real first-start path, `rlhf.prepare.prepare`; each test that
needs a ready arena gets its own copy of that data dir, so tests never see each other's
votes, jobs or policies.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.progress import JobProgress
from rlhf.settings import ENV_VARS, Settings
from storage.db import Store

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY_SETTINGS = dict(
    starter="tiny", pool_prompts=6, generation_batch_size=6, max_new_tokens=16, device="cpu",
    min_vote_seconds=0.0,  # tests vote at machine speed; tests/test_quality.py checks the minimum
)


def tiny_settings(data_dir: Path, **overrides) -> Settings:
    return Settings(data_dir=Path(data_dir).resolve(), **{**TINY_SETTINGS, **overrides})


def clean_env() -> dict[str, str]:
    """The environment for subprocesses: no arena settings leaking in, never the network."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO_ROOT))
    return env


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m rlhf ARGS` as a user would run it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "rlhf", *args], cwd=REPO_ROOT, env=clean_env(),
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    """One data dir prepared by the real first-start path with the tiny starter."""
    from rlhf.prepare import prepare

    data_dir = tmp_path_factory.mktemp("prepared") / "data"
    settings = tiny_settings(data_dir)
    store = settings.store()
    reports: list[tuple[float, str]] = []
    policies = prepare(store, settings, lambda f, m: reports.append((f, m)))
    assert len(policies) == 2 and reports and reports[-1][0] == pytest.approx(1.0)
    # Fold the WAL into the main file so a plain copy of arena.db is complete.
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.db.conn.close()
    return data_dir


@pytest.fixture
def arena_dir(prepared_dir: Path, tmp_path: Path) -> tuple[Settings, Store]:
    """A private copy of the prepared arena: (settings, store) pointing at the copy."""
    data_dir = tmp_path / "data"
    shutil.copytree(prepared_dir, data_dir, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    # Point the policies at the copy's own model folder, so the copy stands alone.
    with sqlite3.connect(data_dir / "arena.db") as conn:
        conn.execute("UPDATE models SET path = replace(path, ?, ?)",
                     [str(prepared_dir.resolve()), str(data_dir.resolve())])
    conn.close()
    settings = tiny_settings(data_dir)
    store = settings.store()
    yield settings, store
    store.db.conn.close()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """An empty, fully migrated database."""
    s = Store(tmp_path / "empty" / "arena.db")
    yield s
    s.db.conn.close()



class RecordingProgress(JobProgress):
    """A job's progress that also appends each message to `messages` (resume tests read them)."""

    def __init__(self, settings: Settings, job_id: int, messages: list[str]):
        super().__init__(settings, job_id)
        self.messages = messages

    def __call__(self, fraction: float, message: str) -> None:
        self.messages.append(message)
        super().__call__(fraction, message)
