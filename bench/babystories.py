"""BabyStories: does the larger from-scratch model gain more from RLHF?

For each size (`small`, then `base`; rlhf.pretrain) the bench pretrains a GPT-2 from scratch
on a TinyStories corpus with the `pretrain` job, then runs the closed loop of
bench.closed_loop from that model (bench.closed_loop.loop_from): the pretrained policy and
the same weights at temperature 1.0 write the vote pool, simulated annotators of known
accuracy vote through rlhf.arena, the `reward` job learns from the votes, one policy job
(default `raft`) improves the pretrained policy, and child and parent write stories for
held-out prompts the pool never covered, judged by the hidden oracle (win 1, tie or both
bad 1/2) with a 95% interval resampled over prompts (rlhf.heldout.rate_interval). Each
size has its own data dir, so its votes are on its own stories only.

    python -m bench.babystories --quick           # CI: corpus distilled from the tiny starter's pool, minutes
    python -m bench.babystories --work-dir DIR    # CPU: TinyStories head, the quick pretrain presets
    python -m bench.babystories --device cuda --preset full --pretrain-steps 500 --prompts 120 \\
        --eval-prompts 120 --votes 1920 --max-new-tokens 160 --work-dir DIR          # GPU size

The full pretrain presets' step counts (6,000 and 20,000) are meant for a corpus far larger
than the 2,316-story TinyStories head (about 2 M characters); there, 500 steps are about 8 passes
for `small` (32 blocks of 256 tokens a step) and 16 for `base` (blocks of 512).

Prints JSON: per size the pretraining metrics (parameters, steps, held-out perplexity) and
the method's win rate over the pretrained parent with its interval, ties, the oracle's mean
score gain (child minus parent), KL to the parent and minutes; then `base_minus_small`, the
differences of win rate and oracle score gain, and `answer`, which says "no answer" unless
the two win-rate intervals are disjoint. The figures come from simulated annotators (the
oracle: prompt words used, no repetition, an ending, length in a band), not from people.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.closed_loop import METHODS, TRAINED_KINDS, child_policy, loop_from, parse_overrides, train
from bench.workdir import work_dir
from rlhf.pool import fill_pool
from rlhf.prepare import prepare
from rlhf.prompts import SEED_PROMPTS
from rlhf.settings import Settings
from rlhf.simulate import Oracle
from rlhf.training import register_checkpoint
from storage import models

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "tinystories_train_head.jsonl"
SIZES = ("small", "base")
SIBLING_DECODING = {"temperature": 1.0, "top_p": 0.95}
# CI size: a few optimizer steps on a corpus distilled from the tiny starter's pool.
QUICK_PRETRAIN = {"max_steps": 10, "batch_size": 4, "block_size": 128, "vocab_size": 400, "eval_fraction": 0.2}


def _log(message: str) -> None:
    print(f"[babystories] {message}", file=sys.stderr, flush=True)


def pretrained_parent(settings: Settings, size: str, corpus: dict | None, preset: str,
                      pretrain: dict) -> tuple[int, dict]:
    """First start (the starter and its pool), then the pretrain job; the starter policies
    leave the arena and the pretrained model writes the vote pool at two temperatures.
    corpus None: distilled from the first starter's pool. Returns the pretrained policy and
    its job's metrics with the job's seconds."""
    store = settings.store()
    starters = prepare(store, settings, lambda f, m: _log(m))
    corpus = corpus or {"distill": starters[0].id}
    job, seconds = train(settings, "pretrain", {"size": size, "preset": preset, "corpus": corpus,
                                                "name": f"babystories-{size}", **pretrain})
    parent = child_policy(settings, job)
    for starter in starters:
        models.set_active(store.db, starter.id, False)
    record = models.get_model(store.db, parent)
    sibling = register_checkpoint(store, settings, name=f"{record.name}-t1.0", kind=record.kind,
                                  path=Path(record.path), parent=record, job_id=None, metrics={},
                                  decoding=dict(SIBLING_DECODING))
    _log(f"{size}: writing the vote pool")
    fill_pool(store, settings, [parent, sibling.id], settings.pool_prompts, lambda f, m: None, seed=0)
    return parent, {**job["metrics"], "seconds": round(seconds, 1)}


def run_size(work_dir: Path, size: str, corpus: dict | None, pretrain: dict, args, oracle: Oracle,
             overrides: dict) -> dict:
    """Pretrain one size and run the closed loop from it."""
    settings = Settings(data_dir=work_dir / size / "data", starter="tiny", pool_prompts=args.prompts,
                        max_new_tokens=args.max_new_tokens, device=args.device,
                        generation_batch_size=args.generation_batch_size, min_vote_seconds=0.0)
    started = time.perf_counter()
    parent, pretrained = pretrained_parent(settings, size, corpus, args.preset, pretrain)
    report: dict = {"seconds": {}}
    annotators = args.annotators or math.ceil(args.votes / args.prompts)
    loop_from(settings, parent, report, args.prompts, args.eval_prompts, annotators, args.votes, args.accuracy,
              {kind: None for kind in TRAINED_KINDS}, oracle, args.seed, args.learning_rate, (args.method,), overrides)
    result = report["methods"][args.method]
    return {
        "parameters": pretrained["parameters"], "pretrain_steps": pretrained["steps"],
        "eval_perplexity": pretrained["eval_perplexity"], "votes": report["votes"],
        "reward_heldout": report["reward"].get("heldout"),
        "method": args.method, "win_rate": result["win_rate"], "ci95": result["ci95"], "pairs": result["pairs"],
        "wins": result["wins"], "losses": result["losses"], "ties": result["ties"],
        "oracle_score_parent": result["oracle_score_parent"], "oracle_score_child": result["oracle_score_child"],
        "oracle_score_gain": round(result["oracle_score_child"] - result["oracle_score_parent"], 3),
        "kl": result["kl"], "steps": result["steps"], "minutes": round((time.perf_counter() - started) / 60, 2),
        "pretrain": pretrained, "method_metrics": result["metrics"],
    }


def comparison(results: dict) -> dict:
    """base minus small, and whether the win-rate intervals answer the question."""
    small, base = results["small"], results["base"]
    disjoint = base["ci95"][0] > small["ci95"][1] or small["ci95"][0] > base["ci95"][1]
    larger = "base" if base["win_rate"] > small["win_rate"] else "small"
    return {
        "win_rate": round(base["win_rate"] - small["win_rate"], 3),
        "oracle_score_gain": round(base["oracle_score_gain"] - small["oracle_score_gain"], 3),
        "answer": (f"{larger} gains more from RLHF (win-rate intervals disjoint)" if disjoint else
                   "no answer at this size: the two win-rate intervals overlap"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.babystories", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI size on CPU: corpus distilled from the tiny starter, 10 pretrain steps, 64 votes")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=".jsonl ({\"text\": ...}) or .txt stories")
    parser.add_argument("--sizes", default=",".join(SIZES), help="pretrain sizes, in order")
    parser.add_argument("--preset", choices=["quick", "full"], default="quick",
                        help="pretrain budget: quick (minutes on CPU) or full (a GPU)")
    parser.add_argument("--pretrain-steps", type=int, help="pretrain max_steps of every size (default: the preset's)")
    parser.add_argument("--method", choices=[m for m, kind in METHODS.items() if kind], default="raft",
                        help="the policy job that improves the pretrained model")
    parser.add_argument("--work-dir", type=Path, help="where the data dirs go (default: a temporary folder, removed)")
    parser.add_argument("--prompts", type=int, default=48, help="prompts in the vote pool")
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts the win rate is measured on")
    parser.add_argument("--votes", type=int, default=384, help="simulated votes per size")
    parser.add_argument("--annotators", type=int, help="default: enough for --votes at one vote per prompt each")
    parser.add_argument("--accuracy", type=float, default=0.9, help="chance a simulated vote follows the oracle")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, help="the method's learning rate (default: the job's own)")
    parser.add_argument("--set", action="append", default=[], metavar="KIND.KEY=VALUE",
                        help="one job parameter for one kind, e.g. raft.epochs=3 (repeatable)")
    parser.add_argument("--generation-batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    oracle = Oracle()
    corpus: dict | None = {"file": str(args.corpus)}
    pretrain = {} if args.pretrain_steps is None else {"max_steps": args.pretrain_steps}
    if args.quick:
        args.prompts, args.eval_prompts, args.votes, args.max_new_tokens, args.device = 16, 16, 64, 40, "cpu"
        args.learning_rate = args.learning_rate or 1e-3  # a barely trained model needs large steps
        args.set = ["reward.max_steps=12", "raft.prompts=8", *args.set]
        oracle = Oracle(min_words=12, max_words=40)  # a band 40 tokens can reach
        corpus = None  # distilled from the tiny starter's pool
        pretrain = {**QUICK_PRETRAIN, **pretrain}
    sizes = [s for s in args.sizes.split(",") if s]
    if not sizes or any(s not in SIZES for s in sizes):
        parser.error(f"--sizes: choose from {', '.join(SIZES)}")
    if args.prompts + args.eval_prompts > len(SEED_PROMPTS):
        parser.error(f"--prompts plus --eval-prompts must be at most {len(SEED_PROMPTS)}")
    if corpus is not None and not args.corpus.is_file():
        parser.error(f"--corpus: no file at {args.corpus}")
    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        parser.error(str(exc))

    started = time.perf_counter()
    with work_dir(args.work_dir, "babystories-") as folder:
        results = {size: run_size(folder, size, corpus, pretrain, args, oracle, overrides) for size in sizes}
    for size, row in results.items():
        low, high = row["ci95"]
        _log(f"{size}: {row['parameters']} parameters, {args.method} win {row['win_rate']:.3f} [{low:.3f}, "
             f"{high:.3f}], oracle gain {row['oracle_score_gain']:+.3f}, {row['minutes']:.1f} min")
    report = {
        "quick": args.quick, "corpus": "distilled from the tiny starter's pool" if args.quick else args.corpus.name,
        "preset": args.preset, "pretrain_overrides": pretrain, "method": args.method, "device": args.device,
        "prompts": args.prompts, "eval_prompts": args.eval_prompts, "votes": args.votes, "accuracy": args.accuracy,
        "max_new_tokens": args.max_new_tokens, "oracle": asdict(oracle), "sizes": results,
        "minutes": round((time.perf_counter() - started) / 60, 2),
    }
    if {"small", "base"} <= set(results):
        report["base_minus_small"] = comparison(results)
    return report


if __name__ == "__main__":
    with contextlib.redirect_stdout(sys.stderr):  # trainers print logs on stdout; JSON only there
        document = main()
    document["command"] = " ".join(sys.argv[1:])
    print(json.dumps(document, indent=2, default=str))
