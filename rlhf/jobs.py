"""Background jobs: a worker thread in the app runs each queued job in its own subprocess.

A subprocess per job means a crash, an out-of-memory kill or a cancel never takes the UI
down, and GPU memory is returned when it exits. Progress and status live in the jobs
table; each job's output goes to its own log file under <data dir>/jobs/.

Run one job by hand: `python -m rlhf.jobs run JOB_ID --data-dir DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf.progress import JobCancelled, JobProgress, is_main_process, join_job_processes
from rlhf.runner import KIND_MODULES, is_training_kind
from rlhf.settings import Settings, add_arguments, from_args, job_environment, job_settings
from storage import jobs as job_rows
from storage.db import Store
from storage.models import ModelRecord

CANCEL_GRACE_S = 5.0
# A job returns the model it made, a dict of results (stored as the job's metrics), or None.
JobFunction = Callable[[Settings, dict, Callable[[float, str], None]], ModelRecord | dict | None]


def _prepare_job(settings: Settings, params: dict, progress) -> None:
    from rlhf.metrics import measure_new_stories, measure_policies
    from rlhf.prepare import prepare

    store = settings.store()
    policies = prepare(store, settings, progress)
    measure_new_stories(store)
    measure_policies(store, settings, [p.id for p in policies])


def _generate_job(settings: Settings, params: dict, progress) -> None:
    """Write the missing stories and score each batch with the newest reward model (if
    any) as soon as it is stored, so the first votes on them already record its prediction;
    each batch also gets its automatic metrics, and each policy its perplexity at the end."""
    from rlhf.metrics import measure_new_stories, measure_policies
    from rlhf.pool import fill_pool
    from rlhf.scoring import score_new_completions

    store = settings.store()

    def after_batch(model_id: int) -> None:
        score_new_completions(store, settings, model_id)
        measure_new_stories(store, model_id)

    fill_pool(store, settings, params["model_ids"], params.get("prompts"), progress, after_batch=after_batch)
    measure_policies(store, settings, params["model_ids"])


def _publish_job(settings: Settings, params: dict, progress) -> dict:
    from rlhf.hub import publish_preferences

    return publish_preferences(settings.store(), settings, params.get("repo") or settings.hub_dataset,
                               progress=progress)


def _push_job(settings: Settings, params: dict, progress) -> dict:
    from rlhf.hub import push_model

    return push_model(settings.store(), settings, params["model_id"], params["repo"], progress=progress)


# Hub uploads are jobs too: a slow or failing upload never holds up a vote.
BUILTIN_KINDS: dict[str, JobFunction] = {
    "prepare": _prepare_job, "generate": _generate_job, "publish": _publish_job, "push": _push_job,
}


def job_function(kind: str) -> JobFunction:
    """A built-in job, or a training kind run through rlhf.runner (which owns its life)."""
    if kind in BUILTIN_KINDS:
        return BUILTIN_KINDS[kind]
    if is_training_kind(kind):
        from rlhf.runner import train

        return lambda settings, params, progress: train(settings, kind, params, progress)
    raise ValueError(f"Unknown job kind {kind!r}.")


def log_path(settings: Settings, job_id: int) -> Path:
    return settings.jobs_dir / f"job-{job_id}.log"


def execute(settings: Settings, job_id: int) -> dict | None:
    """Run a claimed (status running) job in this process and record how it ended.

    In a multi-process (accelerate) training job every process trains, but only the main
    one writes the job row; the others return None, and an error in one of them ends it
    with its traceback in the log (the launcher then stops the rest).
    """
    store = settings.store()
    db = store.db
    job = job_rows.get_job(db, job_id)
    if is_training_kind(job["kind"]):
        join_job_processes(settings)
        if not is_main_process():
            job_function(job["kind"])(settings, job["params"], JobProgress(settings, job_id, main_process=False))
            return None
    progress = JobProgress(settings, job_id)
    try:
        result = job_function(job["kind"])(settings, job["params"], progress)
    except JobCancelled:
        if job_rows.get_job(db, job_id)["status"] == "cancelling":
            job_rows.finish_job(db, job_id, "cancelled", error="cancelled by a researcher")
        else:  # a signal nobody asked for: the app stopping, or the launcher after another process failed
            job_rows.finish_job(db, job_id, "interrupted",
                                error="the job process was stopped before it finished (see its log)")
    except Exception as exc:
        traceback.print_exc()
        job_rows.finish_job(db, job_id, "failed", error=f"{type(exc).__name__}: {exc}")
    else:
        model = result if isinstance(result, ModelRecord) else None
        job_rows.finish_job(
            db, job_id, "succeeded",
            result_model_id=model.id if model else None,
            metrics=model.metrics if model else result,
        )
    return job_rows.get_job(db, job_id)


def run_inline(settings: Settings, kind: str, params: dict, created_by: int | None = None) -> dict:
    """Create a job and run it in this process (the CLI's synchronous path)."""
    db = settings.store().db
    job_id = job_rows.create_job(db, kind, params, created_by)
    job_rows.update_job(db, job_id, status="running", started_at=time.time(), pid=os.getpid())
    return execute(settings, job_id)


def _signal_job_processes(pid: int, signum: int) -> None:
    """Signal a job's process group and every process below it: a job process starts in its
    own session, but `accelerate launch` (torch's elastic agent) starts each rank in yet
    another one, so the group alone would leave the ranks running after a SIGKILL."""
    import psutil

    try:
        launcher = psutil.Process(pid)
        processes = [launcher, *launcher.children(recursive=True)]
    except psutil.NoSuchProcess:
        processes = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


def _is_job_process(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return b"rlhf.jobs" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# Lanes of the JobWorker: heavy jobs (training) run one at a time; light jobs (publish, push,
# story pools, prepare) run beside them, settings.light_jobs at once, so an upload or the
# pool of a new policy never waits behind an hour of training.
HEAVY, LIGHT = "heavy", "light"
HEAVY_KINDS = frozenset(KIND_MODULES)  # every training kind; known without importing any of them


def job_lane(kind: str) -> str:
    """The lane a job of this kind runs in; kinds not declared heavy (even unknown ones) are light."""
    return HEAVY if kind in HEAVY_KINDS else LIGHT


def job_command(settings: Settings, job: dict) -> list[str]:
    """The command line of a job's process: `python -m rlhf.jobs run ID`, or for a training
    job with settings.train_processes > 1 or an accelerate config, that module under
    `accelerate launch`. Without a config, --multi_gpu is what starts N processes (on a
    machine without GPUs they train on the CPU and talk over gloo); a config file says
    everything itself (multi-node, DeepSpeed, FSDP), its num_processes unless
    --train-processes is given."""
    run = ["-m", "rlhf.jobs", "run", str(job["id"])]
    if job_lane(job["kind"]) == LIGHT or (settings.train_processes == 1 and settings.accelerate_config is None):
        return [sys.executable, *run]
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if settings.accelerate_config is not None:
        launch += ["--config_file", str(settings.accelerate_config)]
    else:
        launch += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if settings.train_processes > 1:
        launch += ["--num_processes", str(settings.train_processes)]
    return [*launch, *run]


@dataclass
class RunningJob:
    """A job process the worker started and watches."""

    job_id: int
    proc: subprocess.Popen
    term_sent_at: float | None = None


class JobWorker:
    """Runs queued jobs, each as `python -m rlhf.jobs run ID`, in two lanes (see job_lane):
    one heavy job at a time, and up to settings.light_jobs light jobs beside it."""

    def __init__(self, settings: Settings, poll_s: float = 0.5):
        self.settings = settings
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-worker", daemon=True)
        self._capacity = {HEAVY: 1, LIGHT: settings.light_jobs}
        self._running: dict[str, list[RunningJob]] = {lane: [] for lane in self._capacity}
        from rlhf.hub import PublishSchedule

        self._publish_schedule = PublishSchedule(settings)

    def start(self) -> "JobWorker":
        self.recover()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def recover(self) -> list[int]:
        """Mark jobs left running by a dead app as interrupted (ending stray job processes)."""
        db = Store(self.settings.db_path).db
        interrupted = []
        for job in job_rows.running_jobs(db):
            if _is_job_process(job["pid"]):
                _signal_job_processes(job["pid"], signal.SIGKILL)
            job_rows.finish_job(db, job["id"], "interrupted", error="the app stopped while this job ran")
            interrupted.append(job["id"])
        return interrupted

    def _claim(self, db, lane: str) -> dict | None:
        return job_rows.claim_next_job(db, HEAVY_KINDS, other_kinds=lane == LIGHT)

    def _spawn(self, job: dict) -> RunningJob | None:
        """Start the job's process in a session of its own (so a cancel can signal all it
        started, and a signal to the app does not reach it); every process of a multi-process
        job appends to the one log."""
        self.settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        path = log_path(self.settings, job["id"])
        command = job_command(self.settings, job)
        environment = {**os.environ, **job_environment(self.settings)}
        db = Store(self.settings.db_path).db
        try:
            with path.open("ab") as log:
                proc = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent,
                    env=environment, start_new_session=True,
                )
        except OSError as exc:
            job_rows.finish_job(db, job["id"], "failed", error=f"could not start the job process: {exc}")
            return None
        job_rows.update_job(db, job["id"], pid=proc.pid, log_path=str(path))
        return RunningJob(job["id"], proc)

    def _watch(self, db, running: RunningJob) -> bool:
        """Cancel the job's process when asked, record how it ended; True once it exited."""
        code = running.proc.poll()
        job = job_rows.get_job(db, running.job_id)
        if code is None:
            if job["status"] == "cancelling":
                now = time.time()
                if running.term_sent_at is None:
                    _signal_job_processes(running.proc.pid, signal.SIGTERM)
                    running.term_sent_at = now
                elif now - running.term_sent_at > CANCEL_GRACE_S:
                    _signal_job_processes(running.proc.pid, signal.SIGKILL)
            return False
        if job["status"] in job_rows.ACTIVE:
            if job["status"] == "cancelling":
                job_rows.finish_job(db, running.job_id, "cancelled", error="cancelled by a researcher")
            else:
                job_rows.finish_job(db, running.job_id, "failed", error=f"the job process exited with code {code}")
        return True

    def _step(self, db) -> None:
        """One pass over the lanes: watch what runs, then start queued jobs where a lane has room."""
        for lane, running in self._running.items():
            running[:] = [job for job in running if not self._watch(db, job)]
            while len(running) < self._capacity[lane] and (job := self._claim(db, lane)) is not None:
                if (started := self._spawn(job)) is not None:
                    running.append(started)

    def _loop(self) -> None:
        """Each pass: the publishing schedule, the lanes, then the training round (rlhf.rounds)."""
        from rlhf import rounds

        store = Store(self.settings.db_path)
        while not self._stop.is_set():
            try:
                self._publish_schedule.tick(store)
                self._step(store.db)
            except Exception:
                traceback.print_exc()
            try:  # apart: a round that cannot advance never holds up the jobs
                rounds.tick(store)
            except Exception:
                traceback.print_exc()
            self._stop.wait(self.poll_s)
        for running in self._running.values():
            for job in running:
                if job.proc.poll() is None:
                    _signal_job_processes(job.proc.pid, signal.SIGTERM)


def _raise_cancelled(signum, frame) -> None:
    raise JobCancelled()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.jobs", description="Run one queued job.")
    parser.add_argument("command", choices=["run"])
    parser.add_argument("job_id", type=int)
    add_arguments(parser)
    args = parser.parse_args(argv)
    settings = job_settings(os.environ) or from_args(args, os.environ)
    signal.signal(signal.SIGTERM, _raise_cancelled)
    job = execute(settings, args.job_id)
    return 0 if job is None or job["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
