"""Multi-process training jobs: settings.train_processes > 1 launches a training job through
`accelerate launch` (2 CPU processes over gloo here); the result is registered once, the job
has one log, and a cancel stops every process."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench.app_server import wait_for
from rlhf import jobs
from rlhf.jobs import JobWorker, job_command, log_path
from rlhf.progress import JobCancelled, JobProgress
from rlhf.settings import add_arguments, from_args
from storage import jobs as job_rows
from storage import models
from tests.test_dpo import add_votes
from tests.test_jobs import _finished, _process_gone, worker_env  # noqa: F401 (worker_env: a fixture)
from tests.test_reward import TINY_PARAMS, _vote_longer
from ui.train import training_processes_text

# Two job processes each import torch, transformers and TRL on a busy 2-core box.
LAUNCH_TIMEOUT_S = 400
PROCESSES = 2


def _settings(**flags) -> object:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in flags.items()])
    return from_args(args, {})


def test_settings_take_processes_and_a_checked_accelerate_config(tmp_path):
    config = tmp_path / "cpu.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n")
    settings = _settings(data_dir=tmp_path, train_processes=3, accelerate_config=config)
    assert (settings.train_processes, settings.accelerate_config) == (3, config.resolve())
    assert (_settings(data_dir=tmp_path).train_processes, _settings(data_dir=tmp_path).accelerate_config) == (1, None)
    broken = tmp_path / "broken.yaml"
    broken.write_text("num_processes: 2\n")
    for flags, message in [
        ({"train_processes": 0}, "--train-processes must be between 1 and 1024"),
        ({"train_processes": "two"}, "--train-processes must be an integer"),
        ({"accelerate_config": tmp_path / "missing.yaml"}, "--accelerate-config"),
        ({"accelerate_config": broken}, "is not an accelerate config: A `distributed_type` must be specified"),
    ]:
        with pytest.raises(ValueError, match=message):
            from_args(argparse.Namespace(data_dir=tmp_path, **flags), {})


def test_only_training_jobs_are_launched_through_accelerate(tmp_path):
    plain = _settings(data_dir=tmp_path)
    two = dataclasses.replace(plain, train_processes=PROCESSES)
    config = tmp_path / "gpus.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 8\n")
    configured = dataclasses.replace(plain, accelerate_config=config)
    run = ["-m", "rlhf.jobs", "run", "7"]
    assert job_command(plain, {"id": 7, "kind": "dpo"}) == [sys.executable, *run]
    assert job_command(two, {"id": 7, "kind": "publish"}) == [sys.executable, *run]
    launch = job_command(two, {"id": 7, "kind": "dpo"})
    assert launch[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and launch[-4:] == run
    assert "--multi_gpu" in launch and launch[launch.index("--num_processes") + 1] == "2"
    # A config decides the processes itself unless --train-processes says otherwise.
    from_config = job_command(configured, {"id": 7, "kind": "reward"})
    assert from_config[3:5] == ["--config_file", str(config)] and "--num_processes" not in from_config


@pytest.fixture
def two_process_worker(arena_dir, worker_env):  # noqa: F811 (worker_env is the fixture)
    settings, store = arena_dir
    settings = dataclasses.replace(settings, train_processes=PROCESSES)
    worker = JobWorker(settings, poll_s=0.1)
    yield settings, store, worker
    worker.stop()


def _check_registered_once(settings, store, job_id: int, kind: str) -> models.ModelRecord:
    job = wait_for(lambda: _finished(store.db, job_id), LAUNCH_TIMEOUT_S, what=f"the 2-process {kind} job",
                   on_timeout=lambda: log_path(settings, job_id).read_text(errors="replace")[-4000:])
    wait_for(lambda: _process_gone(job["pid"]), 60, what="the launcher to exit")
    log = log_path(settings, job_id).read_text(errors="replace")
    assert job["status"] == "succeeded", f"{job['error']}\n{log[-4000:]}"
    assert "Traceback" not in log, log[-4000:]  # every process ended cleanly (a failed rank leaves one)
    made = [m for m in models.list_models(store.db) if m.job_id == job_id]
    assert [m.id for m in made] == [job["result_model_id"]] and made[0].kind == kind
    assert job_rows.recorded_results(store.db, job_id) == [made[0].id]
    assert Path(made[0].path).is_dir() and not list(Path(made[0].path).parent.glob(".model.*"))
    # One log for the job, which both processes wrote to; progress lines come from rank 0 alone.
    assert sorted(p.name for p in settings.jobs_dir.glob(f"job-{job_id}.*")) == [f"job-{job_id}.log"]
    assert log.count(f"training in {PROCESSES} processes (MULTI_CPU, backend gloo)") == 1
    assert log.count("[100.0%]") == 1
    return made[0]


def test_reward_job_in_two_processes_registers_once(two_process_worker):
    settings, store, worker = two_process_worker
    base, _ = _vote_longer(store, n=16)
    job_id = job_rows.create_job(store.db, "reward", {"base": base, **TINY_PARAMS, "max_steps": 4})
    worker.start()
    record = _check_registered_once(settings, store, job_id, "reward")
    assert record.metrics["steps"] == 4 and record.metrics["heldout"]["pairs"] > 0


def test_dpo_job_in_two_processes_registers_once(two_process_worker):
    settings, store, worker = two_process_worker
    add_votes(store)
    base = models.get_model_by_name(store.db, "tiny-t0.7")
    # max_minutes 0: no time budget, whose per-process clock could stop the ranks at different steps.
    job_id = job_rows.create_job(store.db, "dpo", {"base": base.id, "max_steps": 2, "eval_fraction": 0.3,
                                                   "max_minutes": 0})
    worker.start()
    record = _check_registered_once(settings, store, job_id, "dpo")
    assert record.parent_id == base.id and record.metrics["steps"] == 2 and record.metrics["heldout"]["pairs"] > 0


def _training_reward_job(settings, store, worker) -> tuple[int, list[int]]:
    """A 2-process reward job far longer than the test, once it trains: its id and processes."""
    base, _ = _vote_longer(store, n=16)
    job_id = job_rows.create_job(store.db, "reward", {"base": base, **TINY_PARAMS, "max_steps": 100_000})
    worker.start()
    training = wait_for(
        lambda: (j := job_rows.get_job(store.db, job_id))["status"] == "running" and "step" in (j["message"] or "")
        and j,
        LAUNCH_TIMEOUT_S, what="the 2-process job's first step",
        on_timeout=lambda: log_path(settings, job_id).read_text(errors="replace")[-4000:])
    processes = _job_processes(training["pid"])
    assert len(processes) >= 1 + PROCESSES  # the launcher and both ranks
    return job_id, processes


def _job_processes(pid: int) -> list[int]:
    """The launcher and every process below it (torch starts each rank in a session of its own)."""
    try:
        launcher = psutil.Process(pid)
        return [pid, *(child.pid for child in launcher.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def test_cancel_stops_every_process_of_a_two_process_job(two_process_worker):
    settings, store, worker = two_process_worker
    job_id, processes = _training_reward_job(settings, store, worker)
    assert job_rows.request_cancel(store.db, job_id) == "cancelling"
    job = wait_for(lambda: _finished(store.db, job_id), 60, what="the cancel to land")
    assert job["status"] == "cancelled" and "cancel" in job["error"]
    wait_for(lambda: all(_process_gone(p) for p in processes), 30, what="every process of the job to exit")
    assert not [m for m in models.list_models(store.db) if m.job_id == job_id]


def test_the_train_tab_tells_researchers_how_training_is_launched(tmp_path):
    plain = _settings(data_dir=tmp_path)
    assert "in one process" in training_processes_text(plain)
    assert "in 2 processes through accelerate launch (" in training_processes_text(
        dataclasses.replace(plain, train_processes=2))
    config = tmp_path / "<b>.yaml"
    text = training_processes_text(dataclasses.replace(plain, accelerate_config=config))
    assert "the config's processes through accelerate launch, config &lt;b&gt;.yaml" in text
    assert str(tmp_path) not in text  # the file's name, not where it lives on the server


def test_recover_after_an_app_crash_kills_every_process_of_a_two_process_job(two_process_worker, tmp_path,
                                                                            monkeypatch):
    """A new app's recover() finds the job still running and kills the launcher and both ranks.
    Torch starts each rank in a session of its own, so killing the launcher's group alone would
    leave them running: here the ranks only sleep (no collective to fail when the launcher dies)."""
    settings, store, worker = two_process_worker
    sleeper = tmp_path / "sleeping_rank.py"
    sleeper.write_text("import time\nfrom accelerate import PartialState\n\n"
                       "PartialState(cpu=True)\ntime.sleep(600)\n")
    real_popen = subprocess.Popen

    def popen(command, **kwargs):
        if "accelerate.commands.launch" in command:
            at = command.index("rlhf.jobs")
            command = [*command[:at - 1], str(sleeper), *command[at:]]  # its args name the job, as recover checks
        return real_popen(command, **kwargs)

    monkeypatch.setattr(jobs.subprocess, "Popen", popen)
    job_id = job_rows.create_job(store.db, "reward", {})
    worker.start()
    running = wait_for(lambda: (j := job_rows.get_job(store.db, job_id))["pid"] and j, 60, what="the launcher")
    processes = wait_for(lambda: len(found := _job_processes(running["pid"])) >= 1 + PROCESSES and found, 120,
                         what="both ranks")
    assert not any(_process_gone(p) for p in processes)

    assert JobWorker(settings).recover() == [job_id]  # what a restarted app does first
    wait_for(lambda: all(_process_gone(p) for p in processes), 5, what="every process of the job to die")
    assert job_rows.get_job(store.db, job_id)["status"] == "interrupted"


def test_other_processes_of_a_job_write_no_progress(arena_dir):
    settings, store = arena_dir
    job_id = job_rows.create_job(store.db, "reward", {})
    job_rows.claim_next_job(store.db)
    other = JobProgress(settings, job_id, main_process=False)
    other(0.5, "step 1/2")
    other.log_metrics(1, {"loss": 0.5})
    assert (job_rows.get_job(store.db, job_id)["progress"], other.metrics_path.exists()) == (0.0, False)
    main = JobProgress(settings, job_id)
    main(0.5, "step 1/2")
    main.log_metrics(1, {"loss": 0.5})
    assert (job_rows.get_job(store.db, job_id)["progress"], main.metrics_path.exists()) == (0.5, True)


def test_a_signal_nobody_asked_for_leaves_the_job_interrupted_not_cancelled(arena_dir, monkeypatch):
    """The launcher stops the main process when another process failed (or the app stops):
    not a researcher's cancel."""
    settings, store = arena_dir

    def stopped(settings, params, progress):
        raise JobCancelled()

    monkeypatch.setitem(jobs.BUILTIN_KINDS, "stopped", stopped)
    job_id = job_rows.create_job(store.db, "stopped", {})
    job_rows.claim_next_job(store.db)
    job = jobs.execute(settings, job_id)
    assert job["status"] == "interrupted" and "stopped before it finished" in job["error"]
