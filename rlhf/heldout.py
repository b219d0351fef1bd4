"""Measuring a preference model honestly: on pairs whose prompts it never saw, beside the
trivial rules it has to beat.

- `split_by_prompt` holds out whole prompts, so no prompt, hence no story, sits on both
  sides of the split; a vote-level split lets a model score well by remembering stories.
- `pairwise_report` gives the model's held-out pairwise accuracy with a 95% interval that
  is right at small counts (`rate_interval`), and the accuracy of the trivial baselines on
  the same pairs: "longer story wins" and each automatic story metric alone
  (rlhf.story_metrics.STORY_METRICS). Its `verdict` says whether the model beats the best one.
- `heldout_markdown` formats that report for the Jobs tab and the model card alike.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from rlhf.story_metrics import STORY_METRICS, story_metric_values

BOOTSTRAP_ROUNDS = 2000
CONFIDENCE = 0.95
# Verdicts of pairwise_report: the model's interval lies above the best baseline's
# accuracy; only its point estimate does; not even that; no held-out pairs at all.
INTERVAL_ABOVE, POINT_ABOVE, NOT_ABOVE, NO_DATA = "interval_above", "point_above", "not_above", "no_data"


def normalised_prompt(text: str) -> str:
    """The prompt as the split sees it: case and spacing do not make a new prompt."""
    return " ".join(str(text).split()).casefold()


def _prompt_position(text: str) -> float:
    """Where a prompt falls in [0, 1): a hash, so it never moves as votes arrive."""
    digest = hashlib.sha256(normalised_prompt(text).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_prompt(records: Sequence[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out) preference records, split by prompt.

    A prompt is held out when the hash of its normalised text falls below eval_fraction,
    so a prompt stays on its side as votes arrive. Few prompts: at least one prompt is
    held out and at least one is kept for training (the lowest and highest hashes, the
    ones the fraction would move first), so a job with two prompts still measures
    something. With fewer than two prompts, or eval_fraction 0, nothing is held out and
    the report says "no held-out pairs" instead of scoring the model on its own data.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    positions = {_prompt_position(r["prompt"]) for r in records}
    if len(positions) < 2 or eval_fraction == 0.0:
        return list(records), []
    ordered = sorted(positions)
    held = sum(p < eval_fraction for p in ordered)
    cut = ordered[min(max(held, 1), len(ordered) - 1) - 1]
    train = [r for r in records if _prompt_position(r["prompt"]) > cut]
    evaluation = [r for r in records if _prompt_position(r["prompt"]) <= cut]
    return train, evaluation


def rate_interval(outcomes: Sequence[float], clusters: Sequence, seed: int = 0,
                  rounds: int = BOOTSTRAP_ROUNDS, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A 95% interval for the mean of 0 / 0.5 / 1 outcomes (wins, ties, losses) of pairs
    grouped in clusters (their prompts).

    The union of two intervals: a seeded bootstrap that resamples whole clusters (pairs
    from one prompt are not independent, so resampling pairs would be too narrow), and
    Jeffreys' interval for a binomial rate over the pairs, which is right at small counts
    where the bootstrap is not (one pair, or all wins, would give it zero width). Each is
    too narrow where the other is not, so the union covers both cases.
    """
    values = np.asarray(outcomes, dtype=float)
    if values.size == 0:
        raise ValueError("An interval needs at least one outcome.")
    weights = _cluster_weights(clusters, seed, rounds)
    return _union(_bootstrap(values, weights, confidence), _jeffreys(values.sum(), values.size, confidence))


def _cluster_weights(clusters: Sequence, seed: int, rounds: int) -> np.ndarray:
    """(rounds, pairs): how often each pair is drawn when whole clusters are resampled."""
    index = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    member = np.array([index[c] for c in clusters])
    draws = np.random.default_rng(seed).multinomial(len(index), np.full(len(index), 1 / len(index)), size=rounds)
    return draws[:, member].astype(float)


def _bootstrap(values: np.ndarray, weights: np.ndarray, confidence: float) -> tuple[float, float]:
    means = weights @ values / weights.sum(axis=1)
    low, high = np.percentile(means, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high)


def _jeffreys(successes: float, n: int, confidence: float) -> tuple[float, float]:
    """Jeffreys' interval (Beta(x + 1/2, n - x + 1/2) quantiles; 0 or 1 at the extremes)."""
    tail = (1 - confidence) / 2
    low = 0.0 if successes <= 0 else float(stats.beta.ppf(tail, successes + 0.5, n - successes + 0.5))
    high = 1.0 if successes >= n else float(stats.beta.ppf(1 - tail, successes + 0.5, n - successes + 0.5))
    return low, high


def _union(*intervals: tuple[float, float]) -> tuple[float, float]:
    return min(i[0] for i in intervals), max(i[1] for i in intervals)


def _outcome(margin: float) -> float:
    """1 when the chosen story scores higher, 0 when lower, 1/2 for a tie of the scorer."""
    if math.isnan(margin):
        raise ValueError("A margin is NaN: the model's scores are not usable.")
    return 1.0 if margin > 0 else 0.0 if margin < 0 else 0.5


def baseline_rules() -> list[tuple[str, str, bool]]:
    """(name, metric, higher wins) of every trivial rule a model must beat.

    Each story metric votes in its own direction of "better". Length has none, so both
    "longer story wins" and "shorter story wins" are rules: choosing the better of the two
    on the evaluated pairs favours the baseline (by at most the noise of that choice),
    never the model, so a model that beats the best rule beats every fixed-direction rule.
    """
    rules = [("longer story wins", "length", True), ("shorter story wins", "length", False)]
    for key, metric in STORY_METRICS.items():
        if metric.higher_is_better is not None:
            rules.append((f"{metric.label} ({'higher' if metric.higher_is_better else 'lower'} wins)",
                          key, metric.higher_is_better))
    return rules


def baseline_margins(records: Sequence[dict]) -> dict[str, list[float]]:
    """Each rule's margin (chosen minus rejected, sign-flipped for lower-is-better) per pair.
    A metric that does not apply to one of the stories (e.g. required words for a prompt
    that asks for none) gives margin 0: the rule cannot tell, which scores as a tie."""
    values = [(story_metric_values(r["prompt"], r["chosen"]), story_metric_values(r["prompt"], r["rejected"]))
              for r in records]
    return {
        name: [(chosen[key] - rejected[key]) * (1 if higher else -1)
               if key in chosen and key in rejected else 0.0 for chosen, rejected in values]
        for name, key, higher in baseline_rules()
    }


def pairwise_report(records: Sequence[dict], margin: Callable[[dict], float] | Sequence[float],
                    seed: int = 0) -> dict:
    """The model's held-out pairwise accuracy beside the trivial baselines, as JSON-ready data.

    records: held-out preference records (prompt, chosen, rejected, ...); margin: the
    model's score(chosen) - score(rejected), as a function of a record or one value per
    record. Ties of the scorer count 1/2. Returns accuracy, ci95 (rate_interval over
    prompts), pairs, prompts, baselines (name -> accuracy on the same pairs),
    best_baseline {name, accuracy}, verdict (INTERVAL_ABOVE, POINT_ABOVE, NOT_ABOVE or
    NO_DATA) and summary, one sentence a researcher can read.
    """
    records = list(records)
    margins = [float(margin(r)) for r in records] if callable(margin) else [float(m) for m in margin]
    if len(margins) != len(records):
        raise ValueError(f"{len(margins)} margins for {len(records)} records.")
    clusters = [normalised_prompt(r["prompt"]) for r in records]
    report = {"pairs": len(records), "prompts": len(set(clusters))}
    if not records:
        return {**report, "accuracy": None, "ci95": None, "baselines": {}, "best_baseline": None,
                "verdict": NO_DATA, "summary": "No held-out pairs: too few prompts to hold any out, so the "
                                              "model's accuracy is unmeasured."}
    outcomes = np.array([_outcome(m) for m in margins])
    low, high = rate_interval(outcomes, clusters, seed)
    baselines = {name: round(float(np.mean([_outcome(m) for m in values])), 3)
                 for name, values in baseline_margins(records).items()}
    best = max(baselines, key=baselines.get)
    accuracy = round(float(outcomes.mean()), 3)
    report.update(accuracy=accuracy, ci95=[round(low, 3), round(high, 3)], baselines=baselines,
                  best_baseline={"name": best, "accuracy": baselines[best]})
    verdict = INTERVAL_ABOVE if low > baselines[best] else POINT_ABOVE if accuracy > baselines[best] else NOT_ABOVE
    return {**report, "verdict": verdict, "summary": _summary(report, verdict)}


def _summary(report: dict, verdict: str) -> str:
    best = report["best_baseline"]
    rule = f'the best trivial baseline, "{best["name"]}" ({best["accuracy"]:.2f})'
    measured = (f'held-out accuracy {report["accuracy"]:.2f} [{report["ci95"][0]:.2f}, {report["ci95"][1]:.2f}] '
                f'on {report["pairs"]} pairs from {report["prompts"]} unseen prompts')
    if verdict == INTERVAL_ABOVE:
        return f"The model beats {rule}: {measured}."
    if verdict == POINT_ABOVE:
        return f"The model is not clearly better than {rule}: {measured}, an interval that includes it."
    return f"The model does not beat {rule}: {measured}."


def heldout_markdown(block: dict | None) -> str:
    """A held-out report (pairwise_report's dict) as Markdown; empty when there is none."""
    if not block:
        return ""
    if block.get("accuracy") is None:
        return f"**Held-out evaluation:** {block['summary']}"
    low, high = block["ci95"]
    baselines = sorted(block["baselines"].items(), key=lambda kv: (-kv[1], kv[0]))
    lines = [
        (f"**Held-out accuracy:** {block['accuracy']:.2f} (95% interval {low:.2f} to {high:.2f}) on "
         f"{block['pairs']} pairs from {block['prompts']} held-out prompts (never trained on)."),
        "",
        "Trivial baselines on the same pairs: " + ", ".join(f"{name} {value:.2f}" for name, value in baselines) + ".",
    ]
    if block["verdict"] != INTERVAL_ABOVE:
        lines += ["", f"**Warning:** {block['summary']}"]
    return "\n".join(lines)
