"""The closed loop, measured: simulated votes -> reward model -> RLOO, DPO and DPH best-of-k
-> does each new policy beat its parent under the annotators' hidden preference?

    python -m bench.closed_loop --quick                       # tiny starter, CI size
    python -m bench.closed_loop --starter smollm2 --work-dir DIR --prompts 48 --eval-prompts 64

Every step is the product's own path, in process: `prepare` (first start), annotators of
known accuracy voting through rlhf.arena (the functions behind the HTTP endpoints; the
HTTP layer itself is measured by bench/voting.py), then the `reward`, `rloo`, `dpo` and
`dph` jobs exactly as `python -m rlhf train KIND` runs them. Each child policy and its
parent then write stories for held-out prompts (prompts the vote pool never covered) by the
pool job's own generation path, best-of-k included, and the oracle judges each pair:
win = 1, tie or both bad = 1/2. Prints JSON: per method, the child's win rate against its
parent with a 95% interval resampled over prompts (rlhf.heldout.rate_interval: right at
small counts too, where a bootstrap alone gives all-wins a zero-width interval), the oracle's
mean score of both, and each job's metrics and seconds.

On the tiny random starter the loop shows the plumbing works end to end and how far a
2-layer random model moves in a few steps; whether RLHF makes stories better is a question
for the real starter (second command).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rlhf import arena
from rlhf.heldout import rate_interval
from rlhf.jobs import run_inline
from rlhf.pool import fill_pool
from rlhf.prepare import prepare
from rlhf.prompts import SEED_PROMPTS
from rlhf.settings import Settings
from rlhf.simulate import Annotator, Oracle
from storage import completions, models, prompts

METHODS = ("rloo", "dpo", "dph")


def _log(message: str) -> None:
    print(f"[closed-loop] {message}", file=sys.stderr, flush=True)


def cast_votes(settings: Settings, annotators: int, votes: int, accuracy: float, oracle: Oracle, seed: int) -> dict:
    """Each simulated annotator judges up to `votes` pairs the arena serves them."""
    store = settings.store()
    rng = random.Random(seed)
    cast = agree = 0
    for i in range(annotators):
        annotator = Annotator(f"sim-{i}", accuracy)
        who = arena.sign_in(store, settings, annotator.name)
        for _ in range(votes):
            view = arena.next_pair(store, who["id"], rng)
            if view is None:
                break
            choice = annotator.choose(oracle, view.prompt, view.story_a, view.story_b, rng)
            arena.submit_vote(store, settings, who["id"], view, choice)
            cast += 1
            agree += choice == oracle.prefers(view.prompt, view.story_a, view.story_b)
    return {"votes": cast, "oracle_agreement": agree / cast if cast else None}


def train(settings: Settings, kind: str, params: dict) -> tuple[dict, float]:
    started = time.perf_counter()
    job = run_inline(settings, kind, params)
    seconds = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise RuntimeError(f"the {kind} job {job['status']}: {job['error']}")
    return job, seconds


def child_policy(settings: Settings, job: dict) -> int:
    """The story policy a job registered (DPH also registers its head as a reward model)."""
    found = [m.id for m in models.list_models(settings.store().db) if m.job_id == job["id"] and m.kind != "reward"]
    if not found:
        raise RuntimeError(f"job {job['id']} registered no policy")
    return found[0]


def head_to_head(settings: Settings, child: int, parent: int, eval_ids: list[int], oracle: Oracle,
                 seed: int) -> dict:
    """Both policies' stories for the held-out prompts, judged by the oracle."""
    store = settings.store()
    outcomes, judged, child_scores, parent_scores = [], [], [], []
    for prompt_id in eval_ids:
        text = prompts.get_prompt(store.db, prompt_id)["text"]
        by_model = {c["model_id"]: c["text"] for c in completions.completions_for_prompt(store.db, prompt_id)}
        if child not in by_model or parent not in by_model:
            continue
        verdict = oracle.prefers(text, by_model[child], by_model[parent])
        outcomes.append({"a": 1.0, "b": 0.0}.get(verdict, 0.5))
        judged.append(prompt_id)
        child_scores.append(oracle.score(text, by_model[child]))
        parent_scores.append(oracle.score(text, by_model[parent]))
    data = np.array(outcomes)
    low, high = rate_interval(data, judged, seed)
    return {
        "pairs": len(outcomes), "win_rate": round(float(data.mean()), 3),
        "ci95": [round(low, 3), round(high, 3)],
        "wins": int((data == 1.0).sum()), "losses": int((data == 0.0).sum()), "ties": int((data == 0.5).sum()),
        "oracle_score_child": round(statistics.fmean(child_scores), 3),
        "oracle_score_parent": round(statistics.fmean(parent_scores), 3),
    }


def run(work_dir: Path, starter: str, pool_prompts: int, eval_prompts: int, annotators: int, votes: int,
        accuracy: float, max_new_tokens: int, steps: dict[str, int | None], oracle: Oracle,
        device: str, seed: int, learning_rate: float | None = None) -> dict:
    if pool_prompts + eval_prompts > len(SEED_PROMPTS):
        raise ValueError(f"--prompts plus --eval-prompts must be at most {len(SEED_PROMPTS)}.")
    settings = Settings(data_dir=work_dir / "data", starter=starter, pool_prompts=pool_prompts,
                        max_new_tokens=max_new_tokens, device=device,
                        min_vote_seconds=0.0)  # simulated annotators need no reading time
    report: dict = {"starter": starter, "pool_prompts": pool_prompts, "eval_prompts": eval_prompts,
                    "max_new_tokens": max_new_tokens, "oracle": asdict(oracle), "seconds": {}}
    started = time.perf_counter()
    store = settings.store()
    parent = prepare(store, settings, lambda f, m: _log(m))[0].id
    report["seconds"]["prepare"] = round(time.perf_counter() - started, 1)

    report["votes"] = cast_votes(settings, annotators, votes, accuracy, oracle, seed)
    _log(f"{report['votes']['votes']} simulated votes")
    reward_job, report["seconds"]["reward"] = train(settings, "reward", _with_steps({"base": parent}, steps["reward"]))
    reward_model = reward_job["result_model_id"]
    report["reward"] = reward_job["metrics"]

    eval_ids = [r["id"] for r in prompts.list_prompts(store.db)[pool_prompts:pool_prompts + eval_prompts]]
    rate = {} if learning_rate is None else {"learning_rate": learning_rate}
    method_params = {
        "rloo": {"base": parent, "reward_model": reward_model, **rate},
        "dpo": {"base": parent, **rate},
        "dph": {"base": parent},
    }
    report["methods"] = {}
    for method in METHODS:
        _log(f"training {method}")
        job, seconds = train(settings, method, _with_steps(method_params[method], steps[method]))
        child = child_policy(settings, job)
        gen_started = time.perf_counter()
        fill_pool(store, settings, [parent, child], pool_prompts + eval_prompts, lambda f, m: None, seed=seed)
        report["methods"][method] = {
            "child": child, "train_seconds": round(seconds, 1),
            "generate_seconds": round(time.perf_counter() - gen_started, 1),
            "metrics": job["metrics"], **head_to_head(settings, child, parent, eval_ids, oracle, seed),
        }
        _log(f"{method}: win rate {report['methods'][method]['win_rate']} {report['methods'][method]['ci95']}")
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)
    return report


def _with_steps(params: dict, max_steps: int | None) -> dict:
    return params if max_steps is None else {**params, "max_steps": max_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size on the tiny starter (a few minutes on 2 cores)")
    parser.add_argument("--starter", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--work-dir", type=Path, help="where the data dir goes (default: a temporary folder, removed)")
    parser.add_argument("--prompts", type=int, default=24, help="prompts in the vote pool")
    parser.add_argument("--eval-prompts", type=int, default=48, help="held-out prompts the win rate is measured on")
    parser.add_argument("--annotators", type=int, default=4)
    parser.add_argument("--votes", type=int, default=24, help="votes per annotator (at most one per prompt)")
    parser.add_argument("--accuracy", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--oracle-min-words", type=int, default=Oracle.min_words)
    parser.add_argument("--oracle-max-words", type=int, default=Oracle.max_words)
    for kind in ("reward", *METHODS):
        parser.add_argument(f"--{kind}-steps", type=int, help=f"max_steps of the {kind} job (default: its quick preset)")
    parser.add_argument("--learning-rate", type=float, help="RLOO and DPO learning rate (default: the job's own)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        # A 2-layer random model writing 40 tokens: an oracle length band it can reach.
        args.prompts, args.eval_prompts, args.votes, args.max_new_tokens = 32, 32, 32, 40
        args.oracle_min_words, args.oracle_max_words = 12, 40
        args.reward_steps = args.reward_steps or 30
        args.rloo_steps = args.rloo_steps or 12
        args.dpo_steps = args.dpo_steps or 12
        args.dph_steps = args.dph_steps or 30
        args.learning_rate = args.learning_rate or 1e-3  # a random 2-layer model needs large steps
        args.device = "cpu"
    steps = {kind: getattr(args, f"{kind}_steps") for kind in ("reward", *METHODS)}
    oracle = Oracle(min_words=args.oracle_min_words, max_words=args.oracle_max_words)
    temporary = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="closed-loop-")) if temporary else args.work_dir
    try:
        with contextlib.redirect_stdout(sys.stderr):  # trainers print logs on stdout; JSON only there
            report = run(work_dir, args.starter, args.prompts, args.eval_prompts, args.annotators, args.votes,
                         args.accuracy, args.max_new_tokens, steps, oracle, args.device, args.seed,
                         args.learning_rate)
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    report["command"] = " ".join(sys.argv[1:])
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
