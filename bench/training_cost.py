"""What a training step costs, per kind: reward, DPO, DPH (head and LoRA) and RLOO.

    python -m bench.training_cost --quick                   # tiny starter, CI size
    python -m bench.training_cost --starter smollm2 --steps 6 --work-dir DIR

One arena is prepared and voted on by simulated annotators (bench.closed_loop's path),
then every kind is run as its job, one after the other, with the same batch size of
preference pairs (RLOO: prompts x generations completions). The step time is read from
the job's own per-step log (the TrainerCallback's timestamps, first step left out as
warm-up), so model loading, saving and pool scoring are not counted. Prints JSON: per
kind the median seconds per step, items per step and seconds per 1,000 items, plus each
kind's ratio to the reward model's step measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

from bench.closed_loop import cast_votes, train
from bench.workdir import work_dir
from rlhf.prepare import prepare
from rlhf.progress import read_metrics
from rlhf.settings import Settings
from rlhf.simulate import Oracle

BATCH = 4


def kinds(base: int, reward_model: int | None) -> dict[str, tuple[str, dict, int]]:
    """name -> (job kind, parameters, items per step)."""
    same = {"base": base, "batch_size": BATCH}
    table = {
        "reward": ("reward", same, BATCH),
        "dpo": ("dpo", same, BATCH),
        "dph_head": ("dph", {**same, "mode": "head"}, BATCH),
        "dph_lora": ("dph", {**same, "mode": "lora"}, BATCH),
    }
    if reward_model is not None:
        table["rloo"] = ("rloo", {"base": base, "reward_model": reward_model, "prompts_per_step": BATCH // 2,
                                  "num_generations": 2}, BATCH)
    return table


def step_seconds(settings: Settings, job_id: int) -> list[float]:
    """Seconds between consecutive logged steps of a job (the first step is warm-up)."""
    times = {}
    for row in read_metrics(settings, job_id):
        times.setdefault(row["step"], row["time"])
    ordered = [times[s] for s in sorted(times)]
    return [b - a for a, b in zip(ordered, ordered[1:])]


def run(work_dir: Path, starter: str, steps: int, prompts: int, device: str) -> dict:
    settings = Settings(data_dir=work_dir / "data", starter=starter, pool_prompts=prompts, max_new_tokens=64,
                        device=device, min_vote_seconds=0.0)  # simulated annotators need no reading time
    base = prepare(settings.store(), settings, lambda f, m: None)[0].id
    # What the votes say does not change a step's cost: an oracle that never ties or calls
    # both bad makes every vote a training pair.
    decisive = Oracle(both_bad_below=float("-inf"), tie_margin=0.0)
    votes = cast_votes(settings, annotators=4, votes=prompts, accuracy=0.9, oracle=decisive, seed=0)
    table, reward_model = {}, None
    for name in ("reward", "dpo", "dph_head", "dph_lora", "rloo"):  # rloo needs the reward model
        kind, params, items = kinds(base, reward_model)[name]
        started = time.perf_counter()
        job, _ = train(settings, kind, {**params, "max_steps": steps})
        wall = time.perf_counter() - started
        if name == "reward":
            reward_model = job["result_model_id"]
        gaps = step_seconds(settings, job["id"])
        per_step = statistics.median(gaps) if gaps else None
        table[name] = {
            "kind": kind, "steps_timed": len(gaps), "items_per_step": items,
            "seconds_per_step": round(per_step, 4) if per_step else None,
            "seconds_per_1k_items": round(1000 * per_step / items, 2) if per_step else None,
            "job_wall_seconds": round(wall, 1),
        }
        print(f"[training-cost] {name}: {table[name]}", file=sys.stderr, flush=True)
    reward_step = table["reward"]["seconds_per_step"]
    for row in table.values():
        row["step_over_reward"] = (round(row["seconds_per_step"] / reward_step, 2)
                                   if row["seconds_per_step"] and reward_step else None)
    return {"starter": starter, "device": device, "steps": steps, "batch": BATCH, "votes": votes, "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny starter, 6 steps per kind")
    parser.add_argument("--starter", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=12, help="max_steps of every job")
    parser.add_argument("--prompts", type=int, default=16, help="prompts in the vote pool")
    parser.add_argument("--work-dir", type=Path, help="where the data dir goes (default: a temporary folder, removed)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.quick:
        args.starter, args.steps = "tiny", 6
    # Trainers print logs on stdout; JSON only there.
    with work_dir(args.work_dir, "training-cost-") as folder, contextlib.redirect_stdout(sys.stderr):
        report = run(folder, args.starter, args.steps, args.prompts, args.device)
    report["command"] = " ".join(sys.argv[1:])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
