"""How well the automatic story metrics (and a reward model) agree with human judgements.

1. HANNA (Chhun et al. 2022, ../shared/data): 96 human-written WritingPrompts stories, each
   with mean human ratings (1-5) on relevance, coherence, empathy, surprise, engagement and
   complexity. For every metric of rlhf.story_metrics.STORY_METRICS and every criterion: Spearman's
   rho with a bootstrap 95% interval (stories resampled) and Kendall's tau. A metric that is
   constant on HANNA (no prompt there asks for words) has no correlation (null).
   With `--reward-model PATH` that reward model's scores are one more metric.
2. With `--data-dir DIR`, the arena's own human votes: for each decided (A or B) vote, does
   the metric pick the story people picked? Each metric is read in its good direction
   (longer for length); a pair where it ties abstains. `accuracy` counts the votes it
   decided, `accuracy_ties_half` all of them. Every reward model that scored the pool
   counts too (its stored scores), and where annotators gave rubric ratings, each
   metric's Spearman rho with the mean rating of a story.

Metrics are computed from the texts in memory: the bench writes nothing.

    python -m bench.metric_agreement [--quick] [--data-dir DIR] [--reward-model PATH]

`--quick` (under a minute on 2 cores) uses 200 bootstrap rounds instead of 2,000; the point
estimates are the same. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

from rlhf.story_metrics import STORY_METRICS, story_metric_values

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
HANNA = DATA / "hanna_human_stories_with_ratings.jsonl"
HANNA_CRITERIA = ("relevance", "coherence", "empathy", "surprise", "engagement", "complexity")
REWARD = "reward_model"
QUICK_ROUNDS, FULL_ROUNDS = 200, 2000
SEED = 0


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


def correlation(x: np.ndarray, y: np.ndarray, rounds: int, rng: np.random.Generator) -> dict:
    """Spearman's rho (bootstrap 95% interval, p-value) and Kendall's tau of paired values."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": len(x), "spearman": None, "spearman_ci": None, "spearman_p": None, "kendall": None}
    rho, p = stats.spearmanr(x, y)
    tau = stats.kendalltau(x, y).statistic
    draws = []
    for _ in range(rounds):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            draws.append(stats.spearmanr(x[i], y[i]).statistic)
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)
    return {"n": len(x), "spearman": _round(rho), "spearman_ci": [_round(low), _round(high)],
            "spearman_p": _round(p, 6), "kendall": _round(tau)}


def metric_table(values: list[dict[str, float]], targets: dict[str, np.ndarray], rounds: int) -> list[dict]:
    """Per metric: its correlation with each target, on the items where the metric applies."""
    rng = np.random.default_rng(SEED)
    names = [m for m in [*STORY_METRICS, REWARD] if any(m in v for v in values)]
    table = []
    for name in names:
        have = np.array([name in v for v in values])
        x = np.array([v[name] for v in values if name in v], dtype=float)
        table.append({"metric": name, "n": int(have.sum()),
                      "criteria": {c: correlation(x, y[have], rounds, rng) for c, y in targets.items()}})
    return table


def strongest(table: list[dict], criteria) -> dict:
    """The metric with the largest |rho| for each criterion."""
    best = {}
    for criterion in criteria:
        scored = [(abs(r["criteria"][criterion]["spearman"]), r["metric"], r["criteria"][criterion]["spearman"])
                  for r in table if r["criteria"][criterion]["spearman"] is not None]
        if scored:
            _, metric, rho = max(scored)
            best[criterion] = {"metric": metric, "spearman": rho}
    return best


def reward_scorer(path: Path):
    """The reward job's scorer for a reward-model folder (rlhf.reward.load_reward_scorer)."""
    from rlhf.scoring import load_reward_scorer
    from storage.models import ModelRecord

    record = ModelRecord(id=0, name=path.name, kind="reward", parent_id=None, path=str(path), hub_id=None,
                         job_id=None, created_at=0.0, active=True)
    return load_reward_scorer(record, "cpu")


def hanna_agreement(path: Path, rounds: int, reward_model: Path | None) -> dict:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    values = [story_metric_values(r["prompt"], r["story"]) for r in rows]
    if reward_model is not None:
        for v, score in zip(values,
                            reward_scorer(reward_model)([r["prompt"] for r in rows], [r["story"] for r in rows])):
            v[REWARD] = float(score)
    targets = {c: np.array([r[c] for r in rows], dtype=float) for c in HANNA_CRITERIA}
    table = metric_table(values, targets, rounds)
    return {"file": path.name, "stories": len(rows), "criteria": list(HANNA_CRITERIA),
            "reward_model": str(reward_model) if reward_model else None,
            "table": table, "strongest": strongest(table, HANNA_CRITERIA)}


def pairwise(picks: list[tuple[float, float, str]], higher_is_better: bool) -> dict:
    """How often comparing the metric on the two stories names the side people chose."""
    right = wrong = 0
    for a, b, choice in picks:
        if a == b:
            continue
        metric_says_a = (a > b) == higher_is_better
        right += metric_says_a == (choice == "a")
        wrong += metric_says_a != (choice == "a")
    decided = right + wrong
    return {"votes": len(picks), "decided": decided, "accuracy": _round(right / decided) if decided else None,
            "accuracy_ties_half": _round((right + (len(picks) - decided) / 2) / len(picks)) if picks else None}


def app_agreement(data_dir: Path, rounds: int) -> dict:
    """Agreement with the arena's human votes and rubric ratings (see the module docstring)."""
    from storage import ratings, scores, votes
    from storage.db import Store

    db = Store(Path(data_dir) / "arena.db").db
    decided = [r for r in votes.preference_rows(db, ("human",)) if r["choice"] in ("a", "b")]
    story_values: dict[int, dict[str, float]] = {}
    for r in decided:
        story_values.setdefault(r["completion_a"], story_metric_values(r["prompt"], r["text_a"]))
        story_values.setdefault(r["completion_b"], story_metric_values(r["prompt"], r["text_b"]))
    result = {"decided_human_votes": len(decided), "metrics": {}, "reward_models": {}}
    for name, info in STORY_METRICS.items():
        picks = [(story_values[r["completion_a"]][name], story_values[r["completion_b"]][name], r["choice"])
                 for r in decided
                 if name in story_values[r["completion_a"]] and name in story_values[r["completion_b"]]]
        result["metrics"][name] = pairwise(picks, info.higher_is_better is not False)
    reward_ids = [row[0] for row in db.execute("SELECT DISTINCT reward_model_id FROM reward_scores ORDER BY 1")]
    for reward_id in reward_ids:
        stored = scores.scores_for(db, reward_id, [c for r in decided for c in (r["completion_a"], r["completion_b"])])
        picks = [(stored[r["completion_a"]], stored[r["completion_b"]], r["choice"])
                 for r in decided if r["completion_a"] in stored and r["completion_b"] in stored]
        result["reward_models"][str(reward_id)] = pairwise(picks, True)
    rated = ratings.story_ratings(db)
    if rated:
        texts = {r["id"]: (r["prompt"], r["text"]) for r in db.query(
            "SELECT c.id, p.text AS prompt, c.text FROM completions c JOIN prompts p ON p.id = c.prompt_id"
            f" WHERE c.id IN ({', '.join(str(int(r['completion_id'])) for r in rated)})")}
        for cid in texts:
            story_values.setdefault(cid, story_metric_values(*texts[cid]))
        by_criterion = {c: {r["completion_id"]: r["mean"] for r in rated if r["criterion"] == c}
                        for c in ratings.CRITERIA}
        stories = sorted({r["completion_id"] for r in rated
                          if all(r["completion_id"] in v for v in by_criterion.values())})
        if stories:
            targets = {c: np.array([by_criterion[c][s] for s in stories], dtype=float) for c in ratings.CRITERIA}
            result["ratings"] = {"stories": len(stories),
                                 "table": metric_table([story_values[s] for s in stories], targets, rounds)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hanna", type=Path, default=HANNA, help="HANNA ratings (.jsonl)")
    parser.add_argument("--data-dir", type=Path, help="an arena data dir: agreement with its human votes too")
    parser.add_argument("--reward-model", type=Path, help="a reward-model folder to score the HANNA stories with")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_ROUNDS} bootstrap rounds instead of {FULL_ROUNDS}")
    args = parser.parse_args(argv)
    if args.data_dir is not None and not (args.data_dir / "arena.db").is_file():
        parser.error(f"--data-dir {args.data_dir} has no arena.db")
    if args.reward_model is not None and not args.reward_model.is_dir():
        parser.error(f"--reward-model {args.reward_model} is not a folder")
    started = time.perf_counter()
    rounds = QUICK_ROUNDS if args.quick else FULL_ROUNDS
    report = {
        "quick": args.quick, "bootstrap_rounds": rounds,
        "hanna": hanna_agreement(args.hanna, rounds, args.reward_model),
        "app": app_agreement(args.data_dir, rounds) if args.data_dir else None,
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
