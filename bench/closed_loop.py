"""The closed loop, measured: simulated votes -> reward model -> RLOO, DPO, RAFT, and
best-of-k under the DPH head or the reward model -> does each new policy beat its parent
under the annotators' hidden preference?

    python -m bench.closed_loop --quick                       # tiny starter, CI size
    python -m bench.closed_loop --starter smollm2 --work-dir DIR --prompts 48 --eval-prompts 64
    python -m bench.closed_loop --starter smollm2 --methods raft,rm-bo4 --eval-prompts 128

Every step is the product's own path, in process: `prepare` (first start), annotators of
known accuracy voting through rlhf.arena (the functions behind the HTTP endpoints; the
HTTP layer itself is measured by bench/voting.py), then the `reward`, `rloo`, `dpo`, `dph`
and `raft` jobs exactly as `python -m rlhf train KIND` runs them; `rm-bo4` is the parent
with best-of-4 decoding reranked by the reward model (no training), beside `dph-bo4`. Each child policy and its
parent then write stories for held-out prompts (prompts the vote pool never covered) by the
pool job's own generation path, best-of-k included, and the oracle judges each pair:
win = 1, tie or both bad = 1/2. Prints JSON: per method, the child's win rate against its
parent with a 95% interval resampled over prompts (rlhf.heldout.rate_interval: right at
small counts too, where a bootstrap alone gives all-wins a zero-width interval), the oracle's
mean score of both, the child's KL to its parent on its own held-out stories
(rlhf.divergence.sampled_kl; for best-of-k policies that is the LM's drift, and
kl_best_of_k_bound = log k - (k-1)/k bounds what the selection adds), each job's
metrics and seconds, and a one-line summary per method on stderr.

On the tiny random starter the loop shows the plumbing works end to end and how far a
2-layer random model moves in a few steps; whether RLHF makes stories better is a question
for the real starter (second command).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench.workdir import work_dir
from rlhf import arena
from rlhf.divergence import sampled_kl
from rlhf.generate import Decoding
from rlhf.heldout import rate_interval
from rlhf.jobs import run_inline
from rlhf.models import load_causal_lm, resolve_device
from rlhf.pool import fill_pool
from rlhf.prepare import prepare
from rlhf.prompts import SEED_PROMPTS
from rlhf.raft import prompt_split
from rlhf.scoring import sampling_decoding
from rlhf.settings import Settings
from rlhf.simulate import Annotator, Oracle
from rlhf.training import register_checkpoint
from storage import completions, models, prompts
from storage import votes as votes_table

# Method -> the training kind behind it (None: a decoding of the parent, nothing trained).
METHODS = {"rloo": "rloo", "dpo": "dpo", "dph-bo4": "dph", "rm-bo4": None, "raft": "raft"}
TRAINED_KINDS = ("reward", "rloo", "dpo", "dph", "raft")
BEST_OF = 4
REAL_SIZE_VOTES = 384


def _log(message: str) -> None:
    print(f"[closed-loop] {message}", file=sys.stderr, flush=True)


def cast_votes(settings: Settings, annotators: int, votes: int, accuracy: float, oracle: Oracle, seed: int) -> dict:
    """Up to `votes` new votes, each simulated annotator judging the pairs the arena serves
    them (at most one per prompt) until that many are cast; the oracle agreement is over
    every stored human vote."""
    store = settings.store()
    rng = random.Random(seed)
    cast = 0
    for i in range(annotators):
        annotator = Annotator(f"sim-{i}", accuracy)
        who = arena.sign_in(store, settings, annotator.name)
        while cast < votes:
            view = arena.next_pair(store, who["id"], rng)
            if view is None:
                break
            choice = annotator.choose(oracle, view.prompt, view.story_a, view.story_b, rng)
            arena.submit_vote(store, settings, who["id"], view, choice)
            cast += 1
    agree = [v["choice"] == oracle.prefers(v["prompt"], v["text_a"], v["text_b"])
             for v in votes_table.preference_rows(store.db)]
    return {"votes": cast, "oracle_agreement": statistics.fmean(agree) if agree else None}


def train(settings: Settings, kind: str, params: dict) -> tuple[dict, float]:
    started = time.perf_counter()
    job = run_inline(settings, kind, params)
    seconds = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise RuntimeError(f"the {kind} job {job['status']}: {job['error']}")
    return job, seconds


def best_of_k_policy(settings: Settings, parent: int, reward_model: int) -> int:
    """The parent with best-of-k decoding reranked by the reward model: nothing trained."""
    store = settings.store()
    record = models.get_model(store.db, parent)
    decoding = {**sampling_decoding(record.decoding), "best_of": BEST_OF, "reranker": reward_model}
    return register_checkpoint(store, settings, name=f"{record.name}-rm-bo{BEST_OF}", kind=record.kind,
                               path=Path(record.path), parent=record, job_id=None, metrics={},
                               decoding=decoding).id


def policy_kl(settings: Settings, child: int, parent: int, eval_ids: list[int]) -> float:
    """KL of the child's LM to its parent's on the child's held-out stories."""
    store = settings.store()
    device = resolve_device(settings.device)
    record = models.get_model(store.db, child)
    temperature = Decoding.from_dict(sampling_decoding(record.decoding)).temperature
    child_lm, tokenizer = load_causal_lm(record.source, device)
    parent_lm, _ = load_causal_lm(models.get_model(store.db, parent).source, device)
    texts, stories = [], []
    for prompt_id in eval_ids:
        for c in completions.completions_for_prompt(store.db, prompt_id):
            if c["model_id"] == child:
                texts.append(prompts.get_prompt(store.db, prompt_id)["text"])
                stories.append(c["text"])
    return sampled_kl(child_lm, parent_lm, tokenizer, texts, stories, temperature)


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
        device: str, seed: int, learning_rate: float | None = None, methods: tuple[str, ...] = tuple(METHODS),
        overrides: dict[str, dict] | None = None, generation_batch_size: int = 8) -> dict:
    overrides = overrides or {}
    if pool_prompts + eval_prompts > len(SEED_PROMPTS):
        raise ValueError(f"--prompts plus --eval-prompts must be at most {len(SEED_PROMPTS)}.")
    settings = Settings(data_dir=work_dir / "data", starter=starter, pool_prompts=pool_prompts,
                        max_new_tokens=max_new_tokens, device=device, generation_batch_size=generation_batch_size,
                        min_vote_seconds=0.0)  # simulated annotators need no reading time
    report: dict = {"starter": starter, "pool_prompts": pool_prompts, "eval_prompts": eval_prompts,
                    "max_new_tokens": max_new_tokens, "oracle": asdict(oracle), "seconds": {}}
    started = time.perf_counter()
    store = settings.store()
    parent = prepare(store, settings, lambda f, m: _log(m))[0].id
    report["seconds"]["prepare"] = round(time.perf_counter() - started, 1)
    loop_from(settings, parent, report, pool_prompts, eval_prompts, annotators, votes, accuracy, steps, oracle, seed,
              learning_rate, methods, overrides)
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)
    return report


def loop_from(settings: Settings, parent: int, report: dict, pool_prompts: int, eval_prompts: int, annotators: int,
              votes: int, accuracy: float, steps: dict[str, int | None], oracle: Oracle, seed: int,
              learning_rate: float | None, methods: tuple[str, ...], overrides: dict[str, dict]) -> None:
    """The loop from a parent policy whose pool is written: simulated votes, the reward job,
    then each method's child judged against `parent`; fills report's votes, reward,
    methods and seconds. bench.babystories enters here with a pretrained parent."""
    store = settings.store()
    already = votes_table.human_vote_total(store.db)  # a rerun on the same --work-dir tops them up
    if already:
        _log(f"{already} votes already in the work dir")
    cast = cast_votes(settings, annotators, max(votes - already, 0), accuracy, oracle, seed)
    report["votes"] = {**cast, "votes": already + cast["votes"], "votes_before_this_run": already}
    _log(f"{report['votes']['votes']} simulated votes")
    reward_params = _with_steps({"base": parent, **overrides.get("reward", {})}, steps["reward"])
    reward_job, report["seconds"]["reward"] = train(settings, "reward", reward_params)
    reward_model = reward_job["result_model_id"]
    report["reward"] = reward_job["metrics"]

    eval_ids = [r["id"] for r in prompts.list_prompts(store.db)[pool_prompts:pool_prompts + eval_prompts]]
    rate = {} if learning_rate is None else {"learning_rate": learning_rate}
    # RAFT samples on the vote pool's training-side prompts only, never on the win-rate prompts.
    pool_texts = {r["text"] for r in prompts.list_prompts(store.db)[:pool_prompts]}
    raft_prompts = sum(t in pool_texts for t in prompt_split(store, "all", len(SEED_PROMPTS))[0])
    method_params = {
        "rloo": {"base": parent, "reward_model": reward_model, **rate},
        "dpo": {"base": parent, **rate},
        "dph": {"base": parent, "best_of": BEST_OF},
        "raft": {"base": parent, "reward_model": reward_model, "prompts": raft_prompts, "k": BEST_OF, **rate},
    }
    report["methods"] = {}
    for method in methods:
        kind = METHODS[method]
        _log(f"running {method}")
        if kind is None:
            job, seconds = {"metrics": {}}, 0.0
            child = best_of_k_policy(settings, parent, reward_model)
        else:
            job, seconds = train(settings, kind, _with_steps({**method_params[kind], **overrides.get(kind, {})},
                                                             steps[kind]))
            child = child_policy(settings, job)
        gen_started = time.perf_counter()
        fill_pool(store, settings, [parent, child], pool_prompts + eval_prompts, lambda f, m: None, seed=seed,
                  only=set(eval_ids))
        generate_seconds = time.perf_counter() - gen_started
        best_of = models.get_model(store.db, child).decoding.get("best_of")
        report["methods"][method] = {
            "child": child, "train_seconds": round(seconds, 1), "generate_seconds": round(generate_seconds, 1),
            "minutes": round((seconds + generate_seconds) / 60, 2), "steps": job["metrics"].get("steps"),
            "kl": round(policy_kl(settings, child, parent, eval_ids), 5),
            **({"kl_best_of_k_bound": round(math.log(best_of) - (best_of - 1) / best_of, 4)} if best_of else {}),
            "metrics": job["metrics"], **head_to_head(settings, child, parent, eval_ids, oracle, seed),
        }
        _log(summary_line(method, report["methods"][method]))


def summary_line(method: str, result: dict) -> str:
    """Win rate, interval, ties, KL to the parent, steps and minutes of one method."""
    low, high = result["ci95"]
    steps = result["steps"] if result["steps"] is not None else "-"
    return (f"{method:8s} win {result['win_rate']:.3f} [{low:.3f}, {high:.3f}]  ties {result['ties']}/"
            f"{result['pairs']}  KL {result['kl']:.5f}  steps {steps}  {result['minutes']:.1f} min")


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """`KIND.KEY=VALUE` strings as {kind: {key: value}}; values parse as JSON when they can."""
    overrides: dict[str, dict] = {}
    for item in items:
        target, sep, raw = item.partition("=")
        kind, dot, key = target.partition(".")
        if not sep or not dot or kind not in TRAINED_KINDS or not key:
            raise ValueError(f"--set {item!r}: expected KIND.KEY=VALUE with KIND one of {', '.join(TRAINED_KINDS)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(kind, {})[key] = value
    return overrides


def _with_steps(params: dict, max_steps: int | None) -> dict:
    return params if max_steps is None else {**params, "max_steps": max_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size on the tiny starter (a few minutes on 2 cores)")
    parser.add_argument("--starter", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--work-dir", type=Path, help="where the data dir goes (default: a temporary folder, removed)")
    parser.add_argument("--prompts", type=int, default=24, help="prompts in the vote pool")
    parser.add_argument("--eval-prompts", type=int, default=48, help="held-out prompts the win rate is measured on")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated methods to run (default: all of {', '.join(METHODS)})")
    parser.add_argument("--votes", type=int,
                        help=f"simulated votes in all (default: {REAL_SIZE_VOTES}; --quick: 128)")
    parser.add_argument("--annotators", type=int,
                        help="simulated annotators (default: enough for --votes at one vote per prompt each)")
    parser.add_argument("--accuracy", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--oracle-min-words", type=int, default=Oracle.min_words)
    parser.add_argument("--oracle-max-words", type=int, default=Oracle.max_words)
    for kind in TRAINED_KINDS:
        parser.add_argument(f"--{kind}-steps", type=int,
                            help=f"max_steps of the {kind} job (default: its quick preset)")
    parser.add_argument("--learning-rate", type=float, help="RLOO, DPO and RAFT learning rate (default: the job's own)")
    parser.add_argument("--set", action="append", default=[], metavar="KIND.KEY=VALUE",
                        help="one job parameter for one kind, e.g. raft.epochs=3 (repeatable; the value is read "
                             "as JSON when it parses, else as text)")
    parser.add_argument("--generation-batch-size", type=int, default=16,
                        help="stories per generate call (16 is about 1.5x the tokens per second of 8 on 2 cores)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        # A 2-layer random model writing 40 tokens: an oracle length band it can reach.
        args.prompts, args.eval_prompts, args.max_new_tokens = 32, 32, 40
        args.votes = args.votes or 128
        args.oracle_min_words, args.oracle_max_words = 12, 40
        args.reward_steps = args.reward_steps or 30
        args.rloo_steps = args.rloo_steps or 12
        args.dpo_steps = args.dpo_steps or 12
        args.dph_steps = args.dph_steps or 30
        args.learning_rate = args.learning_rate or 1e-3  # a random 2-layer model needs large steps
        args.device = "cpu"
    methods = tuple(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    votes = args.votes or REAL_SIZE_VOTES
    annotators = args.annotators or math.ceil(votes / args.prompts)
    steps = {kind: getattr(args, f"{kind}_steps") for kind in TRAINED_KINDS}
    oracle = Oracle(min_words=args.oracle_min_words, max_words=args.oracle_max_words)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        parser.error(str(exc))
    # Trainers print logs on stdout; JSON only there.
    with work_dir(args.work_dir, "closed-loop-") as folder, contextlib.redirect_stdout(sys.stderr):
        report = run(folder, args.starter, args.prompts, args.eval_prompts, annotators, votes,
                     args.accuracy, args.max_new_tokens, steps, oracle, args.device, args.seed,
                     args.learning_rate, methods, overrides, args.generation_batch_size)
    report["command"] = " ".join(sys.argv[1:])
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
