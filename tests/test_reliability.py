"""Reliability: the app killed with SIGKILL mid-burst, checkpoints that no longer load,
malformed uploads. Each checks what is stored afterwards, not only that nothing raised.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from bench.app_server import TINY_ARGS, query, running_app, wait_for, wait_for_pool
from rlhf.models import ModelLoadError
from rlhf.pool import fill_pool
from rlhf.runner import check_params
from storage import completions, models
from storage import jobs as job_rows
from storage.db import Store

gradio_client = pytest.importorskip("gradio_client")

SIGN_IN_KEY = 5  # index of the client key among /sign_in's outputs
VOTE_KEY = 4  # ... and among a vote's outputs
BURST_ANNOTATORS = 4
ACKS_BEFORE_KILL = 8


def _vote_until_the_app_dies(url: str, name: str, acknowledged: list[str], lock: threading.Lock) -> None:
    """Vote A on every pair served; a vote counts as acknowledged once its call returned."""
    client = gradio_client.Client(url, verbose=False)
    try:
        key = client.predict(name, "", api_name="/sign_in")[SIGN_IN_KEY]
        while key:
            outputs = client.predict(key, "", api_name="/vote_a")
            with lock:
                acknowledged.append(key)
            key = outputs[VOTE_KEY]
    except Exception:  # the server went away mid-call: that vote was never acknowledged
        return


def _is_job_process(pid: int) -> bool:
    try:
        return b"rlhf.jobs" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_kill_9_mid_burst_keeps_every_acknowledged_vote_and_restart_recovers(tmp_path):
    data_dir = tmp_path / "arena"
    db_path = data_dir / "arena.db"
    with running_app(data_dir, extra_args=TINY_ARGS) as (url, app):
        wait_for_pool(data_dir)
        # A long job (stories for every seed prompt) is running when the app dies.
        long_job = job_rows.create_job(Store(db_path).db, "generate", {"model_ids": [1], "prompts": None})
        wait_for(lambda: query(db_path, "SELECT status FROM jobs WHERE id = ?", [long_job])[0][0] == "running",
                 60, "the long job to start")

        acknowledged: list[str] = []
        lock = threading.Lock()
        voters = [threading.Thread(target=_vote_until_the_app_dies, args=(url, f"burst-{i}", acknowledged, lock),
                                   daemon=True) for i in range(BURST_ANNOTATORS)]
        for voter in voters:
            voter.start()
        wait_for(lambda: len(acknowledged) >= ACKS_BEFORE_KILL, 120, f"{ACKS_BEFORE_KILL} acknowledged votes")
        os.kill(app.pid, signal.SIGKILL)
        app.wait(timeout=10)
        for voter in voters:
            voter.join(timeout=30)
        with lock:
            acked = list(acknowledged)
        job_pid = query(db_path, "SELECT pid FROM jobs WHERE id = ?", [long_job])[0][0]

        stored = query(db_path, "SELECT client_key, count(*) FROM votes GROUP BY client_key")
        counts = dict(stored)
        assert all(counts.get(key) == 1 for key in acked), "an acknowledged vote was lost or doubled"
        assert all(n == 1 for n in counts.values())

        with running_app(data_dir, extra_args=TINY_ARGS) as (url_again, _):
            status, error = query(db_path, "SELECT status, error FROM jobs WHERE id = ?", [long_job])[0]
            assert status == "interrupted" and "stopped" in error
            assert not _is_job_process(job_pid), "the orphaned job process outlived the restart"
            fresh = gradio_client.Client(url_again, verbose=False).predict("after-restart", "", api_name="/sign_in")
            assert fresh[SIGN_IN_KEY], "no pair served after the restart"
            assert query(db_path, "SELECT count(*) FROM votes")[0][0] == len(counts)


def test_a_policy_whose_checkpoint_is_gone_is_skipped_not_fatal(arena_dir, capsys):
    settings, store = arena_dir
    broken = models.add_model(store.db, "broken", "local", path=str(settings.models_dir / "deleted"))
    damaged_folder = settings.models_dir / "damaged"
    damaged_folder.mkdir()
    (damaged_folder / "config.json").write_text("{ not json")
    damaged = models.add_model(store.db, "damaged", "local", path=str(damaged_folder))
    healthy = models.list_models(store.db)[0]
    before = completions.pool_sizes(store.db).get(healthy.id, 0)
    messages = []

    written = fill_pool(store, settings, [broken.id, damaged.id, healthy.id], settings.pool_prompts + 1,
                        lambda f, m: messages.append(m))

    sizes = completions.pool_sizes(store.db)
    assert written == 1 and sizes.get(healthy.id) == before + 1
    assert broken.id not in sizes and damaged.id not in sizes
    assert "skipped broken, damaged" in messages[-1]
    assert "warning: skipping policy broken" in capsys.readouterr().err


def test_a_pool_job_with_no_loadable_policy_fails_with_the_reason(arena_dir):
    settings, store = arena_dir
    broken = models.add_model(store.db, "broken", "local", path=str(settings.models_dir / "deleted"))
    with pytest.raises(ModelLoadError, match="No policy could be loaded.*does not exist"):
        fill_pool(store, settings, [broken.id], None, lambda f, m: None)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("stories.jsonl", b'{"text": "Once upon a time."}\n{"story": "no text field"}\n',
         "line 2 has no \"text\" field"),
        ("stories.jsonl", b'{"text": "fine"}\nnot json\n', "line 2 is not valid JSON"),
        ("stories.txt", b"\xff\xfe\x00binary", "looks binary"),
        ("stories.txt", "Caf\u00e9".encode("latin-1"), "not UTF-8"),
        ("stories.txt", b"", "is empty"),
        ("stories.csv", b"text\nOnce upon a time.\n", "must be .txt"),
    ],
)
def test_a_malformed_corpus_is_refused_before_a_job_is_queued(store, tmp_path, name, content, message):
    upload = tmp_path / name
    upload.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        check_params(store, "pretrain", {"corpus": {"file": str(upload)}})
    assert job_rows.list_jobs(store.db) == []


def test_a_well_formed_corpus_passes_the_check(store, tmp_path):
    upload = tmp_path / "stories.jsonl"
    upload.write_text("\n".join(json.dumps({"text": f"Story {i}."}) for i in range(3)), encoding="utf-8")
    check_params(store, "pretrain", {"corpus": {"file": str(upload)}})


def test_researchers_beyond_localhost_need_a_key_unless_they_sign_in_with_hugging_face(tmp_path):
    from app import check_exposure
    from tests.conftest import tiny_settings

    exposed = tiny_settings(tmp_path, host="0.0.0.0", researchers=frozenset({"rita"}))
    with pytest.raises(SystemExit, match="STORY_ARENA_RESEARCHER_KEY"):
        check_exposure(exposed)
    check_exposure(tiny_settings(tmp_path, host="127.0.0.1", researchers=frozenset({"rita"})))
    check_exposure(tiny_settings(tmp_path, host="0.0.0.0", researchers=frozenset({"rita"}), researcher_key="k"))
    check_exposure(tiny_settings(tmp_path, host="0.0.0.0", researchers=frozenset({"rita"}), hub_oauth=True))
