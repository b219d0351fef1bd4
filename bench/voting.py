"""The voting path under load: concurrent simulated annotators against one app, beside Gradio's floor.

    python -m bench.voting [--annotators 1,8,32] [--many] [--votes 6] [--rounds 2]

Two servers run in subprocesses: the real app (`python app.py`, tiny starter, its pool
written by the first-start job as in use) and a minimal Gradio app with one no-op handler
and the app's queue settings: what any Gradio endpoint costs, the framework's floor.
Each crowd is N threads with a gradio_client Client each: every client connects and signs
in (the floor: one call), then all start together and make --votes calls each. On the
app a call is a simulated annotator's vote (rlhf.simulate: the oracle picks the side, the
reply carries the next pair), so one latency is vote + next pair. Crowd sizes and the two
servers take turns for --rounds rounds (the order flips each round), so load on a shared
machine falls on all alike; every turn brings new annotators. Prints JSON per crowd size:
median and p99 ms, calls per second, errors, and the app's figures over the floor's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from gradio_client import Client

from bench.app_server import (
    ABUSE_CONTROLS_OFF,
    ROOT,
    START_TIMEOUT_S,
    free_port,
    responds,
    running_app,
    wait_for,
    wait_for_pool,
)
from bench.workdir import work_dir
from rlhf.simulate import Annotator, Oracle, read_screen

# Two starter policies make one pair per prompt: an annotator can vote this many times at most.
POOL_PROMPTS = 12
QUEUE_CONCURRENCY = 16  # app.py's default_concurrency_limit
SETUP_TIMEOUT_S = 120.0
ERRORS_SHOWN = 5

Session = Callable[[], float]


def serve_floor(port: int) -> None:
    """The floor app: one no-op endpoint, queued like app.py."""
    import gradio as gr

    with gr.Blocks() as demo:
        key = gr.Textbox()
        reason = gr.Textbox()
        result = gr.Textbox()
        gr.Button("noop").click(lambda k, r: k, [key, reason], result, api_name="noop")
    demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY).launch(server_name="127.0.0.1", server_port=port)


@contextlib.contextmanager
def floor_app(log_path: Path) -> Iterator[str]:
    """Run the floor app in its own process; yield its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.voting", "--serve-floor", str(port)], cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the floor app exited with code {proc.returncode}; see {log_path}")
            return responds(url + "/")

        wait_for(ready, START_TIMEOUT_S, "the floor app", interval=0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def app_session(client: Client, name: str, seed: int) -> Session:
    """Sign in; each call of the result votes once as a simulated annotator and returns seconds."""
    annotator, oracle, rng = Annotator(name), Oracle(), random.Random(seed)
    screen = read_screen(client.predict(name, "", api_name="/sign_in"))

    def vote() -> float:
        nonlocal screen
        if screen is None:
            raise RuntimeError("no pair available")
        choice = annotator.choose(oracle, screen.prompt, screen.story_a, screen.story_b, rng)
        started = time.perf_counter()
        outputs = client.predict(screen.client_key, "", api_name=f"/vote_{choice}")
        elapsed = time.perf_counter() - started
        screen = read_screen(outputs)
        return elapsed

    return vote


def floor_session(client: Client, name: str, seed: int) -> Session:
    """One first call (as signing in is); each call of the result calls the no-op once."""
    client.predict(name, "", api_name="/noop")

    def call() -> float:
        started = time.perf_counter()
        client.predict(uuid.uuid4().hex, "", api_name="/noop")
        return time.perf_counter() - started

    return call


def crowd(url: str, start_session: Callable[[Client, str, int], Session], size: int, calls: int,
          tag: str, seed: int) -> dict:
    """`size` clients connect and sign in, then make `calls` calls each, all at once."""
    start = threading.Barrier(size + 1, timeout=SETUP_TIMEOUT_S)
    latencies: list[float] = []
    errors: list[str] = []
    finished: list[float] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        client = None
        mine: list[float] = []
        try:
            try:
                client = Client(url, verbose=False)
                session = start_session(client, f"bench-{tag}-{i}", seed * 1000 + i)
            finally:
                start.wait()
            for _ in range(calls):
                mine.append(session())
        except Exception as exc:  # reported, not raised: an error is a result here
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            with lock:
                latencies.extend(mine)
                finished.append(time.perf_counter())
            if client is not None:  # after the clock: closing waits for the heartbeat thread
                client.close()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(size)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "errors": errors, "seconds": max(finished) - started}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(turns: list[dict]) -> dict:
    latencies = [x for t in turns for x in t["latencies"]]
    errors = [e for t in turns for e in t["errors"]]
    seconds = sum(t["seconds"] for t in turns)
    return {
        "calls": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:ERRORS_SHOWN],
        "latency_ms_median": round(statistics.median(latencies) * 1e3, 2) if latencies else None,
        "latency_ms_p99": round(percentile(latencies, 0.99) * 1e3, 2) if latencies else None,
        "calls_per_s": round(len(latencies) / seconds, 1) if seconds else None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def run(sizes: list[int], votes: int, rounds: int, work_dir: Path, seed: int = 0) -> dict:
    """Start both servers, let the crowds take turns, return the report."""
    if votes > POOL_PROMPTS:
        raise ValueError(f"An annotator can vote at most {POOL_PROMPTS} times on this pool.")
    data_dir = work_dir / "data"
    started = time.perf_counter()
    app_args = ("--starter", "tiny", "--pool-prompts", str(POOL_PROMPTS), *ABUSE_CONTROLS_OFF)
    with (running_app(data_dir, extra_args=app_args) as (app_url, _),
          floor_app(work_dir / "floor.log") as floor_url):
        wait_for_pool(data_dir)
        setup_s = time.perf_counter() - started
        targets = {"app": (app_url, app_session), "floor": (floor_url, floor_session)}
        turns: dict[tuple[str, int], list[dict]] = {(t, n): [] for t in targets for n in sizes}
        for round_no in range(rounds):
            order = list(targets) if round_no % 2 == 0 else list(reversed(targets))
            for size in sizes:
                for target in order:
                    url, session = targets[target]
                    tag = f"r{round_no}-n{size}"
                    turns[(target, size)].append(crowd(url, session, size, votes, tag, seed + round_no))
    table = []
    for size in sizes:
        app, floor = summarise(turns[("app", size)]), summarise(turns[("floor", size)])
        table.append({
            "annotators": size, "app": app, "floor": floor,
            "app_over_floor": {
                "latency_median": ratio(app["latency_ms_median"], floor["latency_ms_median"]),
                "latency_p99": ratio(app["latency_ms_p99"], floor["latency_ms_p99"]),
                "calls_per_s": ratio(app["calls_per_s"], floor["calls_per_s"]),
            },
        })
    return {
        "annotators": sizes, "votes_per_annotator": votes, "rounds": rounds,
        "pool_prompts": POOL_PROMPTS, "queue_concurrency": QUEUE_CONCURRENCY,
        "cpus": os.cpu_count(), "setup_s": round(setup_s, 1),
        "table": table,
        "errors": sum(row["app"]["errors"] + row["floor"]["errors"] for row in table),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators", default="1,8,32", help="crowd sizes, comma-separated")
    parser.add_argument("--many", action="store_true", help="add a crowd of 64")
    parser.add_argument("--votes", type=int, default=6, help=f"votes per annotator per turn (at most {POOL_PROMPTS})")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="data dir and logs (default: a temporary folder, removed)")
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(args.serve_floor)
        return

    sizes = sorted({int(s) for s in args.annotators.split(",")} | ({64} if args.many else set()))
    with work_dir(args.work_dir, "story-arena-bench-voting-") as folder:
        report = run(sizes, args.votes, args.rounds, folder, args.seed)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
