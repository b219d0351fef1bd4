"""A reward model on the automatic story metrics: a Bradley-Terry fit of linear weights.

Why it exists: a transformer reward model needs far more votes than a small arena has before
it ranks one policy's own samples, which is what best-of-k and RAFT ask of it. On 384
simulated votes (README, closed loop) the MiniLM reward model beat "longer story wins" on
held-out pairs, yet its best-of-4 pick among the starter's own stories scored below the
mean of the four. A linear model on the story metrics (rlhf.story_metrics: required words,
prompt keywords, repetition, loops, distinct-n, length, ending, readability) fits in a
second from a few hundred votes, and its weights can be read on the model card.

score(prompt, story) = w . z, where z is the story's metrics standardised with the
training stories' mean and spread (a metric that does not apply, such as readability of a
very short story, sits at the mean). The weights maximise the Bradley-Terry likelihood
sigmoid(score(chosen) - score(rejected)): scikit-learn's L2-regularised logistic regression
without intercept on the differences z(chosen) - z(rejected), each pair in both orders.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rlhf.story_metrics import story_metric_values

FEATURES = ("prompt_adherence", "prompt_keywords", "repetition", "loop", "distinct_1", "distinct_2",
            "log_length", "ending", "readability")
WEIGHTS_FILE = "metric_weights.json"


def metric_features(prompt: str, story: str) -> list[float]:
    """The story's metrics in FEATURES order; NaN where a metric does not apply. Length
    enters as log(1 + words): one more sentence matters less in a long story."""
    values = story_metric_values(prompt, story)
    if "length" in values:
        values["log_length"] = math.log1p(values["length"])
    return [values.get(name, math.nan) for name in FEATURES]


def _standardised(raw: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.nan_to_num((raw - mean) / scale, nan=0.0)


def fit(records: Sequence[dict], regularization: float = 1.0) -> dict:
    """Weights from preference records (prompt, chosen, rejected): the model as JSON-ready data."""
    from sklearn.linear_model import LogisticRegression

    if not records:
        raise ValueError("The metrics reward model needs at least one preference pair.")
    chosen = np.array([metric_features(r["prompt"], r["chosen"]) for r in records])
    rejected = np.array([metric_features(r["prompt"], r["rejected"]) for r in records])
    known = [column[~np.isnan(column)] for column in np.vstack([chosen, rejected]).T]
    mean = np.array([values.mean() if len(values) else 0.0 for values in known])
    spread = np.array([values.std() if len(values) else 0.0 for values in known])
    scale = np.where(spread > 1e-9, spread, 1.0)
    difference = _standardised(chosen, mean, scale) - _standardised(rejected, mean, scale)
    inputs = np.vstack([difference, -difference])
    labels = np.concatenate([np.ones(len(records)), np.zeros(len(records))])
    model = LogisticRegression(fit_intercept=False, C=regularization, max_iter=1000).fit(inputs, labels)
    return {"features": list(FEATURES), "weights": model.coef_[0].tolist(), "mean": mean.tolist(),
            "scale": scale.tolist(), "regularization": regularization}


def make_metric_scorer(model: dict):
    """A function scoring (prompts, stories) with fitted weights."""
    if model["features"] != list(FEATURES):
        raise ValueError(f"The metrics reward model reads {model['features']}, this version computes {FEATURES}.")
    weights, mean, scale = (np.array(model[k]) for k in ("weights", "mean", "scale"))

    def score(prompts: Sequence[str], stories: Sequence[str]) -> list[float]:
        if not stories:
            return []
        raw = np.array([metric_features(p, s) for p, s in zip(prompts, stories, strict=True)])
        return (_standardised(raw, mean, scale) @ weights).tolist()

    return score


def save(model: dict, folder: Path) -> None:
    (Path(folder) / WEIGHTS_FILE).write_text(json.dumps(model, indent=2), encoding="utf-8")


def load(folder: Path) -> dict:
    return json.loads((Path(folder) / WEIGHTS_FILE).read_text(encoding="utf-8"))
