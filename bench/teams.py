"""TeaMs-RL against random operation choice (WizardLM-style evolution) at equal query budgets.

    python -m bench.teams --quick                  # rules expert, MiniLM, budget 96: under a minute
    python -m bench.teams                          # rules expert, budget 400, 3 seeds
    python -m bench.teams --executor policy --model DIR_OR_starter --budget 96 --device cuda

Both instructors start from the same seed prompts with the same expert, encoder, novelty
threshold and budget; only the choice of operations differs. Per run it reports the set's
diversity (mean pairwise MiniLM cosine distance, distinct-1/2) with and without the starting
prompts, how many evolved prompts passed the reward's checks, and cluster coverage: k-means
(k = --clusters) on the starting prompts plus every prompt either instructor evolved from
them, and the share of those clusters each run's evolved prompts occupy. The target
diversity is a coverage (--target-coverage, default half the clusters); "queries_to_target"
is how many expert queries each run needed to reach it (None: not within the budget). `--model starter`
converts the packaged SmolLM2 into a temporary folder first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rlhf.encoders import MiniLMEncoder
from rlhf.generate import Decoding
from rlhf.prompts import SEED_PROMPTS
from rlhf.teams import (
    OPERATIONS,
    Instructor,
    PolicyExecutor,
    RandomInstructor,
    RuleExecutor,
    cluster_coverage,
    diversity,
    evolve,
    queries_to_reach,
)

METHODS = ("rl", "random")
QUICK = {"budget": 96, "prompts": 24, "seeds": 1, "clusters": 32}
FULL = {"budget": 400, "prompts": 60, "seeds": 3, "clusters": 64}


def _coverage_curve(run, reference_clusters, budget: int) -> list[float]:
    """Share of clusters the evolved prompts occupy after each query (index 0: none yet)."""
    k = reference_clusters.n_clusters
    labels = reference_clusters.predict(run.embeddings[run.initial:]) if run.evolved else []
    curve, seen, i = [0.0], set(), 0
    for query in range(1, budget + 1):
        while i < len(run.evolved) and run.evolved[i].query == query:
            seen.add(int(labels[i]))
            i += 1
        curve.append(len(seen) / k)
    return curve


def _executor(args, seed: int, expert):
    if args.executor == "rules":
        return RuleExecutor(seed)
    model, tokenizer = expert
    return PolicyExecutor(model, tokenizer, Decoding(temperature=0.8, max_new_tokens=args.max_new_tokens),
                          batch_size=args.episodes_per_round, seed=seed)


def _load_expert(args):
    if args.executor == "rules":
        return None
    from rlhf.models import load_causal_lm, prepare_starter, resolve_device

    source = args.model
    if source == "starter":
        source = str(prepare_starter(Path(tempfile.mkdtemp(prefix="teams-bench-"))))
    return load_causal_lm(source, resolve_device(args.device))


def run(args) -> dict:
    from sklearn.cluster import KMeans

    from rlhf.models import resolve_device

    started = time.perf_counter()
    encoder = MiniLMEncoder(resolve_device(args.device))
    expert = _load_expert(args)
    initial = list(SEED_PROMPTS[:args.prompts])
    runs = []
    for seed in range(args.seeds):
        evolutions = {}
        for method in METHODS:
            instructor = Instructor(seed=seed) if method == "rl" else RandomInstructor(seed)
            t0 = time.perf_counter()
            evolution = evolve(initial, _executor(args, seed, expert), encoder, instructor, args.budget,
                               args.threshold, args.episodes_per_round, args.steps_per_episode, seed=seed)
            evolutions[method] = (evolution, instructor, time.perf_counter() - t0)
            print(f"seed {seed} {method}: {len(evolution.evolved)} evolved prompts", file=sys.stderr, flush=True)
        reference = np.vstack([evolutions["rl"][0].embeddings] + [evolutions["random"][0].embeddings[len(initial):]])
        clusters = KMeans(n_clusters=min(args.clusters, len(reference)), n_init=4, random_state=seed).fit(reference)
        curves = {m: _coverage_curve(e, clusters, args.budget) for m, (e, _, _) in evolutions.items()}
        for method, (evolution, _, seconds) in evolutions.items():
            set_coverage, = cluster_coverage(reference, [evolution.embeddings], args.clusters, seed)
            runs.append({
                "seed": seed, "method": method, "queries": evolution.queries, "evolved": len(evolution.evolved),
                "set": diversity(evolution.texts, evolution.embeddings),
                "evolved_only": diversity(evolution.texts[len(initial):], evolution.embeddings[len(initial):]),
                "coverage_set": set_coverage,
                "coverage_evolved": curves[method][-1],
                "queries_to_target": queries_to_reach(curves[method], args.target_coverage),
                "chosen": {op: evolution.chosen.count(op) for op in OPERATIONS},
                "seconds": seconds,
            })

    def mean(method: str, *keys) -> float | None:
        values = []
        for r in runs:
            if r["method"] == method:
                value = r
                for key in keys:
                    value = value[key]
                if value is not None:
                    values.append(value)
        return statistics.fmean(values) if values else None

    summary = {m: {
        "evolved": mean(m, "evolved"),
        "set_mean_pairwise_distance": mean(m, "set", "mean_pairwise_distance"),
        "evolved_mean_pairwise_distance": mean(m, "evolved_only", "mean_pairwise_distance"),
        "set_distinct_2": mean(m, "set", "distinct_2"),
        "evolved_distinct_2": mean(m, "evolved_only", "distinct_2"),
        "coverage_set": mean(m, "coverage_set"),
        "coverage_evolved": mean(m, "coverage_evolved"),
        "queries_to_target": mean(m, "queries_to_target"),
    } for m in METHODS}
    rl, rnd = summary["rl"], summary["random"]
    return {
        "config": {k: getattr(args, k) for k in ("budget", "prompts", "seeds", "clusters", "target_coverage",
                                                 "threshold", "executor", "episodes_per_round", "steps_per_episode")},
        "summary": summary,
        "rl_over_random": {
            "evolved": rl["evolved"] / rnd["evolved"] if rnd["evolved"] else None,
            "coverage_evolved": rl["coverage_evolved"] / rnd["coverage_evolved"] if rnd["coverage_evolved"] else None,
            "queries_to_target": (rl["queries_to_target"] / rnd["queries_to_target"]
                                  if rl["queries_to_target"] is not None and rnd["queries_to_target"] else None),
        },
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.teams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"CI size: {QUICK}")
    parser.add_argument("--budget", type=int, help="expert queries per run")
    parser.add_argument("--prompts", type=int, help="seed prompts to start from")
    parser.add_argument("--seeds", type=int, help="repeats with different seeds")
    parser.add_argument("--clusters", type=int, help="k-means clusters for coverage")
    parser.add_argument("--target-coverage", type=float, default=0.5, help="share of clusters the target diversity is")
    parser.add_argument("--threshold", type=float, default=0.1, help="novelty a prompt needs")
    parser.add_argument("--episodes-per-round", type=int, default=4)
    parser.add_argument("--steps-per-episode", type=int, default=2)
    parser.add_argument("--executor", choices=("rules", "policy"), default="rules")
    parser.add_argument("--model", default="starter", help="expert for --executor policy: a model folder or 'starter'")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
