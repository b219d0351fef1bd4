"""Attacks on a public Space, replayed over the HTTP API of a started app (issue 14).

Each test plays one attack against the real app (`python app.py`, tiny starter, a
researcher with a key) and checks that it is refused, that the database passes
`PRAGMA integrity_check`, and that no acknowledged vote is lost.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.app_server import TINY_ARGS, query, running_app, wait_for_pool

gradio_client = pytest.importorskip("gradio_client")
AppError = pytest.importorskip("gradio_client.exceptions").AppError

RESEARCHER = "rita"
RESEARCHER_KEY = "correct horse battery staple"
APP_ENV = {"STORY_ARENA_RESEARCHERS": RESEARCHER, "STORY_ARENA_RESEARCHER_KEY": RESEARCHER_KEY}
SIGN_IN_KEY = 5  # index of the pair's client key among /sign_in's outputs
VOTE_KEY = 4  # ... and among a vote's outputs


def client(url: str):
    return gradio_client.Client(url, verbose=False)


def integrity(db_path: Path) -> str:
    return query(db_path, "PRAGMA integrity_check")[0][0]


def stored_keys(db_path: Path) -> set[str]:
    return {row[0] for row in query(db_path, "SELECT client_key FROM votes")}


class Voter:
    """One annotator's client; `acknowledged` holds the client key of every vote whose call returned."""

    def __init__(self, url: str, name: str):
        self.client = client(url)
        self.key = self.client.predict(name, "", api_name="/sign_in")[SIGN_IN_KEY]
        self.acknowledged: list[str] = []

    def vote(self, times: int) -> None:
        for _ in range(times):
            assert self.key, "no pair left to vote on"
            outputs = self.client.predict(self.key, "", api_name="/vote_a")
            self.acknowledged.append(self.key)
            self.key = outputs[VOTE_KEY]


def test_model_sources_never_reach_the_database_and_votes_survive_kill_9(tmp_path):
    """Attack 1: the database, its WAL, a job log and /proc paths given as model sources."""
    data_dir = tmp_path / "arena"
    db_path = data_dir / "arena.db"
    with running_app(data_dir, env=APP_ENV, extra_args=TINY_ARGS) as (url, app):
        wait_for_pool(data_dir)
        voter = Voter(url, "Vera")
        voter.vote(2)
        researcher = client(url)
        researcher.predict(RESEARCHER, RESEARCHER_KEY, api_name="/sign_in")
        models_before = query(db_path, "SELECT id, name, path FROM models ORDER BY id")
        linked_db = tmp_path / "linked-db"
        linked_db.symlink_to(db_path)
        folder_with_linked_config = tmp_path / "looks-like-a-model"
        folder_with_linked_config.mkdir()
        (folder_with_linked_config / "config.json").symlink_to(db_path)
        job_log = next((data_dir / "jobs").glob("job-*.log"))
        sources = [
            db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm"), job_log, data_dir, data_dir / "jobs",
            data_dir / "exports", linked_db, folder_with_linked_config, "/proc/self/environ", "/proc/self/fd",
            "/proc/self/root", "/dev/null", "/sys/kernel", "x" * 300,
        ]
        for number, source in enumerate(sources):
            with pytest.raises(AppError, match="Model source"):
                researcher.predict(f"attack-{number}", str(source), "{}", api_name="/add_policy")
        assert query(db_path, "SELECT id, name, path FROM models ORDER BY id") == models_before
        voter.vote(2)
        assert integrity(db_path) == "ok"
        assert set(voter.acknowledged) <= stored_keys(db_path)
        os.killpg(app.pid, signal.SIGKILL)
        app.wait(timeout=10)

    assert integrity(db_path) == "ok"
    assert set(voter.acknowledged) <= stored_keys(db_path)
    with running_app(data_dir, env=APP_ENV, extra_args=TINY_ARGS) as (url, _):
        after_restart = Voter(url, "Walt")
        after_restart.vote(1)
    assert integrity(db_path) == "ok"
    assert set(voter.acknowledged + after_restart.acknowledged) <= stored_keys(db_path)
