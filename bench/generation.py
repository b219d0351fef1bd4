"""Story generation speed: batched (as the pool job writes) against one prompt at a time.

    python -m bench.generation --model DATA_DIR/models/smollm2-135m-instruct
    python -m bench.generation --model tiny      # the tiny random starter, built in a temporary folder

Each batch size writes stories for the same seed prompts with the same decoding; the
sizes take turns for --rounds rounds so that load on a shared machine falls on all of
them alike. Prints JSON: useful (pre-EOS) story tokens per second per batch size and
each size's speed-up over batch size 1, measured in this one run. Then, as the pool job
writes for two policies that share weights (the starter's two decodings), batches of the
pool's size for each policy in turn against one call holding both policies' rows
(rlhf.generate.generate_rows), taking turns the same way. Last, float32 against the dtype
the arena generates in (rlhf.models.generation_dtype) at the first pair's batch (2) and the
pool's, again taking turns.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlhf.generate import Decoding, generate_rows, generate_stories
from rlhf.models import build_tiny_starter, generation_dtype, load_causal_lm, resolve_device
from rlhf.prompts import SEED_PROMPTS
from rlhf.settings import Settings

TINY = "tiny"


def run(model_source: str, prompt_count: int = 16, batch_sizes: tuple[int, ...] = (1, 4, 8, 16),
        max_new_tokens: int = 128, rounds: int = 2, device_name: str = "auto") -> dict:
    """Time every batch size on the same prompts, taking turns; returns the report."""
    device = resolve_device(device_name)
    model, tokenizer = load_causal_lm(model_source, device, dtype=generation_dtype(device))
    prompts = list(SEED_PROMPTS[:prompt_count])
    decoding = Decoding(temperature=0.7, top_p=0.9, max_new_tokens=max_new_tokens)
    sizes = list(batch_sizes)
    generate_stories(model, tokenizer, prompts[:2], decoding, batch_size=2, seed=0)  # warm-up

    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for round_no in range(rounds):
        for size in sizes:
            start = time.perf_counter()
            stories = generate_stories(model, tokenizer, prompts, decoding, batch_size=size, seed=round_no)
            rates[size].append(sum(s.tokens for s in stories) / (time.perf_counter() - start))
    base = statistics.median(rates[sizes[0]])
    return {
        "model": model_source, "device": str(device), "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(), "dtype": str(model.dtype), "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "rounds": rounds,
        "tokens_per_s": {str(s): round(statistics.median(r), 1) for s, r in rates.items()},
        "speedup_vs_batch_1": {str(s): round(statistics.median(r) / base, 2) for s, r in rates.items()},
        "two_policies": two_policies(model, tokenizer, prompts, max_new_tokens, rounds),
        "dtypes": dtypes(model_source, device, prompts, decoding, rounds),
    }


def dtypes(model_source: str, device, prompts: list[str], decoding: Decoding, rounds: int) -> dict:
    """Story tokens per second in float32 and in the arena's generation dtype, per batch size."""
    kinds = {str(dtype): load_causal_lm(model_source, device, dtype=dtype)
             for dtype in (torch.float32, generation_dtype(device))}
    report = {}
    for size in sorted({min(2, len(prompts)), min(Settings.generation_batch_size, len(prompts))}):
        rates: dict[str, list[float]] = {name: [] for name in kinds}
        for round_no in range(rounds):
            for name, (model, tokenizer) in kinds.items():
                start = time.perf_counter()
                stories = generate_stories(model, tokenizer, prompts[:size], decoding, batch_size=size, seed=round_no)
                rates[name].append(sum(s.tokens for s in stories) / (time.perf_counter() - start))
        medians = {name: statistics.median(r) for name, r in rates.items()}
        report[f"batch_{size}"] = {
            "tokens_per_s": {name: round(m, 1) for name, m in medians.items()},
            "speedup_vs_float32": round(medians[str(generation_dtype(device))] / medians[str(torch.float32)], 2),
        }
    return report


def two_policies(model, tokenizer, prompts: list[str], max_new_tokens: int, rounds: int) -> dict:
    """Two decodings of one model: a pool-size batch for each in turn, against one call with both."""
    pair = (Decoding(temperature=0.7, top_p=0.9, max_new_tokens=max_new_tokens),
            Decoding(temperature=1.0, top_p=0.95, max_new_tokens=max_new_tokens))
    size = Settings.generation_batch_size
    rates: dict[str, list[float]] = {"separate": [], "one_call": []}
    for round_no in range(rounds):
        start = time.perf_counter()
        stories = [s for d in pair for s in generate_stories(model, tokenizer, prompts, d, batch_size=size,
                                                               seed=round_no)]
        rates["separate"].append(sum(s.tokens for s in stories) / (time.perf_counter() - start))
        start = time.perf_counter()
        stories = []
        for i in range(0, len(prompts), size):
            chunk = prompts[i:i + size]
            stories += generate_rows(model, tokenizer, chunk * 2, [pair[0]] * len(chunk) + [pair[1]] * len(chunk),
                                     max_new_tokens, seed=round_no)
        rates["one_call"].append(sum(s.tokens for s in stories) / (time.perf_counter() - start))
    separate, one_call = statistics.median(rates["separate"]), statistics.median(rates["one_call"])
    return {"batch_size_per_policy": size, "separate_tokens_per_s": round(separate, 1),
            "one_call_tokens_per_s": round(one_call, 1), "one_call_speedup": round(one_call / separate, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"model folder or Hub id; {TINY!r} builds the tiny starter")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    sizes = tuple(int(s) for s in args.batch_sizes.split(","))
    options = dict(prompt_count=args.prompts, batch_sizes=sizes, max_new_tokens=args.max_new_tokens,
                   rounds=args.rounds, device_name=args.device)
    if args.model == TINY:
        with tempfile.TemporaryDirectory(prefix="story-arena-bench-generation-") as models_dir:
            path = build_tiny_starter(Path(models_dir), SEED_PROMPTS)
            report = {**run(str(path), **options), "model": TINY}
    else:
        report = run(args.model, **options)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
