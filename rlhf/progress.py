"""Job progress without heavy imports: the job runner and the CLI start fast with it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rlhf.settings import Settings
from storage import jobs as job_rows


class JobCancelled(Exception):
    """Raised inside a job when a researcher cancels it."""


def is_main_process() -> bool:
    """True in a plain process and on rank 0 of an `accelerate launch`: only the main
    process writes job rows and registers models, so a multi-process job does it once."""
    from accelerate import PartialState

    return PartialState().is_main_process


def join_job_processes(settings: Settings) -> None:
    """Join the other processes of an `accelerate launch` (nothing to join in a plain process)
    before anything asks is_main_process: PartialState keeps its first set-up for the whole
    process, and processes on CPU only find each other (over gloo) when it is told cpu=True.
    The main process says in the job's log how many processes train."""
    from accelerate import PartialState

    from rlhf.models import resolve_device

    state = PartialState(cpu=resolve_device(settings.device).type == "cpu")
    if state.num_processes > 1 and state.is_main_process:
        print(f"training in {state.num_processes} processes ({state.distributed_type.value}, "
              f"backend {state.backend})", file=sys.stderr, flush=True)


class JobProgress:
    """Progress of one job: a callable `progress(fraction, message)` plus its files.

    Calling it writes the job row (and raises JobCancelled once the job was cancelled);
    `log_metrics` appends a line to the job's metrics file, which the Jobs tab plots.
    Used with job_id=None (no row) by code that runs outside a job, e.g. benchmarks.
    The other processes of a multi-process job (main_process False) write nothing, not
    even the log line, so the row, the metrics file and the log get each report once; a
    cancel reaches them as a signal.
    """

    def __init__(self, settings: Settings, job_id: int | None, main_process: bool = True):
        self.settings = settings
        self.job_id = job_id
        self.main_process = main_process
        self._db = settings.store().db if job_id is not None and main_process else None

    def __call__(self, fraction: float, message: str) -> None:
        if not self.main_process:
            return
        print(f"[{fraction:6.1%}] {message}", file=sys.stderr, flush=True)
        if self._db is not None and not job_rows.report_progress(self._db, self.job_id, fraction, message):
            raise JobCancelled()

    @property
    def metrics_path(self) -> Path:
        return metrics_path(self.settings, self.job_id)

    def log_metrics(self, step: int, values: dict) -> None:
        if self.job_id is None or not self.main_process:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as out:
            out.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")


def metrics_path(settings: Settings, job_id: int | None) -> Path:
    return settings.jobs_dir / f"job-{job_id}-metrics.jsonl"


def read_metrics(settings: Settings, job_id: int) -> list[dict]:
    path = metrics_path(settings, job_id)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
