"""Memory of the app under many sign-ins: its resident size (RSS) before and after N
sign-ins, each a new browser session, as a crowd of one-off visitors makes them.

    python -m bench.sessions                  # 5,000 sign-ins, the default session cap
    python -m bench.sessions --quick          # 300 sign-ins with a cap of 100 (seconds)
    python -m bench.sessions --session-capacity 10000   # Gradio's own default cap, for comparison

Starts `python app.py` (tiny starter) on a fresh data dir, waits for its story pool, then
signs in N new names over the HTTP API (`/gradio_api/call/sign_in`, a new session per
call, from several threads), reading the app's RSS from /proc every `--every` sign-ins.
The per-address cap on new names is off here (every sign-in comes from 127.0.0.1).
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.app_server import TINY_ARGS, running_app, wait_for_pool

THREADS = 8


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def sign_in(http: httpx.Client, url: str, name: str) -> None:
    """One sign-in through Gradio's REST API: queue the call, then read its event stream."""
    event = http.post(f"{url}/gradio_api/call/sign_in", json={"data": [name, "", ""]}).raise_for_status().json()
    stream = http.get(f"{url}/gradio_api/call/sign_in/{event['event_id']}").raise_for_status().text
    if "event: complete" not in stream:
        raise RuntimeError(f"sign-in of {name!r} failed: {stream[-300:]}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sessions", description=__doc__.splitlines()[0])
    parser.add_argument("--sign-ins", type=int, default=5000)
    parser.add_argument("--every", type=int, default=1000, help="read the RSS after this many sign-ins")
    parser.add_argument("--session-capacity", type=int, help="the app's --session-capacity (default: the app's)")
    parser.add_argument("--quick", action="store_true", help="300 sign-ins, a cap of 100 sessions")
    args = parser.parse_args()
    if args.quick:
        args.sign_ins, args.every, args.session_capacity = 300, 100, args.session_capacity or 100

    data_dir = Path(tempfile.mkdtemp(prefix="story-arena-sessions-"))
    extra = [*TINY_ARGS, "--annotators-per-address-per-hour", "0"]
    if args.session_capacity:
        extra += ["--session-capacity", str(args.session_capacity)]
    try:
        with running_app(data_dir, extra_args=extra) as (url, app), httpx.Client(timeout=60) as http:
            wait_for_pool(data_dir)
            sign_in(http, url, "warm-up")
            before = rss_mb(app.pid)
            readings, started = {}, time.monotonic()
            with ThreadPoolExecutor(THREADS) as pool:
                for start in range(0, args.sign_ins, args.every):
                    names = [f"visitor-{i}" for i in range(start, min(start + args.every, args.sign_ins))]
                    list(pool.map(lambda name: sign_in(http, url, name), names))
                    readings[start + len(names)] = round(rss_mb(app.pid), 1)
            seconds = time.monotonic() - started
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    after = readings[args.sign_ins]
    print(json.dumps({
        "sign_ins": args.sign_ins, "session_capacity": args.session_capacity or "app default",
        "rss_mb_before": round(before, 1), "rss_mb_after": after, "rss_mb_by_sign_ins": readings,
        "kb_per_sign_in": round((after - before) * 1024 / args.sign_ins, 1),
        "sign_ins_per_s": round(args.sign_ins / seconds, 1), "machine": platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
