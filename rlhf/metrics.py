"""Every policy seen through the BabyStories criteria, beside the vote-based leaderboard.

Three kinds of evidence per policy, each a mean with a 95% t interval over its stories:
- automatic metrics of each story (STORY_METRICS), computed once per story when the pool
  job stores it, from the features the weak-supervision labeling functions read
  (rlhf.story_metrics: required words, repetition, loops, ending, Flesch);
- reward-model and DPH-head scores, already stored per story (storage.scores);
- rubric ratings (1-5 on coherence, prompt adherence and engagement) that annotators may
  give the two stories of a pair right after voting on it.
Held-out perplexity on a configured story corpus (Settings.metrics_corpus) is a metric of
the whole policy, measured once per policy and corpus after its pool is written.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

from rlhf.settings import Settings
from rlhf.story_metrics import STORY_METRICS, Metric, story_metric_values
from storage import completions, models, prompts, ratings
from storage import metrics as metric_rows
from storage.db import Store

CONFIDENCE = 0.95
PERPLEXITY = "perplexity"
PERPLEXITY_MAX_TOKENS = 20_000  # enough for a stable figure; a 135M model reads it in seconds on a GPU
PERPLEXITY_BLOCK = 256
RATING_PREFIX = "rating:"
REWARD_PREFIX = "reward:"


POLICY_METRICS: dict[str, Metric] = {
    PERPLEXITY: Metric("perplexity", "held-out perplexity on the configured story corpus", False, 1),
}
RATING_METRIC = {c: Metric(f"rated {c.replace('_', ' ')}", "annotators' 1-5 rating", True) for c in ratings.CRITERIA}


def metric_info(key: str) -> Metric:
    """What a metric key of policy_table means (story, policy, rating or reward metric)."""
    if key.startswith(RATING_PREFIX):
        return RATING_METRIC[key.removeprefix(RATING_PREFIX)]
    if key.startswith(REWARD_PREFIX):
        return Metric(f"score by {key.removeprefix(REWARD_PREFIX)}", "reward-model score", True)
    return STORY_METRICS.get(key) or POLICY_METRICS[key]


def measure_new_stories(store: Store, model_id: int | None = None) -> int:
    """Compute the metrics of the stories (of one policy, or all) that have none yet.

    Cheap (text features, about a millisecond a story), so the pool job runs it after every
    batch and the Metrics tab before every refresh.
    """
    todo = metric_rows.stories_without_metrics(store.db, model_id)
    metric_rows.save_story_metrics(store.db,
                                   {r["id"]: story_metric_values(r["prompt"], r["text"], r["truncated"]) for r in todo})
    return len(todo)


# --- held-out perplexity -------------------------------------------------------------------

def corpus_perplexity(model, tokenizer, texts: Iterable[str],
                      max_tokens: int = PERPLEXITY_MAX_TOKENS) -> tuple[float, int]:
    """(perplexity, tokens scored) of a causal LM on stories joined by <|endoftext|>."""
    from rlhf.models import context_length
    from rlhf.pretrain import eval_loss, pack

    context = context_length(model)
    blocks = pack(tokenizer, texts, min(PERPLEXITY_BLOCK, context or PERPLEXITY_BLOCK), max_tokens, keep_partial=True)
    if not blocks:
        raise ValueError("The metrics corpus is too short to measure perplexity.")
    loss = eval_loss(model, blocks, batch_size=8, pad_id=tokenizer.pad_token_id)
    return math.exp(min(loss, 700.0)), sum(len(b) for b in blocks)


def _corpus_key(path: Path) -> dict:
    """What identifies the corpus a perplexity was measured on: a changed file is measured again."""
    stat = path.stat()
    return {"corpus": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def measure_policies(store: Store, settings: Settings, model_ids: Iterable[int]) -> dict[int, float]:
    """Held-out perplexity of each policy on Settings.metrics_corpus, unless already measured
    on that corpus; returns the new values. Nothing to do when no corpus is configured.

    Policies that share weights (the same model with other decoding settings) share the figure.
    The pool job calls this after writing stories: a corpus or model that fails is reported on
    stderr and skipped, since the stories matter more than the figure.
    """
    if settings.metrics_corpus is None:
        return {}
    from rlhf.models import ModelLoadError, load_causal_lm, resolve_device
    from rlhf.pretrain import load_corpus

    db = store.db
    key = _corpus_key(settings.metrics_corpus)
    done = {r["model_id"]: r for r in metric_rows.policy_metrics(db, PERPLEXITY)
            if {k: r["detail"].get(k) for k in key} == key}
    by_source = {models.get_model(db, mid).source: r for mid, r in done.items()}
    texts = None
    measured = {}
    for model_id in model_ids:
        if model_id in done:
            continue
        policy = models.get_model(db, model_id)
        if policy.source in by_source:
            value, detail = by_source[policy.source]["value"], by_source[policy.source]["detail"]
        else:
            try:
                texts = texts or load_corpus(settings, store, {"file": str(settings.metrics_corpus)}).texts
                model, tokenizer = load_causal_lm(policy.source, resolve_device(settings.device), settings.hub_token)
                value, tokens = corpus_perplexity(model, tokenizer, texts)
            except (ModelLoadError, ValueError) as exc:
                print(f"no perplexity for {policy.name}: {exc}", file=sys.stderr, flush=True)
                continue
            detail = {**key, "tokens": tokens}
        metric_rows.save_policy_metric(db, model_id, PERPLEXITY, value, detail)
        by_source[policy.source] = {"value": value, "detail": detail}
        measured[model_id] = value
    return measured


# --- per-policy summaries ----------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """A mean with its 95% t interval (None where one value gives no interval)."""

    mean: float
    low: float | None
    high: float | None
    n: int


def t_interval(n: int, mean: float, mean_square: float, confidence: float = CONFIDENCE) -> Summary:
    """Student-t interval of a mean from the aggregates SQL keeps (count, mean, mean square)."""
    if n < 2:
        return Summary(mean, None, None, n)
    variance = max(0.0, mean_square - mean * mean) * n / (n - 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * math.sqrt(variance / n)
    return Summary(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class PolicyMetrics:
    model_id: int
    name: str
    kind: str
    parent_id: int | None
    parent: str
    stories: int
    metrics: dict[str, Summary]


def policy_table(store: Store) -> list[PolicyMetrics]:
    """One row per policy with stories: every metric it has, keyed as in metric_info."""
    db = store.db
    values: dict[int, dict[str, Summary]] = {}
    for r in metric_rows.policy_story_metric_stats(db):
        values.setdefault(r["model_id"], {})[r["metric"]] = t_interval(r["n"], r["mean"], r["mean_square"])
    for r in ratings.policy_rating_stats(db):
        values.setdefault(r["model_id"], {})[RATING_PREFIX + r["metric"]] = t_interval(r["n"], r["mean"],
                                                                                       r["mean_square"])
    for r in metric_rows.policy_reward_stats(db):
        values.setdefault(r["model_id"], {})[REWARD_PREFIX + r["reward_model"]] = t_interval(
            r["n"], r["mean"], r["mean_square"])
    for r in metric_rows.policy_metrics(db):
        values.setdefault(r["model_id"], {})[r["metric"]] = Summary(r["value"], None, None, 1)
    sizes = completions.pool_sizes(db)
    records = {m.id: m for m in models.list_models(db)}
    return [
        PolicyMetrics(m.id, m.name, m.kind, m.parent_id, records[m.parent_id].name if m.parent_id in records else "",
                      sizes.get(m.id, 0), values.get(m.id, {}))
        for m in records.values() if sizes.get(m.id) and m.kind != "reward"
    ]


def metric_keys(rows: Iterable[PolicyMetrics]) -> list[str]:
    """The metric keys present in any row, in a stable reading order."""
    present = {k for row in rows for k in row.metrics}
    fixed = [*STORY_METRICS, *POLICY_METRICS, *(RATING_PREFIX + c for c in ratings.CRITERIA)]
    return [k for k in fixed if k in present] + sorted(k for k in present if k.startswith(REWARD_PREFIX))


def parent_comparison(rows: Iterable[PolicyMetrics], model_id: int) -> list[dict]:
    """The metrics a policy and its parent both have, side by side: did training move them?"""
    by_id = {r.model_id: r for r in rows}
    policy = by_id.get(model_id)
    parent = by_id.get(policy.parent_id) if policy else None
    if parent is None:
        return []
    return [
        {"metric": key, "label": metric_info(key).label, "role": role, "policy": row.name,
         "mean": row.metrics[key].mean, "low": row.metrics[key].low, "high": row.metrics[key].high}
        for key in metric_keys([policy, parent]) if key in policy.metrics and key in parent.metrics
        for role, row in (("parent", parent), ("policy", policy))
    ]


# --- rubric ratings ------------------------------------------------------------------------

@dataclass(frozen=True)
class RubricPair:
    """The two stories of a vote, for rating them right after it (policies revealed)."""

    vote_id: int
    prompt: str
    story_a: str
    story_b: str
    name_a: str
    name_b: str


def rubric_pair(store: Store, annotator_id: int, vote_id: int) -> RubricPair | None:
    """The stories of this annotator's own vote, or None (not theirs, or undone)."""
    db = store.db
    vote = ratings.own_vote(db, vote_id, annotator_id)
    if vote is None:
        return None
    story_a, story_b = (completions.get_completion(db, vote[k]) for k in ("completion_a", "completion_b"))
    return RubricPair(
        vote_id, prompts.get_prompt(db, story_a["prompt_id"])["text"], story_a["text"], story_b["text"],
        models.get_model(db, vote["model_a"]).name, models.get_model(db, vote["model_b"]).name,
    )


def rate_vote(store: Store, annotator_id: int, vote_id: int, by_side: Mapping[str, Mapping[str, int]]) -> int:
    """Store the rubric ratings {"a"|"b": {criterion: 1-5}} of a pair the annotator voted on.

    Refused unless the vote is the annotator's own and still stands; criteria
    left out are simply not rated. Returns how many ratings were stored.
    """
    vote = ratings.own_vote(store.db, vote_id, annotator_id)
    if vote is None:
        raise ValueError("You can rate only the stories of a pair you voted on (that vote may have been undone).")
    unknown = sorted(set(by_side) - {"a", "b"})
    if unknown:
        raise ValueError(f"Unknown side(s) {', '.join(unknown)}; expected a or b.")
    chosen = {vote[f"completion_{side}"]: dict(scores) for side, scores in by_side.items() if scores}
    if not chosen:
        raise ValueError("Pick at least one rating, or skip the rubric.")
    return ratings.save_ratings(store.db, annotator_id, vote_id, chosen)
