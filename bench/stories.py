"""Stories worth judging: how often the starter policies' stories end, loop or are cut.

    python -m bench.stories --starter smollm2 --prompts 64 --json --work-dir /tmp/stories-bench
    python -m bench.stories --starter smollm2 --prompts 16 --decodings '[{"temperature": 0.7}, ...]'
    python -m bench.stories --quick --json      # the tiny starter, a few seconds

Each decoding (by default the starter policies', with the pool's token budget filled in as the
pool job does) writes one story for each of the first --prompts seed prompts, in batches as the
pool job does, and every story is scored by the Metrics tab's own story metrics
(rlhf.story_metrics.story_metric_values: `ending`, `loop`). Prints JSON per decoding: the shares of
stories with a finished ending, with a loop and cut at the token budget (Wilson 95% intervals),
the mean story tokens (t interval) and useful tokens per second. `--decodings` puts candidate
settings side by side in one run, on the same prompts and seed: that is how the starter
policies' settings were chosen.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy import stats

from bench.workdir import work_dir
from rlhf.generate import Decoding, generate_stories
from rlhf.metrics import t_interval
from rlhf.models import (
    build_tiny_starter,
    load_causal_lm,
    prepare_starter,
    resolve_device,
)
from rlhf.prompts import SEED_PROMPTS
from rlhf.settings import Settings
from rlhf.starters import STARTER_POLICIES
from rlhf.story_metrics import story_metric_values

QUICK_PROMPTS = 8
QUICK_MAX_NEW_TOKENS = 32


def _share(flags: list[bool]) -> dict:
    """A share with its Wilson 95% interval (honest at 0 or 1, unlike a t interval)."""
    hits = sum(flags)
    interval = stats.binomtest(hits, len(flags)).proportion_ci(0.95, method="wilson")
    return {"share": round(hits / len(flags), 3), "ci95": [round(interval.low, 3), round(interval.high, 3)]}


def measure(model, tokenizer, prompts: list[str], decoding: Decoding, batch_size: int, seed: int) -> dict:
    """One decoding on every prompt: the story metrics the pool would store, summarised."""
    started = time.perf_counter()
    stories = generate_stories(model, tokenizer, prompts, decoding, batch_size=batch_size, seed=seed)
    seconds = time.perf_counter() - started
    values = [story_metric_values(p, s.text) for p, s in zip(prompts, stories)]
    tokens = [s.tokens for s in stories]
    mean_tokens = t_interval(len(tokens), statistics.fmean(tokens), statistics.fmean(t * t for t in tokens))
    return {
        "decoding": decoding.to_dict(),
        "stories": len(stories),
        "ending": _share([v["ending"] == 1.0 for v in values]),
        "loop": _share([v["loop"] == 1.0 for v in values]),
        "truncated": _share([s.truncated for s in stories]),
        "mean_tokens": {"mean": round(mean_tokens.mean, 1),
                        "ci95": [round(mean_tokens.low, 1), round(mean_tokens.high, 1)]},
        "mean_words": round(statistics.fmean(v["length"] for v in values), 1),
        "tokens_per_s": round(sum(tokens) / seconds, 1),
        "seconds": round(seconds, 1),
        "examples": [s.text for s in stories[:2]],
    }


def starter_decodings(starter: str, max_new_tokens: int) -> dict[str, Decoding]:
    """The starter policies' decodings, completed with the budget as fill_pool does."""
    return {name: Decoding.from_dict({"max_new_tokens": max_new_tokens, **d}) for name, d in STARTER_POLICIES[starter]}


def parse_decodings(text: str, max_new_tokens: int) -> dict[str, Decoding]:
    """`--decodings`: a JSON list of Decoding fields, each optionally with a "name"."""
    items = json.loads(text)
    if not isinstance(items, list) or not items or not all(isinstance(d, dict) for d in items):
        raise ValueError("--decodings must be a non-empty JSON list of objects")
    named = {}
    for index, item in enumerate(items):
        fields = {k: v for k, v in item.items() if k != "name"}
        named[str(item.get("name", f"decoding-{index}"))] = Decoding.from_dict({"max_new_tokens": max_new_tokens,
                                                                                **fields})
    return named


def run(model_source: str, starter: str, decodings: dict[str, Decoding], prompt_count: int,
        batch_size: int, seed: int, device_name: str) -> dict:
    if not 2 <= prompt_count <= len(SEED_PROMPTS):
        raise ValueError(f"--prompts must be between 2 and {len(SEED_PROMPTS)} (the seed prompts)")
    model, tokenizer = load_causal_lm(model_source, resolve_device(device_name))
    prompts = list(SEED_PROMPTS[:prompt_count])
    report = {"starter": starter, "prompts": prompt_count, "batch_size": batch_size, "seed": seed,
              "torch_threads": torch.get_num_threads(), "policies": {}}
    for name, decoding in decodings.items():
        print(f"{name}: {prompt_count} stories with {decoding.to_dict()}", file=sys.stderr, flush=True)
        report["policies"][name] = measure(model, tokenizer, prompts, decoding, batch_size, seed)
        summary = {k: report["policies"][name][k] for k in ("ending", "loop", "truncated", "mean_tokens", "seconds")}
        print(f"{name}: {json.dumps(summary)}", file=sys.stderr, flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starter", choices=list(STARTER_POLICIES), default="smollm2")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help=f"the tiny starter, {QUICK_PROMPTS} prompts: seconds")
    parser.add_argument("--work-dir", type=Path,
                        help="keeps the converted starter between runs (default: a temporary folder)")
    parser.add_argument("--decodings",
                        help='JSON list of decodings to compare, e.g. [{"name": "a", "temperature": 0.7}]')
    parser.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens,
                        help="token budget where a decoding sets none (default: the pool's)")
    parser.add_argument("--batch-size", type=int, default=Settings.generation_batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print the whole report (else one line per decoding)")
    args = parser.parse_args()
    if args.quick:
        args.starter, args.prompts = "tiny", QUICK_PROMPTS
        args.max_new_tokens, args.device = QUICK_MAX_NEW_TOKENS, "cpu"
    try:
        decodings = (parse_decodings(args.decodings, args.max_new_tokens) if args.decodings
                     else starter_decodings(args.starter, args.max_new_tokens))
    except ValueError as exc:
        parser.error(str(exc))
    with work_dir(args.work_dir, "stories-bench-") as folder:
        models_dir = folder / "models"
        source = (build_tiny_starter(models_dir, SEED_PROMPTS) if args.starter == "tiny"
                  else prepare_starter(models_dir))
        report = run(str(source), args.starter, decodings, args.prompts, args.batch_size, args.seed, args.device)
    report["command"] = " ".join(["python -m bench.stories", *sys.argv[1:]])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, row in report["policies"].items():
            print(f"{name}: ending {row['ending']['share']} loop {row['loop']['share']} "
                  f"truncated {row['truncated']['share']} tokens {row['mean_tokens']['mean']}")


if __name__ == "__main__":
    main()
