"""Live battle latency: an annotator types a prompt and two policies write side by side.

    python -m bench.live_battle --starter smollm2   # the packaged SmolLM2 starter (converted once, untimed)
    python -m bench.live_battle --quick             # the tiny random GPT-2: checks that it runs

Prepares the starter policies in a temporary data dir, loads the model once (as the app's
cache does after the first request; the load is reported apart), then asks for a story
--rounds times through rlhf.arena.live_battle, the path the Arena tab takes. Prints JSON:
seconds to the first streamed token and to both stories finished and stored, per round
and their medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlhf import arena
from rlhf.models import generation_dtype, load_causal_lm, resolve_device
from rlhf.prepare import starter_policies
from rlhf.prompts import SEED_PROMPTS
from rlhf.settings import Settings


def run(data_dir: Path, starter: str, rounds: int, max_new_tokens: int) -> dict:
    settings = Settings(data_dir=data_dir, starter=starter, device="cpu", max_new_tokens=max_new_tokens,
                        live_battles_per_hour=rounds)
    store = settings.store()
    policies = starter_policies(store, settings, lambda f, m: None)
    started = time.perf_counter()
    device = resolve_device(settings.device)
    load_causal_lm(policies[0].source, device, dtype=generation_dtype(device))  # the arena's own cache entry
    load_s = time.perf_counter() - started
    annotator = arena.sign_in(store, settings, "bench")["id"]
    table = []
    for round_no in range(rounds):
        prompt = f"{SEED_PROMPTS[round_no]} (asked live, round {round_no})"
        started = time.perf_counter()
        first_token_s = None
        for update in arena.live_battle(store, settings, annotator, prompt, random.Random(round_no)):
            if first_token_s is None and (update.story_a or update.story_b):
                first_token_s = time.perf_counter() - started
            view = update.view
        both_stories_s = time.perf_counter() - started
        stored = store.db["completions"].rows_where("id IN (?, ?)", [view.pair.completion_a, view.pair.completion_b])
        table.append({"first_token_s": round(first_token_s, 2), "both_stories_s": round(both_stories_s, 2),
                      "tokens": [c["tokens"] for c in stored]})
    return {
        "starter": starter, "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
        "max_new_tokens": max_new_tokens, "rounds": table, "model_load_s": round(load_s, 2),
        "first_token_s_median": statistics.median(r["first_token_s"] for r in table),
        "both_stories_s_median": statistics.median(r["both_stories_s"] for r in table),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.live_battle", description=__doc__.splitlines()[0])
    parser.add_argument("--starter", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--quick", action="store_true", help="tiny starter, 2 rounds of 16 tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=Settings.__dataclass_fields__["max_new_tokens"].default)
    args = parser.parse_args()
    if args.quick:
        args.starter, args.rounds, args.max_new_tokens = "tiny", 2, 16
    data_dir = Path(tempfile.mkdtemp(prefix="story-arena-live-battle-"))
    try:
        report = run(data_dir, args.starter, args.rounds, args.max_new_tokens)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
