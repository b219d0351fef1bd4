"""Start the real app (`python app.py`) in a subprocess, for end-to-end tests and benches.

Not a bench itself; it lives here so benches never import tests (tests import it from here). Usage:

    with running_app(tmp_dir, env={"STORY_ARENA_RESEARCHERS": "rita"}, extra_args=TINY_ARGS) as (url, proc):
        ...

The app runs in its own process group, so the background job subprocesses it spawns
are ended with it. Its output goes to <data_dir>/app.log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
# A tiny random GPT-2 and a six-prompt pool: the whole arena is ready in well under a minute.
# Tests vote at machine speed from one address: the abuse controls are off here and
# tested on their own in tests/test_rate_limits.py.
ABUSE_CONTROLS_OFF = ("--min-vote-seconds", "0", "--annotator-votes-per-minute", "0", "--ip-votes-per-minute", "0")
TINY_ARGS = ("--starter", "tiny", "--pool-prompts", "6", *ABUSE_CONTROLS_OFF)
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.25,
             on_timeout: Callable[[], str] | None = None) -> T:
    """Poll `predicate` until it returns something truthy; return that, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{on_timeout()}" if on_timeout else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


def query(db_path: Path, sql: str, params: Sequence | Mapping = ()) -> list[tuple]:
    """Rows from the app's SQLite file, read with a fresh connection (WAL allows it)."""
    conn = sqlite3.connect(str(db_path), timeout=15)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def execute(db_path: Path, sql: str, params: Sequence | Mapping = ()) -> int:
    """Run one write statement on the app's database; returns the affected row count."""
    conn = sqlite3.connect(str(db_path), timeout=15)
    try:
        with conn:
            return conn.execute(sql, params).rowcount
    finally:
        conn.close()


def pool_ready(db_path: Path) -> bool:
    """True once the first-start preparation job has succeeded (every starter story written)."""
    if not db_path.exists():
        return False
    try:
        rows = query(db_path, "SELECT status, error FROM jobs WHERE kind = 'prepare' ORDER BY id DESC LIMIT 1")
    except sqlite3.OperationalError:  # the schema is not there yet
        return False
    if rows and rows[0][0] in ("failed", "cancelled", "interrupted"):
        raise AssertionError(f"the prepare job ended {rows[0][0]}: {rows[0][1]}")
    return bool(rows) and rows[0][0] == "succeeded"


def wait_for_pool(data_dir: Path, timeout: float = 300.0) -> None:
    data_dir = Path(data_dir)
    wait_for(
        lambda: pool_ready(data_dir / "arena.db"), timeout, "the prepare job to finish",
        interval=0.5, on_timeout=lambda: _job_logs(data_dir),
    )


def _job_logs(data_dir: Path) -> str:
    parts = [f"--- app.log ---\n{log_tail(data_dir / 'app.log')}"]
    for path in sorted((data_dir / "jobs").glob("job-*.log")):
        parts.append(f"--- {path.name} ---\n{log_tail(path, 20)}")
    return "\n".join(parts)


def responds(url: str) -> bool:
    """Whether a server answers 200 at url."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the app's process group, SIGKILL it after a grace period."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    # Job subprocesses share the group: make sure none outlives the app.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def running_app(
    data_dir: Path | str, port: int | None = None, env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (), start_timeout: float = START_TIMEOUT_S,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run `python app.py --data-dir DATA_DIR --port PORT *extra_args`; yield (base URL, process)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    # Inherited STORY_ARENA_* settings would change what the test sees: only `env` sets them.
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("STORY_ARENA_")}
    child_env.update({
        "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    })
    child_env.update(env or {})
    log_path = data_dir / "app.log"
    # A port picked here can be taken by someone else before the app binds it: pick again.
    for attempt in range(1 if port else 3):
        chosen = port or free_port()
        url = f"http://127.0.0.1:{chosen}"
        command = [sys.executable, "app.py", "--data-dir", str(data_dir), "--port", str(chosen), *extra_args]
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                command, cwd=ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        try:
            deadline = time.monotonic() + start_timeout
            while not responds(url + "/"):
                if proc.poll() is not None:
                    output = log_path.read_bytes()[log_start:].decode(errors="replace")
                    busy = ("cannot find empty port", "address already in use")
                    if any(b in output.lower() for b in busy) and not port and attempt < 2:
                        break  # try another port
                    raise RuntimeError(
                        f"app.py exited with code {proc.returncode} before serving {url}\n{log_tail(log_path)}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"app.py did not answer on {url} within {start_timeout:.0f} s\n{log_tail(log_path)}"
                    )
                time.sleep(0.3)
            else:
                yield url, proc
                return
        finally:
            _stop(proc)
