"""Rubric ratings: stored per story, annotator and criterion, only for a pair the annotator
voted on, and averaged per policy with intervals."""

from __future__ import annotations

import random

import pytest

from rlhf import arena, metrics
from storage import quality, ratings


def _vote(store, settings, name: str, choice: str = "a"):
    who = arena.sign_in(store, settings, name)
    view = arena.next_pair(store, who["id"], random.Random(0))
    vote_id, _ = arena.submit_vote(store, settings, who["id"], view, choice)
    return who, view, vote_id


def test_migration_creates_the_tables(store):
    assert {"ratings", "story_metrics", "policy_metrics"} <= set(store.db.table_names())
    assert set(store.db["ratings"].pks) == {"completion_id", "annotator_id", "criterion"}


def test_ratings_are_stored_per_story_and_criterion_and_rerating_replaces(arena_dir):
    settings, store = arena_dir
    who, view, vote_id = _vote(store, settings, "Rae")
    pair = metrics.rubric_pair(store, who["id"], vote_id)
    assert (pair.story_a, pair.story_b, pair.name_a, pair.name_b) == (view.story_a, view.story_b, view.name_a,
                                                                      view.name_b)

    saved = metrics.rate_vote(store, who["id"], vote_id,
                              {"a": {"coherence": 4, "engagement": 2}, "b": {"coherence": 1}})
    assert saved == 3
    stored = {(r["completion_id"], r["criterion"]): (r["rating"], r["vote_id"])
              for r in ratings.ratings_by(store.db, who["id"])}
    assert stored == {
        (view.pair.completion_a, "coherence"): (4, vote_id),
        (view.pair.completion_a, "engagement"): (2, vote_id),
        (view.pair.completion_b, "coherence"): (1, vote_id),
    }
    metrics.rate_vote(store, who["id"], vote_id, {"a": {"coherence": 5}})
    assert {r["rating"] for r in ratings.ratings_by(store.db, who["id"])
            if r["completion_id"] == view.pair.completion_a and r["criterion"] == "coherence"} == {5}
    assert len(ratings.ratings_by(store.db, who["id"])) == 3


def test_ratings_need_the_annotators_own_standing_vote(arena_dir):
    settings, store = arena_dir
    who, view, vote_id = _vote(store, settings, "Ann")
    other = arena.sign_in(store, settings, "Bob")
    with pytest.raises(ValueError, match="only the stories of a pair you voted on"):
        metrics.rate_vote(store, other["id"], vote_id, {"a": {"coherence": 3}})
    assert metrics.rubric_pair(store, other["id"], vote_id) is None
    with pytest.raises(ValueError, match="at least one rating"):
        metrics.rate_vote(store, who["id"], vote_id, {"a": {}, "b": {}})
    with pytest.raises(ValueError, match="coherence must be a whole number from 1 to 5"):
        metrics.rate_vote(store, who["id"], vote_id, {"a": {"coherence": 6}})
    with pytest.raises(ValueError, match="coherence must be a whole number"):
        metrics.rate_vote(store, who["id"], vote_id, {"a": {"coherence": True}})
    with pytest.raises(ValueError, match="Unknown criterion"):
        metrics.rate_vote(store, who["id"], vote_id, {"b": {"style": 3}})
    with pytest.raises(ValueError, match="Unknown side"):
        metrics.rate_vote(store, who["id"], vote_id, {"c": {"coherence": 3}})
    assert ratings.ratings_by(store.db, who["id"]) == []
    # An undone vote can no longer be rated.
    assert arena.undo_vote(store, settings, who["id"], vote_id) is not None
    with pytest.raises(ValueError, match="undone"):
        metrics.rate_vote(store, who["id"], vote_id, {"a": {"coherence": 3}})


def test_ratings_are_averaged_per_policy_with_intervals(arena_dir):
    settings, store = arena_dir
    given: dict[str, list[int]] = {}
    for n, name in enumerate(("Cy", "Di", "Ed")):
        who, view, vote_id = _vote(store, settings, name)
        metrics.rate_vote(store, who["id"], vote_id, {"a": {"engagement": 2 + n}, "b": {"engagement": 5}})
        given.setdefault(view.name_a, []).append(2 + n)
        given.setdefault(view.name_b, []).append(5)
    metrics.measure_new_stories(store)
    rows = {r.name: r for r in metrics.policy_table(store)}
    key = metrics.RATING_PREFIX + "engagement"
    for name, values in given.items():
        summary = rows[name].metrics[key]
        assert summary.n == len(values) and summary.mean == pytest.approx(sum(values) / len(values))
        if len(set(values)) > 1:
            assert summary.low < summary.mean < summary.high
    assert metrics.metric_keys(rows.values())[-1] == key  # ratings follow the automatic metrics



def test_an_excluded_annotators_ratings_leave_the_averages(arena_dir):
    settings, store = arena_dir
    careful, view, careful_vote = _vote(store, settings, "Fay")
    metrics.rate_vote(store, careful["id"], careful_vote, {"a": {"coherence": 4}})
    spammer, _, spam_vote = _vote(store, settings, "Gus")
    metrics.rate_vote(store, spammer["id"], spam_vote, {"a": {"coherence": 1}, "b": {"coherence": 1}})
    quality.set_excluded(store.db, [spammer["id"]], "failed gold pairs")

    rated = {(r["completion_id"], r["criterion"]): r for r in ratings.story_ratings(store.db)}
    assert rated == {(view.pair.completion_a, "coherence"): {
        "completion_id": view.pair.completion_a, "criterion": "coherence", "mean": 4.0, "n": 1}}
    stats = ratings.policy_rating_stats(store.db)
    assert [(s["n"], s["mean"]) for s in stats] == [(1, 4.0)]
