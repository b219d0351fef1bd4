"""Attacks on a public Space, replayed over the HTTP API of a started app (issue 14).

Each test plays one attack against the real app (`python app.py`, tiny starter, a
researcher with a key) and checks that it is refused, that the database passes
`PRAGMA integrity_check`, and that no acknowledged vote is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from bench.app_server import TINY_ARGS, execute, query, running_app, wait_for, wait_for_pool
from rlhf.settings import Settings
from storage import jobs as job_rows
from storage.db import Store

gradio_client = pytest.importorskip("gradio_client")
AppError = pytest.importorskip("gradio_client.exceptions").AppError

RESEARCHER = "rita"
RESEARCHER_KEY = "correct horse battery staple"
APP_ENV = {"STORY_ARENA_RESEARCHERS": RESEARCHER, "STORY_ARENA_RESEARCHER_KEY": RESEARCHER_KEY}
SIGN_IN_KEY = 5  # index of the pair's client key among /sign_in's outputs
VOTE_KEY = 4  # ... and among a vote's outputs
# The module's app: small caps so each can be reached in a test (the caps on new names per
# address and on votes per annotator are per hour and per minute for the whole module).
NAMES_PER_HOUR, VOTES_PER_MINUTE, MAX_QUEUED, MAX_UPLOAD_MB = 16, 3, 2, 1
LIMITS = ("--annotators-per-address-per-hour", str(NAMES_PER_HOUR), "--annotator-votes-per-minute",
          str(VOTES_PER_MINUTE), "--max-queued-jobs", str(MAX_QUEUED), "--max-upload-mb", str(MAX_UPLOAD_MB))
TOO_BIG_ID = 2**63


def client(url: str):
    return gradio_client.Client(url, verbose=False)


def integrity(db_path: Path) -> str:
    return query(db_path, "PRAGMA integrity_check")[0][0]


def stored_keys(db_path: Path) -> set[str]:
    return {row[0] for row in query(db_path, "SELECT client_key FROM votes")}


def call_escaped(url: str, api_name: str, data: list, session_hash: str) -> str:
    """Call an endpoint in a session with JSON escapes httpx would not write itself (a lone
    surrogate); returns the event stream's text."""
    body = json.dumps({"data": data, "session_hash": session_hash})
    event = httpx.post(f"{url}/gradio_api/call/{api_name}", content=body,
                       headers={"content-type": "application/json"}).raise_for_status().json()
    return httpx.get(f"{url}/gradio_api/call/{api_name}/{event['event_id']}", timeout=60).text


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


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("security-arena")
    with running_app(data_dir, env=APP_ENV, extra_args=(*TINY_ARGS, *LIMITS)) as (url, _):
        wait_for_pool(data_dir)
        yield url, data_dir


@pytest.fixture(scope="module")
def researcher(app):
    url, _ = app
    c = client(url)
    c.predict(RESEARCHER, RESEARCHER_KEY, api_name="/sign_in")
    return c


def count(data_dir: Path, table: str) -> int:
    return query(data_dir / "arena.db", f"SELECT count(*) FROM {table}")[0][0]


def test_uploads_are_capped_and_corpora_need_a_researcher(app, tmp_path):
    """Attack 2: anonymous uploads of any size."""
    url, data_dir = app
    big = b"x" * (MAX_UPLOAD_MB * 1024 * 1024 + 1)
    response = httpx.post(f"{url}/gradio_api/upload", files={"files": ("big.txt", big, "text/plain")}, timeout=60)
    assert response.status_code == 413, response.text[:200]
    small = httpx.post(f"{url}/gradio_api/upload", files={"files": ("small.txt", b"Once upon a time.", "text/plain")})
    assert small.status_code == 200
    jobs_before = count(data_dir, "jobs")
    stories = tmp_path / "stories.txt"
    stories.write_text("Once upon a time.\n\nThe end.\n", encoding="utf-8")
    corpus = gradio_client.handle_file(str(stories))
    with pytest.raises(AppError, match="Sign in"):
        client(url).predict("pretrain", "{}", corpus, api_name="/train")
    assert count(data_dir, "jobs") == jobs_before
    assert not (data_dir / "uploads").exists()


def test_a_name_belongs_to_the_first_browser_and_look_alikes_are_refused(app):
    """Attack 3: impersonating an annotator, and homoglyphs of an existing or researcher name."""
    url, data_dir = app
    owner = client(url)
    out = owner.predict("Ada", "", api_name="/sign_in")
    token = out[-1]
    assert len(token) == 32
    stored = query(data_dir / "arena.db", "SELECT token_hash FROM annotators WHERE name = 'Ada'")
    assert stored == [(hashlib.sha256(token.encode()).hexdigest(),)]
    annotators_before = count(data_dir, "annotators")
    impostor = client(url)
    for name, impostor_token in [("Ada", ""), ("Ada", "f" * 32), ("ada", ""), ("\u0410da", ""),
                                 ("\uff21\uff44\uff41", ""), ("Rita", ""), ("r\u0456ta", ""), ("\uff52ita", "")]:
        with pytest.raises(AppError, match="is taken"):
            impostor.predict(name, "", impostor_token, api_name="/sign_in")
    with pytest.raises(AppError, match="Sign in"):
        impostor.predict(out[SIGN_IN_KEY], "", api_name="/vote_a")
    assert count(data_dir, "annotators") == annotators_before
    # The same browser (its token) signs in again, under any spelling of the name.
    again = client(url).predict("ADA", "", token, api_name="/sign_in")
    assert again[0] == "Signed in as **Ada** (annotator)."


def test_job_logs_and_exports_are_for_researchers_only(app, researcher):
    """Attack 6: job logs (tracebacks with server paths) and exports read by anyone."""
    url, data_dir = app
    annotator = client(url)
    annotator.predict("Jo", "", api_name="/sign_in")
    for c in (client(url), annotator):
        with pytest.raises(AppError, match="Sign in|researcher role"):
            c.predict(1, api_name="/job_details")
        with pytest.raises(AppError, match="Sign in|researcher role"):
            c.predict(False, api_name="/export")
    _, log, _ = researcher.predict(1, api_name="/job_details")
    assert log and log != "(no log yet)"
    exported = researcher.predict(True, api_name="/export")
    assert not os.path.exists(exported), "the export must come back as data, not as a file path"
    assert not (data_dir / "exports").exists()


def test_corpora_only_from_the_data_dir_and_errors_reveal_no_paths(app, researcher):
    """Attack 7: server files as corpora, and errors that tell whether a path exists."""
    url, data_dir = app
    jobs_before = count(data_dir, "jobs")
    messages = set()
    for path in ("/etc/passwd", "/etc/no-such-file.txt", "../../etc/hostname", str(data_dir / "arena.db"),
                 "arena.db-wal", "jobs/job-1.log", str(Path(__file__))):
        extra = '{"corpus": {"file": "%s"}}' % path
        with pytest.raises(AppError, match="corpus file: give an uploaded file") as refused:
            researcher.predict("pretrain", extra, None, api_name="/train")
        messages.add(str(refused.value))
        assert "/etc" not in str(refused.value) and str(data_dir) not in str(refused.value)
    assert len(messages) == 1, "the same refusal whether the path exists or not"
    assert count(data_dir, "jobs") == jobs_before
    assert integrity(data_dir / "arena.db") == "ok"


def test_bad_inputs_get_one_line_errors_and_count_nothing(app, researcher):
    """Attack 8: a lone surrogate in a rationale, a long model source, ids of 2^63 and more."""
    url, data_dir = app
    voter = Voter(url, "Sue")
    votes_before = count(data_dir, "votes")
    for _ in range(VOTES_PER_MINUTE + 2):
        stream = call_escaped(url, "vote_a", [voter.key, "nice \ud800 story"], voter.client.session_hash)
        assert "event: error" in stream and "The reason (Why?) has a character that is not text" in stream, stream
    assert count(data_dir, "votes") == votes_before
    voter.vote(VOTES_PER_MINUTE)  # no rate-limit slot was spent by the refused votes
    assert count(data_dir, "votes") == votes_before + VOTES_PER_MINUTE
    models_before, jobs_before = count(data_dir, "models"), count(data_dir, "jobs")
    with pytest.raises(AppError, match="Model source: at most 255"):
        researcher.predict("long-source", "a/" + "b" * 300, "{}", api_name="/add_policy")
    for endpoint, args, field in [
        ("/job_details", (TOO_BIG_ID,), "Job id"), ("/cancel_job", (TOO_BIG_ID,), "Job id"),
        ("/resume_job", (TOO_BIG_ID * 4,), "Job id"), ("/set_active", (TOO_BIG_ID, False), "Policy id"),
        ("/add_gold_pair", (TOO_BIG_ID, "tiny-t0.7", "tiny-t1.0"), "Prompt id"),
    ]:
        with pytest.raises(AppError, match=field) as refused:
            researcher.predict(*args, api_name=endpoint)
        assert "\n" not in str(refused.value)
    assert (count(data_dir, "models"), count(data_dir, "jobs")) == (models_before, jobs_before)
    assert count(data_dir, "gold_pairs") == 0
    assert integrity(data_dir / "arena.db") == "ok"


def test_queued_jobs_are_capped_per_researcher(app, researcher):
    """Attack 5: one researcher queueing hundreds of jobs."""
    url, data_dir = app
    db_path = data_dir / "arena.db"
    # A long job holds the single worker, so the researcher's jobs stay queued.
    blocker = job_rows.create_job(Store(db_path).db, "generate", {"model_ids": [1], "prompts": None})
    wait_for(lambda: query(db_path, "SELECT status FROM jobs WHERE id = ?", [blocker])[0][0] == "running",
             60, "the long job to start")
    folder = str(data_dir / "models" / "tiny-gpt2")
    models_before = count(data_dir, "models")
    for number in range(MAX_QUEUED):
        researcher.predict(f"copy-{number}", folder, "{}", api_name="/add_policy")
    with pytest.raises(AppError, match="Too many queued jobs"):
        researcher.predict("one-too-many", folder, "{}", api_name="/add_policy")
    assert count(data_dir, "models") == models_before + MAX_QUEUED
    researcher_id = query(db_path, "SELECT id FROM annotators WHERE name = ?", [RESEARCHER])[0][0]
    assert query(db_path, "SELECT count(*) FROM jobs WHERE status = 'queued' AND created_by = ?",
                 [researcher_id])[0][0] == MAX_QUEUED
    execute(db_path, "UPDATE jobs SET status = 'cancelled' WHERE status = 'queued'")
    researcher.predict(blocker, api_name="/cancel_job")


def test_forged_forwarded_for_does_not_dodge_the_cap_on_new_names(app):
    """Attacks 4 and 5: X-Forwarded-For picks no address (no proxy is trusted by default), so
    the per-address cap on new annotator names holds. Last: it spends this address's hour."""
    url, data_dir = app
    refused = None
    for number in range(NAMES_PER_HOUR + 1):
        forged = gradio_client.Client(url, verbose=False, headers={"X-Forwarded-For": f"198.51.100.{number}"})
        before = count(data_dir, "annotators")
        try:
            forged.predict(f"Flood {number}", "", api_name="/sign_in")
        except AppError as exc:
            refused = exc
            assert count(data_dir, "annotators") == before
            break
    assert refused is not None and "Too many new names" in str(refused)
    assert integrity(data_dir / "arena.db") == "ok"


def test_job_errors_in_the_jobs_table_are_for_researchers_only(tmp_path):
    """Attack 6 on the jobs table (shown to every visitor): a failed job's error names paths."""
    from ui.train import jobs_html

    store = Store(tmp_path / "arena.db")
    job = job_rows.create_job(store.db, "generate", {})
    job_rows.finish_job(store.db, job, "failed", error="No model at /srv/secret/model")
    assert "/srv/secret" not in jobs_html(Settings(data_dir=tmp_path), store, None)
    assert "/srv/secret" not in jobs_html(Settings(data_dir=tmp_path), store, {"role": "annotator"})
    assert "/srv/secret" in jobs_html(Settings(data_dir=tmp_path), store, {"role": "researcher"})


def test_trusted_proxies_and_session_limits_are_settings(tmp_path):
    """Attacks 4 and 5: no proxy trusted by default; sign-ins expire; sessions are capped."""
    import argparse

    import gradio as gr

    from rlhf.settings import add_arguments, from_args
    from ui.app import build_ui

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--data-dir", str(tmp_path)]
    assert from_args(parser.parse_args(base), {}).trusted_proxies == ()
    chosen = from_args(parser.parse_args([*base, "--trusted-proxies", "10.0.0.0/8, 192.0.2.7"]), {})
    assert chosen.trusted_proxies == ("10.0.0.0/8", "192.0.2.7")
    with pytest.raises(ValueError, match="--trusted-proxies"):
        from_args(parser.parse_args([*base, "--trusted-proxies", "*"]), {})

    settings = from_args(parser.parse_args([*base, "--session-idle-minutes", "30", "--session-capacity", "200",
                                            "--max-upload-mb", "2"]), {})
    demo, launch_kwargs = build_ui(settings, settings.store())
    assert launch_kwargs["state_session_capacity"] == 200
    assert launch_kwargs["max_file_size"] == 2 * 1024 * 1024
    signed_in_state = [b for b in demo.blocks.values() if isinstance(b, gr.State) and b.time_to_live == 30 * 60]
    assert len(signed_in_state) == 1
