"""Rounds, measured: does the champion get better round after round?

    python -m bench.rounds --quick                              # tiny starter, CI size
    python -m bench.rounds --starter smollm2 --rounds 3 --work-dir DIR

The product's own path, in process: `prepare` (first start), a round recipe set through
rlhf.rounds (a reward job on the votes so far, then the recipe's policy steps from the
champion), simulated annotators of known accuracy voting through rlhf.arena between
rounds (bench.closed_loop.cast_votes), and rlhf.rounds.tick advancing each round while
its jobs run here one after another, as the job worker would run them (jobs.execute).
Each round: votes until the trigger fires, its steps, then votes until the acceptance
rule decides its children (promoted when the 95% interval of the win rate against the
parent clears 0.5, else retired at the vote cap).

After each round the champion is judged against the starter on held-out prompts (prompts
the arena pool never covers): both write stories by the pool job's own generation path in
a copy of the database (so no held-out story ever reaches the arena, its votes or the
next reward model), and the oracle judges each pair (win 1, tie or both bad 1/2), with a
95% interval over prompts (rlhf.heldout.rate_interval). Prints JSON: per round the
champion before and after, its children, their votes, win rates and decision, the round's
minutes (votes, training, pools and decision) and the champion against the starter.
Figures come from simulated annotators and an oracle, not people.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sqlite3
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from bench.closed_loop import cast_votes, head_to_head, parse_overrides
from bench.workdir import work_dir
from rlhf import jobs, rounds
from rlhf.pool import fill_pool
from rlhf.prepare import prepare
from rlhf.prompts import SEED_PROMPTS
from rlhf.raft import RaftParams, prompt_split
from rlhf.settings import Settings
from rlhf.simulate import Oracle
from storage import jobs as job_rows
from storage import models, prompts
from storage import rounds as round_rows

VOTE_BATCH = 8  # votes cast between two looks at a collecting round


def _log(message: str) -> None:
    print(f"[rounds] {message}", file=sys.stderr, flush=True)


def run_jobs(settings: Settings) -> None:
    """Tick the round and run every queued job here, in queue order, until none is left."""
    store = settings.store()
    while True:
        rounds.tick(store)
        job = job_rows.claim_next_job(store.db)
        if job is None:
            return
        _log(f"job {job['id']} ({job['kind']})")
        jobs.execute(settings, job["id"])


def more_votes(settings: Settings, annotators: int, accuracy: float, oracle: Oracle, seed: int) -> int:
    cast = cast_votes(settings, annotators, VOTE_BATCH, accuracy, oracle, seed)["votes"]
    if cast == 0:
        raise RuntimeError("the simulated annotators have judged every pair: raise --annotators")
    return cast


def judged_copy(settings: Settings, name: str) -> Settings:
    """Settings on a copy of the database (the models stay where they are)."""
    judge = replace(settings, data_dir=settings.data_dir.parent / name)
    judge.data_dir.mkdir(parents=True, exist_ok=True)
    target = sqlite3.connect(judge.db_path)
    settings.store().db.conn.backup(target)
    target.close()
    return judge


def against_starter(settings: Settings, champion: int, starter: int, pool_prompts: int, eval_ids: list[int],
                    oracle: Oracle, seed: int, name: str) -> dict:
    """The champion's held-out stories against the starter's, judged by the oracle."""
    judge = judged_copy(settings, name)
    fill_pool(judge.store(), judge, [starter, champion], pool_prompts + len(eval_ids), lambda f, m: None,
              seed=seed, only=set(eval_ids))
    result = head_to_head(judge, champion, starter, eval_ids, oracle, seed)
    shutil.rmtree(judge.data_dir, ignore_errors=True)
    return result


def raft_on_the_pool(store, recipe: dict, pool_prompts: int) -> dict | None:
    """The recipe's step parameters with RAFT's prompt count capped so that it samples only
    training-side prompts of the arena pool (RAFT takes the first N in id order), never a
    prompt the champion is judged on. (RLOO samples on its own split of every seed prompt.)"""
    step_params = dict(recipe.get("step_params") or {})
    if "raft" in recipe["steps"]:
        pool_texts = {r["text"] for r in prompts.list_prompts(store.db)[:pool_prompts]}
        on_pool = sum(t in pool_texts for t in prompt_split(store, "all", len(SEED_PROMPTS))[0])
        raft = step_params.get("raft", {})
        step_params["raft"] = {**raft, "prompts": min(raft.get("prompts", RaftParams.prompts), on_pool)}
    return step_params or None


def run(work_dir: Path, starter: str, rounds_wanted: int, pool_prompts: int, eval_prompts: int,
        votes_per_round: int, annotators: int, accuracy: float, recipe: dict, max_new_tokens: int,
        oracle: Oracle, device: str, seed: int, generation_batch_size: int) -> dict:
    if pool_prompts + eval_prompts > len(SEED_PROMPTS):
        raise ValueError(f"--prompts plus --eval-prompts must be at most {len(SEED_PROMPTS)}.")
    settings = Settings(data_dir=work_dir / "data", starter=starter, pool_prompts=pool_prompts,
                        max_new_tokens=max_new_tokens, device=device, generation_batch_size=generation_batch_size,
                        min_vote_seconds=0.0)  # simulated annotators need no reading time
    store = settings.store()
    started = time.perf_counter()
    first = prepare(store, settings, lambda f, m: _log(m))[0].id
    rounds.set_recipe(store, {**recipe, "every_votes": votes_per_round,
                              "step_params": raft_on_the_pool(store, recipe, pool_prompts)})
    report: dict = {"starter": starter, "starter_policy": models.get_model(store.db, first).name,
                    "pool_prompts": pool_prompts, "eval_prompts": eval_prompts, "votes_per_round": votes_per_round,
                    "recipe": rounds.current_recipe(store).to_dict(), "oracle": asdict(oracle),
                    "prepare_minutes": round((time.perf_counter() - started) / 60, 2), "rounds": []}
    eval_ids = [r["id"] for r in prompts.list_prompts(store.db)[pool_prompts:pool_prompts + eval_prompts]]
    cap = rounds.current_recipe(store).vote_cap
    for number in range(1, rounds_wanted + 1):
        round_started = time.perf_counter()
        # Votes until the trigger fires (ties and both-bad votes do not count towards it).
        cast = cast_votes(settings, annotators, votes_per_round, accuracy, oracle, seed + number)["votes"]
        while (current := rounds.tick(store)) is None:
            cast += more_votes(settings, annotators, accuracy, oracle, seed + 1000 * number + cast)
        run_jobs(settings)
        while (current := round_rows.get_round(store.db, current["id"]))["status"] == "collecting":
            cast += more_votes(settings, annotators, accuracy, oracle, seed + 1000 * number + cast)
            rounds.tick(store)
            # The arena picks pairs by its own rule, not for the child: give it room before giving up.
            if cast > 2 * votes_per_round + 50 * cap:
                raise RuntimeError(f"round {number} undecided after {cast} votes")
        round_minutes = (time.perf_counter() - round_started) / 60
        (shown,) = [r for r in rounds.rounds_report(store) if r["id"] == current["id"]]
        champion = rounds.champion(store)
        measured = time.perf_counter()
        versus = (None if champion == first else
                  against_starter(settings, champion, first, pool_prompts, eval_ids, oracle, seed, f"judge-{number}"))
        row = {"round": number, "status": shown["status"], "parent": shown["parent"]["name"],
               "reward_model": shown["reward_model"], "votes_used": shown["votes_used"], "votes_cast": cast,
               "children": shown["children"], "decision": shown["decision"], "reason": shown["reason"],
               "champion": models.get_model(store.db, champion).name, "champion_vs_starter": versus,
               "minutes": round(round_minutes, 2), "judge_minutes": round((time.perf_counter() - measured) / 60, 2)}
        report["rounds"].append(row)
        _log(summary_line(row))
    report["champion_history"] = rounds.champion_history(store)
    report["minutes"] = round((time.perf_counter() - started) / 60, 2)
    return report


def summary_line(row: dict) -> str:
    versus = row["champion_vs_starter"]
    judged = ("the starter" if versus is None else
              f"{versus['win_rate']:.3f} [{versus['ci95'][0]:.3f}, {versus['ci95'][1]:.3f}] vs the starter")
    return (f"round {row['round']}: {row['decision'] or row['status']}, champion {row['champion']} ({judged}), "
            f"{row['votes_cast']} votes, {row['minutes']:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size on the tiny starter (minutes on 2 cores)")
    parser.add_argument("--starter", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, help="where the data dir goes (default: a temporary folder, removed)")
    parser.add_argument("--prompts", type=int, default=24, help="prompts in the arena pool")
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts the champion is judged on")
    parser.add_argument("--votes-per-round", type=int, default=192,
                        help="new votes that start a round (the recipe's every_votes)")
    parser.add_argument("--steps", default="raft", help="the recipe's policy steps, comma-separated")
    parser.add_argument("--min-votes", type=int, default=48, help="votes a child needs against its parent")
    parser.add_argument("--max-votes", type=int, help="the vote cap (default: min votes)")
    parser.add_argument("--set", action="append", default=[], metavar="KIND.KEY=VALUE",
                        help="a step's job parameter, e.g. raft.k=4 (repeatable; JSON values parse)")
    parser.add_argument("--annotators", type=int, default=64,
                        help="simulated annotators (each judges a pair of stories once)")
    parser.add_argument("--accuracy", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--oracle-min-words", type=int, default=Oracle.min_words)
    parser.add_argument("--oracle-max-words", type=int, default=Oracle.max_words)
    parser.add_argument("--generation-batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        # A 2-layer random model writing 32 tokens: an oracle length band it can reach, tiny steps.
        args.rounds, args.prompts, args.eval_prompts, args.max_new_tokens = 2, 12, 16, 32
        args.votes_per_round, args.min_votes, args.annotators = 24, 6, 96
        args.oracle_min_words, args.oracle_max_words = 12, 40
        args.set = ["reward.max_steps=8", "reward.min_pairs=4", "raft.k=2", "raft.prompts=8", "raft.max_steps=4",
                    "raft.learning_rate=0.001", *args.set]
        args.device = "cpu"
    try:
        recipe = {"steps": [s.strip() for s in args.steps.split(",") if s.strip()], "min_votes": args.min_votes,
                  "max_votes": args.max_votes, "step_params": parse_overrides(args.set) or None}
        rounds.RoundRecipe.from_dict({**recipe, "every_votes": args.votes_per_round})
    except ValueError as exc:
        parser.error(str(exc))
    # A random 2-layer model's stories are all bad: at quick size the oracle never says "both
    # bad" (those votes do not count towards a child's decision), so every round can be decided.
    oracle = Oracle(min_words=args.oracle_min_words, max_words=args.oracle_max_words,
                    **({"both_bad_below": 0.0} if args.quick else {}))
    # Trainers print logs on stdout; JSON only there.
    with work_dir(args.work_dir, "rounds-") as folder, contextlib.redirect_stdout(sys.stderr):
        report = run(folder, args.starter, args.rounds, args.prompts, args.eval_prompts, args.votes_per_round,
                     args.annotators, args.accuracy, recipe, args.max_new_tokens, oracle, args.device, args.seed,
                     args.generation_batch_size)
    report["command"] = " ".join(sys.argv[1:])
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
