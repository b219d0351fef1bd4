"""First start as a new user meets it: how long until the page answers and the first pair
of stories can be voted on, from an empty data dir.

    python -m bench.first_start                    # the packaged SmolLM2 starter
    python -m bench.first_start --starter tiny     # the tiny random GPT-2 (seconds)

Starts `python app.py` on a fresh data dir (converting the starter and writing the first
batch of stories are part of what is timed) and asks, as an annotator's next-pair request
does, for a pair every half second. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from bench.app_server import running_app
from bench.workdir import work_dir
from rlhf import arena
from storage import annotators
from storage.db import Store

POLL_S = 0.5


def first_pair_seconds(data_dir: Path, started: float, timeout_s: float) -> float:
    """Seconds from `started` until a new annotator is served a pair."""
    db_path = data_dir / "arena.db"
    while not db_path.exists():
        time.sleep(POLL_S)
    store = Store(db_path)
    probe = None
    while time.monotonic() - started < timeout_s:
        if probe is None and store.db["annotators"].exists():
            probe = annotators.sign_in(store.db, "first-start-probe", "annotator")["id"]
        if probe is not None and store.db["prompts"].exists() and arena.next_pair(store, probe) is not None:
            return time.monotonic() - started
        time.sleep(POLL_S)
    raise TimeoutError(f"no votable pair within {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.first_start", description=__doc__.splitlines()[0])
    parser.add_argument("--starter", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--timeout", type=float, default=1200, help="give up after this many seconds")
    parser.add_argument("--work-dir", type=Path, help="data dir to use (default: a temporary one, removed)")
    args = parser.parse_args()

    with work_dir(args.work_dir, "story-arena-first-start-") as data_dir:
        if any(data_dir.iterdir()):
            parser.error(f"{data_dir} is not empty: the bench needs a first start")
        started = time.monotonic()
        with running_app(data_dir, extra_args=["--starter", args.starter], start_timeout=args.timeout):
            page_s = time.monotonic() - started
            pair_s = first_pair_seconds(data_dir, started, args.timeout)
    print(json.dumps({
        "starter": args.starter, "machine": platform.machine(),
        "page_answers_s": round(page_s, 1), "first_votable_pair_s": round(pair_s, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
