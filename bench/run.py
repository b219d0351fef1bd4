"""Run every benchmark and print one JSON document.

    python -m bench.run --quick --json                  # CI sizes, under 10 minutes on 2 cores
    python -m bench.run --quick --json --only storage,generation
    python -m bench.run                                  # default sizes, a summary per bench

Each bench runs as `python -m bench.NAME ARGS` in its own process (its logs go to stderr),
one after the other so they do not share the machine with each other. The document holds
each bench's own JSON under `benches`, its headline ratios under `headlines`, its wall
seconds, and the error of any bench that failed (the exit status is then 1).

Benches run here (BENCHES below):
  first_start bench/first_start.py seconds from an empty data dir to the first votable pair
  live_battle bench/live_battle.py seconds to the first streamed token and to both stories of an annotator's prompt
  storage     bench/storage.py     vote writes and pair selection as the votes table grows
  voting      bench/voting.py      the voting path under concurrent annotators, against Gradio's floor
  generation  bench/generation.py  batched story generation against one prompt at a time
  stories     bench/stories.py     the starter policies' shares of finished, looping and cut stories
  closed_loop bench/closed_loop.py votes -> reward -> RLOO/DPO/DPH/RAFT: each child's win rate over its parent
  babystories bench/babystories.py pretrain small and base from scratch, the closed loop from each
  training_cost bench/training_cost.py seconds per training step and per 1k pairs, per kind
  teams       bench/teams.py       TeaMs-RL instructor against random operations at equal query budgets
  metric_agreement bench/metric_agreement.py automatic story metrics against HANNA's human ratings
  dph         bench/dph.py         Direct Preference Heads against a reward model and DPO on HH-RLHF pairs
  weak_supervision bench/weak_supervision.py  reward accuracy with and without weak labels (HH-RLHF)
  sessions    bench/sessions.py    the app's memory (RSS) before and after thousands of sign-ins

metric_agreement, dph and weak_supervision read ../shared/data (they fail where it is missing);
their quick sizes check that they run, and their full runs give the README's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK_TIMEOUT_S = 480
FULL_TIMEOUT_S = 3600
ERROR_TAIL_CHARS = 2000


@dataclass(frozen=True)
class Bench:
    module: str
    quick_args: tuple[str, ...]
    full_args: tuple[str, ...]
    headline: Callable[[dict], dict]


def _storage_headline(report: dict) -> dict:
    return {"largest_over_smallest": report["largest_over_smallest"], "full_scans": len(report["full_scans"])}


def _voting_headline(report: dict) -> dict:
    return {str(row["annotators"]): row["app_over_floor"] for row in report["table"]} | {"errors": report["errors"]}


def _first_start_headline(report: dict) -> dict:
    return {k: report[k] for k in ("starter", "page_answers_s", "first_votable_pair_s")}


def _live_battle_headline(report: dict) -> dict:
    return {k: report[k] for k in ("starter", "first_token_s_median", "both_stories_s_median")}


def _generation_headline(report: dict) -> dict:
    return {"speedup_vs_batch_1": report["speedup_vs_batch_1"],
            "two_policies_one_call_speedup": report["two_policies"]["one_call_speedup"]}


def _stories_headline(report: dict) -> dict:
    return {name: {k: row[k]["share"] for k in ("ending", "loop", "truncated")}
            for name, row in report["policies"].items()}


def _closed_loop_headline(report: dict) -> dict:
    return {m: {"win_rate": r["win_rate"], "ci95": r["ci95"]} for m, r in report["methods"].items()}


def _babystories_headline(report: dict) -> dict:
    return {size: {"win_rate": r["win_rate"], "ci95": r["ci95"]} for size, r in report["sizes"].items()}


def _training_cost_headline(report: dict) -> dict:
    return {k: row["step_over_reward"] for k, row in report["table"].items()}


def _teams_headline(report: dict) -> dict:
    return report["rl_over_random"]


def _metric_agreement_headline(report: dict) -> dict:
    return report["hanna"]["strongest"]


def _dph_headline(report: dict) -> dict:
    return report["step_cost_vs_dpo"] or {}


def _weak_supervision_headline(report: dict) -> dict:
    return {str(row["human_labels"]): {"human_only": (row["human_only"] or {}).get("mean"),
                                       "with_weak": (row["with_weak"] or {}).get("mean")}
            for row in report["results"]}


def _sessions_headline(report: dict) -> dict:
    return {k: report[k] for k in ("sign_ins", "rss_mb_before", "rss_mb_after")}


BENCHES = {
    "first_start": Bench("bench.first_start", ("--starter", "tiny"), (), _first_start_headline),
    "live_battle": Bench("bench.live_battle", ("--quick",), ("--starter", "smollm2"), _live_battle_headline),
    "storage": Bench(
        "bench.storage", ("--sizes", "1000,10000", "--ops", "100", "--rounds", "2"), (), _storage_headline,
    ),
    "voting": Bench(
        "bench.voting", ("--annotators", "1,8", "--votes", "4", "--rounds", "1"), (), _voting_headline,
    ),
    "generation": Bench(
        "bench.generation",
        ("--model", "tiny", "--prompts", "4", "--batch-sizes", "1,4", "--max-new-tokens", "32",
         "--rounds", "1", "--device", "cpu"),
        ("--model", "tiny", "--device", "cpu"),
        _generation_headline,
    ),
    "stories": Bench("bench.stories", ("--quick", "--json"), ("--json",), _stories_headline),
    "closed_loop": Bench("bench.closed_loop", ("--quick",), (), _closed_loop_headline),
    "babystories": Bench("bench.babystories", ("--quick",), (), _babystories_headline),
    "training_cost": Bench("bench.training_cost", ("--quick",), (), _training_cost_headline),
    "teams": Bench("bench.teams", ("--quick",), (), _teams_headline),
    "metric_agreement": Bench("bench.metric_agreement", ("--quick",), (), _metric_agreement_headline),
    "dph": Bench("bench.dph", ("--quick",), (), _dph_headline),
    "weak_supervision": Bench("bench.weak_supervision", ("--quick",), (), _weak_supervision_headline),
    "sessions": Bench("bench.sessions", ("--quick",), (), _sessions_headline),
}


def run_bench(name: str, args: tuple[str, ...], timeout: float) -> dict:
    """One bench in its own process; returns its report, or raises with its error output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", BENCHES[name].module, *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout,
    )
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"exit code {done.returncode}: {done.stderr[-ERROR_TAIL_CHARS:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI sizes: every bench in under 10 minutes")
    parser.add_argument("--json", action="store_true", help="print the whole document (else a summary)")
    parser.add_argument("--only", help=f"comma-separated benches to run (of {', '.join(BENCHES)})")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)}; choose from {', '.join(BENCHES)}")

    document: dict = {
        "quick": args.quick, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "benches": {}, "headlines": {}, "seconds": {}, "failed": {},
    }
    for name in names:
        bench = BENCHES[name]
        started = time.perf_counter()
        try:
            report = run_bench(name, bench.quick_args if args.quick else bench.full_args,
                               QUICK_TIMEOUT_S if args.quick else FULL_TIMEOUT_S)
            document["benches"][name] = report
            document["headlines"][name] = bench.headline(report)
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, KeyError) as exc:
            document["failed"][name] = f"{type(exc).__name__}: {exc}"
        document["seconds"][name] = round(time.perf_counter() - started, 1)

    if args.json:
        print(json.dumps(document, indent=2))
    else:
        for name in names:
            outcome = document["headlines"].get(name) or {"failed": document["failed"].get(name)}
            print(f"{name} ({document['seconds'][name]} s): {json.dumps(outcome)}")
    sys.exit(1 if document["failed"] else 0)


if __name__ == "__main__":
    main()
