"""rlhf/jobs.py: the JobWorker runs queued jobs in subprocesses, in two lanes, cancels and recovers them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.app_server import wait_for
from rlhf import jobs, pool
from rlhf.jobs import HEAVY, LIGHT, JobWorker, job_lane
from rlhf.models import generation_dtype
from rlhf.pool import fill_pool
from rlhf.progress import JobProgress
from rlhf.runner import KIND_MODULES
from rlhf.settings import add_arguments, from_args
from storage import completions, models
from storage import jobs as job_rows
from tests.conftest import clean_env
from ui.train import CURVE_HEIGHT, CURVE_MAX_POINTS, CURVE_WIDTH, jobs_html

JOB_TIMEOUT_S = 120  # a job process pays torch + transformers imports: slow on a busy 2-core box


@pytest.fixture
def worker_env(monkeypatch):
    """Job processes inherit this process's environment: keep it offline and settings-free."""
    for key in list(os.environ):
        if key.startswith("STORY_ARENA_"):
            monkeypatch.delenv(key)
    for key, value in clean_env().items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)


@pytest.fixture
def worker(arena_dir, worker_env):
    settings, _ = arena_dir
    w = JobWorker(settings, poll_s=0.1)
    yield w
    w.stop()


# Kinds known only to these tests: the worker gives them a job process that sleeps until ended.
SLEEPY_TRAINING, SLEEPY_LIGHT = "sleepy-training", "sleepy-light"


@pytest.fixture
def sleepy_kinds(arena_dir, monkeypatch):
    """Declare SLEEPY_TRAINING heavy; the job process of either sleepy kind just sleeps, so a
    test holds a lane busy for as long as it likes without paying for any training."""
    settings, _ = arena_dir
    monkeypatch.setattr(jobs, "HEAVY_KINDS", jobs.HEAVY_KINDS | {SLEEPY_TRAINING})
    real_popen = subprocess.Popen

    def popen(command, **kwargs):
        if "rlhf.jobs" in command:
            job = job_rows.get_job(settings.store().db, int(command[command.index("run") + 1]))
            if job["kind"] in (SLEEPY_TRAINING, SLEEPY_LIGHT):
                command = [sys.executable, "-c", f"import time; time.sleep({10 * JOB_TIMEOUT_S})"]
        return real_popen(command, **kwargs)

    monkeypatch.setattr(jobs.subprocess, "Popen", popen)


def _policy(store, name: str, max_new_tokens: int) -> models.ModelRecord:
    """A new policy on the tiny model's weights, with no stories yet."""
    starter = models.list_models(store.db)[0]
    return models.add_model(store.db, name, "local", path=starter.path,
                            decoding={"temperature": 1.0, "max_new_tokens": max_new_tokens})


def _finished(db, job_id: int):
    job = job_rows.get_job(db, job_id)
    return job if job["status"] in job_rows.FINISHED else None


def _process_gone(pid: int) -> bool:
    """Exited: no /proc entry any more, or a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def test_generate_job_runs_in_a_subprocess(arena_dir, worker):
    settings, store = arena_dir
    db = store.db
    policy = _policy(store, "tiny-new", max_new_tokens=8)
    job_id = job_rows.create_job(db, "generate", {"model_ids": [policy.id], "prompts": 3})
    worker.start()
    job = wait_for(lambda: _finished(db, job_id), JOB_TIMEOUT_S, what="the generate job")

    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == 1.0 and job["error"] is None and job["finished_at"] >= job["started_at"]
    assert job["pid"] and job["pid"] != os.getpid()  # it ran in its own process
    assert completions.pool_sizes(db)[policy.id] == 3
    texts = [r["text"] for r in db.query("SELECT text FROM completions WHERE model_id = ?", [policy.id])]
    assert len(texts) == 3 and all(t.strip() for t in texts)
    log = Path(job["log_path"])
    assert log.is_file() and log.parent == settings.jobs_dir
    assert "3/3 stories written" in log.read_text(errors="replace")  # the progress, as it went


def test_unknown_kind_fails_and_the_worker_goes_on(arena_dir, worker):
    settings, store = arena_dir
    db = store.db
    policy = _policy(store, "tiny-next", max_new_tokens=8)
    bad = job_rows.create_job(db, "no-such-kind", {})
    good = job_rows.create_job(db, "generate", {"model_ids": [policy.id], "prompts": 1})
    worker.start()
    failed = wait_for(lambda: _finished(db, bad), JOB_TIMEOUT_S, what="the unknown job")
    assert failed["status"] == "failed"
    assert "no-such-kind" in failed["error"]
    assert "no-such-kind" in Path(failed["log_path"]).read_text(errors="replace")  # traceback logged

    done = wait_for(lambda: _finished(db, good), JOB_TIMEOUT_S, what="the next job")
    assert done["status"] == "succeeded", done["error"]
    assert completions.pool_sizes(db)[policy.id] == 1


def test_cancel_a_running_job(arena_dir, worker):
    settings, store = arena_dir
    db = store.db
    # Every one of the seed prompts in small batches: far longer than the test waits.
    policy = _policy(store, "tiny-long", max_new_tokens=32)
    total = db["prompts"].count
    job_id = job_rows.create_job(db, "generate", {"model_ids": [policy.id], "prompts": None})
    worker.start()
    # Wait until it is really writing stories (first batch stored), then cancel.
    running = wait_for(
        lambda: (j := job_rows.get_job(db, job_id))["status"] == "running" and j["progress"] > 0 and j,
        JOB_TIMEOUT_S, what="the job's first progress report")
    pid = running["pid"]
    assert pid and not _process_gone(pid)

    assert job_rows.request_cancel(db, job_id) == "cancelling"
    job = wait_for(lambda: _finished(db, job_id), 10, what="the cancel to land")
    assert job["status"] == "cancelled"
    assert "cancel" in (job["error"] or "")
    wait_for(lambda: _process_gone(pid), 15, what="the job process to exit")
    written = completions.pool_sizes(db).get(policy.id, 0)
    assert 0 < written < total
    # Nothing more is written after the cancel.
    assert completions.pool_sizes(db).get(policy.id, 0) == written


def _running(db, job_id: int):
    job = job_rows.get_job(db, job_id)
    return job if job["status"] == "running" and job["pid"] else None


def test_training_kinds_are_heavy_and_the_rest_light():
    assert {job_lane(kind) for kind in KIND_MODULES} == {HEAVY}
    assert {job_lane(kind) for kind in ("prepare", "generate", "publish", "push", "no-such-kind")} == {LIGHT}


def test_light_jobs_setting():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_args(parser.parse_args([]), {}).light_jobs == 1
    assert from_args(parser.parse_args(["--light-jobs", "3"]), {}).light_jobs == 3
    assert from_args(parser.parse_args([]), {"STORY_ARENA_LIGHT_JOBS": "2"}).light_jobs == 2
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match="--light-jobs"):
            from_args(parser.parse_args([]), {"STORY_ARENA_LIGHT_JOBS": bad})


def test_a_light_job_finishes_while_training_runs(arena_dir, worker, sleepy_kinds):
    """A story pool queued behind a training job is written while it trains; a second
    training job waits for the first, and starts once that one is cancelled."""
    settings, store = arena_dir
    db = store.db
    first = job_rows.create_job(db, SLEEPY_TRAINING, {})
    second = job_rows.create_job(db, SLEEPY_TRAINING, {})
    policy = _policy(store, "tiny-beside", max_new_tokens=8)
    pool = job_rows.create_job(db, "generate", {"model_ids": [policy.id], "prompts": 2})
    worker.start()

    done = wait_for(lambda: _finished(db, pool), JOB_TIMEOUT_S, what="the pool job beside the training job")
    assert done["status"] == "succeeded", done["error"]
    assert completions.pool_sizes(db)[policy.id] == 2
    training = _running(db, first)
    assert training and not _process_gone(training["pid"])  # it trained all along
    assert job_rows.get_job(db, second)["status"] == "queued"  # one heavy job at a time

    job_rows.request_cancel(db, first)
    assert wait_for(lambda: _finished(db, first), 30, what="the cancel")["status"] == "cancelled"
    wait_for(lambda: _process_gone(training["pid"]), 15, what="the training process to exit")
    next_training = wait_for(lambda: _running(db, second), 30, what="the next training job")
    job_rows.request_cancel(db, second)
    assert wait_for(lambda: _finished(db, second), 30, what="the second cancel")["status"] == "cancelled"
    wait_for(lambda: _process_gone(next_training["pid"]), 15, what="the second training process to exit")
    assert {Path(job_rows.get_job(db, j)["log_path"]) for j in (first, second, pool)} == {
        jobs.log_path(settings, j) for j in (first, second, pool)}  # a log per job


@pytest.mark.parametrize("light_jobs", [1, 2])
def test_light_lane_runs_at_most_its_bound(arena_dir, worker_env, sleepy_kinds, light_jobs):
    settings, store = arena_dir
    db = store.db
    training = job_rows.create_job(db, SLEEPY_TRAINING, {})
    light = [job_rows.create_job(db, SLEEPY_LIGHT, {}) for _ in range(3)]
    worker = JobWorker(dataclasses.replace(settings, light_jobs=light_jobs), poll_s=0.1).start()
    try:
        wait_for(lambda: _running(db, training) and all(_running(db, j) for j in light[:light_jobs]), 30,
                 what="the training job and the first light jobs to start")
        job_rows.request_cancel(db, light[0])
        wait_for(lambda: _finished(db, light[0]), 30, what="the cancel of a light job")
        wait_for(lambda: _running(db, light[light_jobs]), 30, what="the next light job to take its place")
        statuses = [job_rows.get_job(db, j)["status"] for j in light]
        assert statuses == ["cancelled", "running", "queued" if light_jobs == 1 else "running"]
        assert _running(db, training)  # the training lane was never touched
    finally:
        for job_id in (training, *light):
            job_rows.request_cancel(db, job_id)
        wait_for(lambda: all(_finished(db, j) for j in (training, *light)), 30, what="every job to end")
        worker.stop()


def test_recover_marks_orphaned_jobs_interrupted(arena_dir, worker_env):
    settings, store = arena_dir
    db = store.db
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphans = [job_rows.create_job(db, kind, {}) for kind in ("generate", "dpo")]  # one per lane
    for orphan in orphans:
        job_rows.claim_next_job(db)
        job_rows.update_job(db, orphan, pid=dead.pid)
    waiting = job_rows.create_job(db, "generate", {})

    recovered = JobWorker(settings).recover()
    assert recovered == orphans
    for orphan in orphans:
        job = job_rows.get_job(db, orphan)
        assert job["status"] == "interrupted" and job["error"] and job["finished_at"]
    assert job_rows.get_job(db, waiting)["status"] == "queued"  # queued work is kept
    assert JobWorker(settings).recover() == []


def test_recover_ends_a_stray_job_process(arena_dir, worker_env):
    settings, store = arena_dir
    db = store.db
    # Looks like a job process (its command line names rlhf.jobs) left by a dead app.
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "rlhf.jobs"])
    try:
        job_id = job_rows.create_job(db, "generate", {})
        job_rows.claim_next_job(db)
        job_rows.update_job(db, job_id, pid=stray.pid)
        job_rows.request_cancel(db, job_id)  # 'cancelling' jobs are orphans too
        assert JobWorker(settings).recover() == [job_id]
        assert stray.wait(timeout=10) != 0
        assert job_rows.get_job(db, job_id)["status"] == "interrupted"
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


def test_each_stored_batch_is_handed_on_at_once(arena_dir):
    """The generate job scores each batch as it lands (after_batch), not after the pool."""
    settings, store = arena_dir
    policy = models.get_model_by_name(store.db, "tiny-t0.7")

    def stored() -> int:
        return store.db.execute("SELECT count(*) FROM completions WHERE model_id = ?", [policy.id]).fetchone()[0]

    before = stored()
    seen = []
    small_batches = dataclasses.replace(settings, generation_batch_size=2, max_new_tokens=8)
    written = fill_pool(store, small_batches, [policy.id], settings.pool_prompts + 4, lambda f, m: None,
                        after_batch=lambda model_id: seen.append((model_id, stored())))
    assert written == 4
    assert seen == [(policy.id, before + 2), (policy.id, before + 4)]


def test_policies_sharing_weights_write_each_batch_in_one_call(arena_dir, monkeypatch):
    """The starter's two decodings write together (one generate call a batch, each row with its
    own policy's decoding); `only` keeps the pool job to the prompts it names."""
    settings, store = arena_dir
    db = store.db
    policies = [models.get_model_by_name(db, name) for name in ("tiny-t0.7", "tiny-t1.0")]
    calls = []

    def counted_rows(model, tokenizer, texts, decodings, max_new_tokens, seed=None):
        calls.append(sorted({d.temperature for d in decodings}))
        assert model.dtype == generation_dtype(torch.device("cpu"))  # the fast dtype, where the CPU has one
        return real_rows(model, tokenizer, texts, decodings, max_new_tokens, seed)

    def no_single_calls(*args, **kwargs):
        raise AssertionError("a policy sharing weights wrote on its own")

    real_rows = pool.generate_rows
    monkeypatch.setattr(pool, "generate_rows", counted_rows)
    monkeypatch.setattr(pool, "generate_stories", no_single_calls)
    small_batches = dataclasses.replace(settings, generation_batch_size=2, max_new_tokens=8)
    ids = [p.id for p in policies]
    new_prompts = [r["id"] for r in completions.prompts_without_completion(db, ids[0], settings.pool_prompts + 3)]
    assert fill_pool(store, small_batches, ids, settings.pool_prompts + 3, lambda f, m: None,
                     only=set(new_prompts[:1])) == 2
    assert fill_pool(store, small_batches, ids, settings.pool_prompts + 3, lambda f, m: None) == 4
    assert calls == [[0.7, 1.0]] * 2  # the first pair's call, then the two left in one batch
    for policy in policies:
        stored = {c["prompt_id"]: json.loads(c["gen_params"]) for c in db.query(
            "SELECT prompt_id, gen_params FROM completions WHERE model_id = ?", [policy.id])}
        assert set(new_prompts) <= set(stored)
        assert {stored[i]["temperature"] for i in new_prompts} == {policy.decoding["temperature"]}


def test_generation_falls_back_to_float32_without_native_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert generation_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert generation_dtype(torch.device("cpu")) == torch.bfloat16


def test_the_jobs_table_shows_each_jobs_lane_and_curve(arena_dir):
    """Every row names its job's lane and draws its logged curve (loss; reward for RLOO); no curve, no plot."""
    settings, store = arena_dir
    db = store.db
    dpo, rloo, pool = (job_rows.create_job(db, kind, {}) for kind in ("dpo", "rloo", "generate"))
    for step in range(1, 501):
        JobProgress(settings, dpo).log_metrics(step, {"loss": 1 / step})
    JobProgress(settings, dpo).log_metrics(501, {"loss": float("nan")})  # a diverged step is left out
    for step, reward in ((1, -0.5), (2, 0.25)):
        JobProgress(settings, rloo).log_metrics(step, {"loss": 0.0, "reward": reward})

    rows = {int(row.split("</td>", 1)[0]): row for row in jobs_html(settings, store).split("<tr><td>")[1:]}
    assert "<svg" not in rows[pool]
    assert [f"<td>{lane}</td>" in rows[job] for job, lane in ((dpo, HEAVY), (rloo, HEAVY), (pool, LIGHT))] == [True] * 3
    assert "loss: 1 at step 1 to 0.002 at step 500" in rows[dpo]
    assert "reward: -0.5 at step 1 to 0.25 at step 2" in rows[rloo]
    dpo_line = re.search(r'points="([^"]+)"', rows[dpo]).group(1).split()
    assert len(dpo_line) <= CURVE_MAX_POINTS + 1
    assert dpo_line[0] == "0.0,0.0" and dpo_line[-1] == f"{CURVE_WIDTH:.1f},{CURVE_HEIGHT:.1f}"  # falls
    assert re.search(r'points="0.0,36.0 160.0,0.0"', rows[rloo])  # rises
