"""Weak supervision (Hauer et al. 2024): labeling functions and a Snorkel label model turn
the pool's unlabelled pairs into probabilistic preferences that extend scarce human votes.

Each labeling function (LF) looks at a prompt and two stories and votes A, B or abstains;
every rule abstains below an explicit threshold (the constants below), so it speaks only
where its signal is clear. Features are computed once per story: textstat's Flesch
reading ease (textstat uses the packaged CMU dictionary, so it works offline), VADER's
lexicon sentiment, the arena's own prompt checks (rlhf.prompts) and story features
(rlhf.story_features).

Snorkel's LabelModel learns how far to trust each LF from their agreements and conflicts
alone, without human labels. The LFs are antisymmetric (swapping A and B swaps the vote)
and the side a story is on carries no meaning, so the label model is fitted on every pair
in both orders: it cannot learn a side preference, and P(A better) of a pair whose LFs
all abstain is exactly 0.5. Human votes are used only to measure it: each LF's empirical
accuracy and the label model's accuracy on decided human pairs.

The `weak` job labels every pool pair people have not voted on (any two policies' stories
for the same prompt) and stores those whose confidence max(P(A), P(B)) reaches
`threshold` as votes with source 'weak' (replacing the previous weak labels). It
registers no model; its report (coverage, accuracies) becomes the job's metrics.

params (all optional): preset ("quick" | "full": label-model epochs), max_steps (label
model epochs, overrides the preset), threshold (confidence a weak vote needs, in
[0.5, 1]), seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rlhf.params import JobParams, check_field, param
from rlhf.runner import JobContext, JobResult, Kind
from rlhf.story_metrics import (
    LOOP_MIN_REPEATS,
    READABILITY_MIN_WORDS,
    StoryFeatures,
    story_features,
)
from storage import votes, weak
from storage.db import Store

PREFER_A, PREFER_B, ABSTAIN = 0, 1, -1
PRESETS = {"quick": 500, "full": 2000}

# Abstain thresholds: an LF votes only when the two stories differ at least this much.
LENGTH_MIN_WORDS = 15        # the longer story has at least 15 more words...
LENGTH_MIN_RATIO = 1.3       # ...and at least 1.3 times as many
READABILITY_MIN_DIFF = 15.0  # Flesch points (one school grade is about 10)
TTR_WINDOW = 40              # type-token ratio over the first 40 words of each (length-fair)
TTR_MIN_DIFF = 0.1
REPETITION_MIN_DIFF = 0.15   # share of repeated word 4-grams
KEYWORDS_MIN_DIFF = 0.25     # share of the prompt's content words the story uses
SENTIMENT_MIN_DIFF = 0.5     # compound scores run from -1 to 1
REAL_WORDS_MIN_DIFF = 0.15   # share of words found in the CMU pronouncing dictionary

def _higher(a: float | None, b: float | None, min_diff: float) -> int:
    """The side with the higher value when they differ by at least min_diff, else abstain."""
    if a is None or b is None or abs(a - b) < min_diff:
        return ABSTAIN
    return PREFER_A if a > b else PREFER_B


def _only(a: bool, b: bool) -> int:
    """The side where a good property holds when it holds on one side only."""
    if a == b:
        return ABSTAIN
    return PREFER_A if a else PREFER_B


def lf_length(a: StoryFeatures, b: StoryFeatures) -> int:
    na, nb = len(a.words), len(b.words)
    if abs(na - nb) < LENGTH_MIN_WORDS or max(na, nb) < LENGTH_MIN_RATIO * max(1, min(na, nb)):
        return ABSTAIN
    return PREFER_A if na > nb else PREFER_B


def lf_readability(a: StoryFeatures, b: StoryFeatures) -> int:
    return _higher(a.flesch, b.flesch, READABILITY_MIN_DIFF)


def _ttr(f: StoryFeatures) -> float | None:
    window = f.words[:TTR_WINDOW]
    return len(set(window)) / TTR_WINDOW if len(window) == TTR_WINDOW else None


def lf_type_token_ratio(a: StoryFeatures, b: StoryFeatures) -> int:
    return _higher(_ttr(a), _ttr(b), TTR_MIN_DIFF)


def lf_repetition(a: StoryFeatures, b: StoryFeatures) -> int:
    return _higher(-a.repeated, -b.repeated, REPETITION_MIN_DIFF)


def lf_loops(a: StoryFeatures, b: StoryFeatures) -> int:
    return _only(a.max_sentence_repeats < LOOP_MIN_REPEATS, b.max_sentence_repeats < LOOP_MIN_REPEATS)


def lf_required_words(a: StoryFeatures, b: StoryFeatures) -> int:
    return _higher(a.required_used, b.required_used, 1e-9)


def lf_prompt_keywords(a: StoryFeatures, b: StoryFeatures) -> int:
    return _higher(a.keywords_used, b.keywords_used, KEYWORDS_MIN_DIFF)


def lf_ending(a: StoryFeatures, b: StoryFeatures) -> int:
    return _only(a.ends, b.ends)


def lf_sentiment(a: StoryFeatures, b: StoryFeatures) -> int:
    return _higher(a.end_sentiment, b.end_sentiment, SENTIMENT_MIN_DIFF)


def lf_meta_talk(a: StoryFeatures, b: StoryFeatures) -> int:
    return _only(not a.meta_talk, not b.meta_talk)


def lf_real_words(a: StoryFeatures, b: StoryFeatures) -> int:
    return _higher(a.real_words, b.real_words, REAL_WORDS_MIN_DIFF)


@dataclass(frozen=True)
class LabelingFunction:
    name: str
    description: str
    vote: Callable[[StoryFeatures, StoryFeatures], int]


LABELING_FUNCTIONS: tuple[LabelingFunction, ...] = (
    LabelingFunction("length", f"longer story (+{LENGTH_MIN_WORDS} words and x{LENGTH_MIN_RATIO})", lf_length),
    LabelingFunction("readability", f"higher Flesch reading ease (+{READABILITY_MIN_DIFF:g}; "
                     f"both {READABILITY_MIN_WORDS}+ words)", lf_readability),
    LabelingFunction("type_token_ratio", f"more distinct words in the first {TTR_WINDOW} (+{TTR_MIN_DIFF:g})",
                     lf_type_token_ratio),
    LabelingFunction("repetition", f"fewer repeated 4-grams (-{REPETITION_MIN_DIFF:g} share)", lf_repetition),
    LabelingFunction("loops", f"no sentence said {LOOP_MIN_REPEATS}+ times, when the other loops", lf_loops),
    LabelingFunction("required_words", "uses more of the prompt's required words", lf_required_words),
    LabelingFunction("prompt_keywords", f"uses more of the prompt's content words (+{KEYWORDS_MIN_DIFF:g} share)",
                     lf_prompt_keywords),
    LabelingFunction("ending", "ends on a finished sentence, when the other is cut off", lf_ending),
    LabelingFunction("sentiment", f"happier ending (VADER, +{SENTIMENT_MIN_DIFF:g} compound)", lf_sentiment),
    LabelingFunction("meta_talk", "no assistant talk or echoed instruction, when the other has some",
                     lf_meta_talk),
    LabelingFunction("real_words", f"more dictionary words (+{REAL_WORDS_MIN_DIFF:g} share)", lf_real_words),
)
LF_NAMES = tuple(lf.name for lf in LABELING_FUNCTIONS)


def votes_for_pair(prompt: str, text_a: str, text_b: str) -> dict[str, int]:
    """Each LF's vote on one pair: PREFER_A, PREFER_B or ABSTAIN."""
    a, b = story_features(prompt, text_a), story_features(prompt, text_b)
    return {lf.name: lf.vote(a, b) for lf in LABELING_FUNCTIONS}


def label_matrix(pairs: Sequence[tuple[str, str, str]]) -> np.ndarray:
    """The LF votes (pairs x LFs) on (prompt, story A, story B) triples."""
    matrix = np.full((len(pairs), len(LABELING_FUNCTIONS)), ABSTAIN, dtype=int)
    for i, (prompt, text_a, text_b) in enumerate(pairs):
        matrix[i] = list(votes_for_pair(prompt, text_a, text_b).values())
    return matrix


def swapped(matrix: np.ndarray) -> np.ndarray:
    """The same votes with A and B exchanged."""
    return np.where(matrix == ABSTAIN, ABSTAIN, 1 - matrix)


def fit_label_model(matrix: np.ndarray, epochs: int = PRESETS["quick"], seed: int = 0):
    """A Snorkel LabelModel fitted on the votes in both orders (see the module docstring).

    Fitted on one torch thread: its matrices are tiny (LFs x LFs), so thread hand-offs cost
    more than the math.
    """
    import torch
    from snorkel.labeling.model import LabelModel

    if len(matrix) == 0:
        raise ValueError("No pairs to fit the label model on: the pool needs stories from two policies.")
    model = LabelModel(cardinality=2, verbose=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.fit(np.vstack([matrix, swapped(matrix)]), n_epochs=epochs, seed=seed, log_freq=epochs,
                  class_balance=[0.5, 0.5], progress_bar=False)
    finally:
        torch.set_num_threads(threads)
    return model


def prob_a(model, matrix: np.ndarray) -> np.ndarray:
    """P(story A is better) per row; 0.5 where every LF abstained."""
    if len(matrix) == 0:
        return np.zeros(0)
    p = model.predict_proba(matrix)[:, PREFER_A]
    return np.where((matrix == ABSTAIN).all(axis=1), 0.5, p)


def confident(p_a: np.ndarray, threshold: float) -> np.ndarray:
    """Pairs whose label the model is at least `threshold` sure of (never a 0.5 pair)."""
    return (np.maximum(p_a, 1 - p_a) >= threshold) & (p_a != 0.5)


# --- the job ---------------------------------------------------------------------------

@dataclass(frozen=True)
class WeakParams(JobParams):
    """Validated parameters of a weak-labelling job (see the module docstring)."""

    preset: str = param("quick", "label-model budget: quick or full", choices=PRESETS)
    max_steps: int = param(PRESETS["quick"], "label-model epochs", low=1, high=100_000)
    threshold: float = param(0.7, "weak labels kept at this confidence or more", low=0.5, high=1.0)
    seed: int = param(0, "random seed", low=0, high=2**31 - 1)

    LABEL: ClassVar[str] = "weak"

    @classmethod
    def preset_values(cls, given: dict) -> dict:
        return {"max_steps": PRESETS[check_field(cls, "preset", given.get("preset", "quick"))]}


@dataclass
class Labelling:
    """The label model's view of the pool, and how it compares with people."""

    pool: list[dict]
    p_a: np.ndarray
    report: dict


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _lf_stats(pool_matrix: np.ndarray, human_matrix: np.ndarray, human_y: np.ndarray) -> list[dict]:
    """Snorkel's LFAnalysis on the pool (coverage, overlap, conflict), plus each LF's
    empirical accuracy on the human-voted pairs it did not abstain on."""
    from snorkel.labeling import LFAnalysis

    nothing = [None] * len(LF_NAMES)
    if len(pool_matrix):
        analysis = LFAnalysis(pool_matrix)
        coverage, overlap, conflict = analysis.lf_coverages(), analysis.lf_overlaps(), analysis.lf_conflicts()
    else:
        coverage = overlap = conflict = nothing
    voted = (human_matrix != ABSTAIN).sum(axis=0) if len(human_matrix) else np.zeros(len(LF_NAMES), int)
    correct = (human_matrix == human_y[:, None]).sum(axis=0) if len(human_matrix) else np.zeros(len(LF_NAMES), int)
    stats = []
    for j, lf in enumerate(LABELING_FUNCTIONS):
        stats.append({
            "lf": lf.name, "rule": lf.description,
            "coverage": _finite(coverage[j]), "overlap": _finite(overlap[j]), "conflict": _finite(conflict[j]),
            "human_pairs": int(voted[j]), "accuracy": _share(int(correct[j]), int(voted[j])),
        })
    return stats


def human_pairs(store: Store) -> tuple[list[tuple[str, str, str]], np.ndarray]:
    """Decided human votes as (prompt, story A, story B) and the side people chose."""
    rows = [r for r in votes.preference_rows(store.db, ("human",)) if r["choice"] in ("a", "b")]
    triples = [(r["prompt"], r["text_a"], r["text_b"]) for r in rows]
    return triples, np.array([PREFER_A if r["choice"] == "a" else PREFER_B for r in rows], dtype=int)


def label_pool(store: Store, params: WeakParams, progress: Callable[[float, str], None] | None = None) -> Labelling:
    """Apply the LFs to every pool pair, fit the label model, and measure LFs and label
    model on decided human votes. Stores nothing."""
    report = progress or (lambda fraction, message: None)
    pool = weak.pool_pairs(store.db)
    report(0.05, f"labeling functions on {len(pool)} pool pairs")
    pool_matrix = label_matrix([(r["prompt"], r["text_a"], r["text_b"]) for r in pool])
    human_triples, human_y = human_pairs(store)
    human_matrix = label_matrix(human_triples)
    report(0.5, f"fitting the label model ({params.max_steps} epochs)")
    model = fit_label_model(pool_matrix, params.max_steps, params.seed)
    p_a = prob_a(model, pool_matrix)
    human_p = prob_a(model, human_matrix)
    human_covered = human_p != 0.5
    human_right = (human_p > 0.5) == (human_y == PREFER_A)
    human_sure = confident(human_p, params.threshold)
    unvoted = np.array([not r["human_voted"] for r in pool], dtype=bool)
    stored = confident(p_a, params.threshold) & unvoted
    return Labelling(pool=pool, p_a=p_a, report={
        "pool_pairs": len(pool),
        "unvoted_pairs": int(unvoted.sum()),
        "coverage": _share(int((pool_matrix != ABSTAIN).any(axis=1).sum()), len(pool)),
        "threshold": params.threshold,
        "weak_labels": int(stored.sum()),
        "human_pairs": len(human_triples),
        "label_model_coverage": _share(int(human_covered.sum()), len(human_triples)),
        "label_model_accuracy": _share(int((human_right & human_covered).sum()), int(human_covered.sum())),
        "label_model_accuracy_above_threshold": _share(int((human_right & human_sure).sum()), int(human_sure.sum())),
        "human_pairs_above_threshold": int(human_sure.sum()),
        "lfs": _lf_stats(pool_matrix, human_matrix, human_y),
    })


def store_weak_labels(store: Store, labelling: Labelling, threshold: float) -> int:
    """Replace the stored weak votes with the confident labels of pairs people have not voted on."""
    keep = confident(labelling.p_a, threshold)
    labels = [
        {**pair, "choice": "a" if p > 0.5 else "b", "confidence": max(p, 1 - p)}
        for pair, p, sure in zip(labelling.pool, labelling.p_a.tolist(), keep)
        if sure and not pair["human_voted"]
    ]
    return weak.replace_weak_votes(store.db, labels)


def run(ctx: JobContext) -> JobResult:
    """The `weak` job: label the pool, store the weak votes, report; registers no model.
    Storing replaces every weak vote, so a re-run of the job leaves the same state."""
    p, store, progress = ctx.params, ctx.store, ctx.progress
    labelling = label_pool(store, p, progress)
    progress(0.9, f"storing {labelling.report['weak_labels']} weak labels")
    stored = store_weak_labels(store, labelling, p.threshold)
    metrics = {**labelling.report, "weak_labels": stored, "params": p.to_dict()}
    accuracy = metrics["label_model_accuracy"]
    accuracy_text = (f"{accuracy:.0%} on {metrics['human_pairs']} human pairs" if accuracy is not None
                     else "no human pairs yet")
    return JobResult(metrics=metrics, message=f"{stored} weak labels from {metrics['pool_pairs']} pool pairs; "
                                              f"label model {accuracy_text}")


KIND = Kind(
    name="weak", params=WeakParams, run=run, produces=None,
    help="Weak labels: labeling functions and a Snorkel label model label the pool's unvoted pairs (source weak, "
         "never on the leaderboard). Then train a reward model with weak_labels on.",
)
