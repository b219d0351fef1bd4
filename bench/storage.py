"""Storage cost as the votes table grows: durable vote writes and pair selection.

    python -m bench.storage [--sizes 1000,10000,100000] [--large] [--ops 300] [--rounds 3]

Each size gets its own database, opened with storage.db.Store exactly as the app opens it
(WAL, synchronous=FULL) and filled in one transaction with the pair-statistics triggers
active, so policy_pairs is what the app would have: POLICIES policies, PROMPTS prompts
with a story per policy, and votes spread over annotators (at least ANNOTATORS; more at
large sizes, so that no one judges more than VOTES_PER_ANNOTATOR pairs and seen_pairs
grows with the votes as it does in use). Policies differ in strength, so win rates vary.

Then the sizes take turns for --rounds rounds, so that load on a shared machine falls on
all of them alike; each turn times what the arena does per vote, for annotators who
already have a history: rlhf.arena.next_pair, then storage.votes.record_vote (one
transaction, synced to disk). Prints JSON: per size the median and p99 milliseconds of
both and durable votes per second, the largest size's cost over the smallest's (about 1
when the cost is flat), and the query plan of every statement one selection and one vote
run (with the vote handler's other reads), any full scan of a table that grows with the
votes listed under full_scans.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import random
import re
import sqlite3
import statistics
import time
from pathlib import Path

from bench.workdir import work_dir
from rlhf import arena
from rlhf.prompts import SEED_PROMPTS
from storage import annotators, completions, models, prompts, scores, votes
from storage.db import Store, connect, write_transaction

POLICIES = 6
PROMPTS = 200
ANNOTATORS = 50
VOTES_PER_ANNOTATOR = 1000
TIMED_ANNOTATORS = 10
STORY = ("Once upon a time a small fox found a lantern by the river. " * 14).strip()
# Tables whose size follows the number of votes: a scan of one makes the cost grow.
GROWING_TABLES = ("votes", "seen_pairs")
FILL_CACHE_KIB = 256_000
SYNCHRONOUS_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def annotator_count(size: int) -> int:
    return max(ANNOTATORS, math.ceil(size / VOTES_PER_ANNOTATOR))


def build_arena(store: Store) -> tuple[list[int], dict[tuple[int, int], int], list[int]]:
    """Policies, prompts, one story per (prompt, policy) and annotators; returns their ids."""
    db = store.db
    policy_ids = [models.add_model(db, f"policy-{i}", "local", path=f"/models/policy-{i}").id for i in range(POLICIES)]
    prompts.add_prompts(db, SEED_PROMPTS[:PROMPTS])
    prompt_ids = [r["id"] for r in prompts.list_prompts(db)]
    with write_transaction(db):
        story_ids = {
            (p, m): completions.add_completion(db, p, m, f"{STORY} ({m}/{p})")
            for p in prompt_ids for m in policy_ids
        }
    return policy_ids, story_ids, prompt_ids


def fill_votes(path: Path, size: int, policy_ids: list[int], story_ids: dict[tuple[int, int], int],
               prompt_ids: list[int], annotator_ids: list[int], rng: random.Random) -> None:
    """Insert `size` human votes (and the seen pairs they imply) in one transaction."""
    strength = {m: rank * 0.4 for rank, m in enumerate(policy_ids)}
    now = time.time()
    vote_rows, seen_rows = [], []
    for i in range(size):
        model_a, model_b = rng.sample(policy_ids, 2)
        prompt_id = rng.choice(prompt_ids)
        annotator_id = rng.choice(annotator_ids)
        completion_a, completion_b = story_ids[(prompt_id, model_a)], story_ids[(prompt_id, model_b)]
        roll = rng.random()
        if roll < 0.1:
            choice = "tie"
        elif roll < 0.15:
            choice = "both_bad"
        else:
            p_a = 1.0 / (1.0 + math.exp(strength[model_b] - strength[model_a]))
            choice = "a" if rng.random() < p_a else "b"
        voted_at = now - (size - i)
        vote_rows.append((prompt_id, completion_a, completion_b, model_a, model_b, annotator_id, choice,
                          voted_at - 20.0, voted_at, f"{rng.getrandbits(128):032x}"))
        seen_rows.append((annotator_id, min(completion_a, completion_b), max(completion_a, completion_b), voted_at))
    db = connect(path)
    db.conn.execute(f"PRAGMA cache_size = -{FILL_CACHE_KIB}")
    with write_transaction(db):
        db.conn.executemany(
            "INSERT INTO votes (prompt_id, completion_a, completion_b, model_a, model_b, annotator_id,"
            " choice, rationale, shown_at, voted_at, source, client_key)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, '', ?, ?, 'human', ?)",
            vote_rows,
        )
        db.conn.executemany(
            "INSERT OR IGNORE INTO seen_pairs (annotator_id, completion_lo, completion_hi, created_at)"
            " VALUES (?, ?, ?, ?)",
            seen_rows,
        )
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.conn.close()


def pair_stats_match_votes(store: Store) -> bool:
    """The trigger-maintained totals agree with a full count of the votes."""
    counted = {
        (r[0], r[1]): r[2:] for r in store.db.execute(
            "SELECT min(model_a, model_b), max(model_a, model_b), count(*),"
            " sum(choice = 'tie'), sum(choice = 'both_bad') FROM votes WHERE source = 'human' GROUP BY 1, 2"
        ).fetchall()
    }
    kept = {
        (r["model_lo"], r["model_hi"]): (r["votes"], r["ties"], r["both_bad"])
        for r in votes.policy_pair_stats(store.db)
    }
    return counted == kept


class VotesDatabase:
    """One database of a given size, with the annotators whose turns are timed."""

    def __init__(self, path: Path, size: int, seed: int):
        rng = random.Random(seed)
        self.size = size
        self.store = Store(path)
        policy_ids, story_ids, prompt_ids = build_arena(self.store)
        annotator_ids = [
            annotators.sign_in(self.store.db, f"annotator-{i}", "annotator")["id"]
            for i in range(annotator_count(size))
        ]
        started = time.perf_counter()
        fill_votes(path, size, policy_ids, story_ids, prompt_ids, annotator_ids, rng)
        self.fill_s = time.perf_counter() - started
        self.annotators = itertools.cycle(annotator_ids[:TIMED_ANNOTATORS])
        self.rng = rng
        self.select_ms: list[float] = []
        self.write_ms: list[float] = []

    def vote_once(self) -> tuple[float, float]:
        """Select a pair for the next annotator and vote on it; returns both times in ms."""
        annotator_id = next(self.annotators)
        started = time.perf_counter()
        view = arena.next_pair(self.store, annotator_id, self.rng)
        selected = time.perf_counter()
        if view is None:
            raise RuntimeError(f"annotator {annotator_id} has no unseen pair left")
        votes.record_vote(self.store.db, view.pair, annotator_id=annotator_id,
                          choice=self.rng.choice(votes.CHOICES), client_key=view.client_key)
        return (selected - started) * 1e3, (time.perf_counter() - selected) * 1e3

    def timed_turn(self, ops: int) -> None:
        for _ in range(ops):
            select_ms, write_ms = self.vote_once()
            self.select_ms.append(select_ms)
            self.write_ms.append(write_ms)


def query_plans(database: VotesDatabase) -> list[dict]:
    """EXPLAIN QUERY PLAN of each statement the app's vote handler runs.

    That is one selection and one vote, plus the handler's other reads: the reward
    model's guess stored with the vote and the annotator's vote count on the page.
    """
    store = database.store
    conn = store.db.conn
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        database.vote_once()
        scores.score_pair(store.db, 1, 2)
        arena.vote_count(store, next(database.annotators))
    finally:
        conn.set_trace_callback(None)
    plans, seen = [], set()
    for sql in statements:
        sql = sql.strip()
        if not re.match(r"(?i)(SELECT|INSERT|UPDATE|DELETE|WITH)\b", sql):
            continue
        shape = re.sub(r"\b\d+(\.\d+)?\b|'[^']*'", "?", sql)
        if shape in seen:
            continue
        seen.add(shape)
        details = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()]
        plans.append({"sql": shape, "plan": details})
    return plans


def full_scans(plans: list[dict]) -> list[dict]:
    """Plan steps that read a growing table whole (SCAN) instead of searching an index."""
    growing = "|".join(GROWING_TABLES)
    found = []
    for entry in plans:
        aliases = {alias for _, alias in re.findall(rf"\b({growing})\s+(?:AS\s+)?(\w+)", entry["sql"], flags=re.I)}
        names = set(GROWING_TABLES) | aliases
        for step in entry["plan"]:
            match = re.match(r"SCAN (\w+)", step)
            if match and match.group(1) in names:
                found.append({"sql": entry["sql"], "step": step})
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(database: VotesDatabase) -> dict:
    return {
        "votes": database.size,
        "annotators": annotator_count(database.size),
        "fill_s": round(database.fill_s, 2),
        "select_ms_median": round(statistics.median(database.select_ms), 3),
        "select_ms_p99": round(percentile(database.select_ms, 0.99), 3),
        "write_ms_median": round(statistics.median(database.write_ms), 3),
        "write_ms_p99": round(percentile(database.write_ms, 0.99), 3),
        "durable_votes_per_s": round(len(database.write_ms) / (sum(database.write_ms) / 1e3), 1),
    }


def run(sizes: list[int], ops: int, rounds: int, work_dir: Path, seed: int = 0) -> dict:
    """Fill one database per size, time `ops` select+vote turns on each, return the report."""
    databases = [VotesDatabase(work_dir / f"votes-{size}.db", size, seed + size) for size in sizes]
    consistent = all(pair_stats_match_votes(d.store) for d in databases)
    for d in databases:
        d.vote_once()  # warm the page cache and the connection
    per_round = [ops // rounds + (r < ops % rounds) for r in range(rounds)]
    for count in per_round:
        for d in databases:
            d.timed_turn(count)
    plans = query_plans(databases[-1])
    table = [summary(d) for d in databases]
    smallest, largest = table[0], table[-1]
    timed_db = databases[-1].store.db
    journal_mode = timed_db.journal_mode
    synchronous = SYNCHRONOUS_NAMES[timed_db.execute("PRAGMA synchronous").fetchone()[0]]
    for d in databases:
        d.store.db.conn.close()
    return {
        "sizes": sizes, "ops_per_size": ops, "rounds": rounds, "policies": POLICIES, "prompts": PROMPTS,
        "sqlite": sqlite3.sqlite_version, "machine": platform.machine(),
        "journal_mode": journal_mode, "synchronous": synchronous, "timed_annotators": TIMED_ANNOTATORS,
        "policy_pairs_match_votes": consistent,
        "table": table,
        "largest_over_smallest": {
            key: round(largest[key] / smallest[key], 2)
            for key in ("select_ms_median", "select_ms_p99", "write_ms_median", "write_ms_p99")
        },
        "full_scans": full_scans(plans),
        "query_plans": plans,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="votes in the table, comma-separated")
    parser.add_argument("--large", action="store_true", help="add a database of 1,000,000 votes")
    parser.add_argument("--ops", type=int, default=300, help="timed selections and votes per size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="where the databases go (default: a temporary folder, removed)")
    args = parser.parse_args()

    sizes = sorted({int(float(s)) for s in args.sizes.split(",")} | ({1_000_000} if args.large else set()))
    with work_dir(args.work_dir, "story-arena-bench-storage-") as folder:
        report = run(sizes, args.ops, args.rounds, folder, args.seed)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
