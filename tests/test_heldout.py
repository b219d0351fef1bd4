"""rlhf/heldout.py: held out by prompt, accuracies beside their trivial baselines, honest intervals."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from rlhf.heldout import (
    INTERVAL_ABOVE,
    NO_DATA,
    NOT_ABOVE,
    POINT_ABOVE,
    heldout_markdown,
    normalised_prompt,
    pairwise_report,
    rate_interval,
    split_by_prompt,
)
from rlhf.jobs import run_inline
from rlhf.training import preference_data
from storage import completions, models, prompts, votes
from tests.test_reward import _vote_longer

WORDS = "cat dog sun tree boat ball girl boy moon star fish bird hat cake rain".split()


def story(rng: random.Random, n: int, extra: str = "") -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(n))
    return f"{body} {extra}".strip() + "."


def records(n_prompts: int, per_prompt: int, seed: int = 0, longer_wins: bool = True) -> list[dict]:
    """Pairs where the chosen story is the longer one (or, if not longer_wins, lengths are
    equal and the chosen story is the one that says "kind")."""
    rng = random.Random(seed)
    out = []
    for p in range(n_prompts):
        for i in range(per_prompt):
            if longer_wins:
                chosen, rejected = story(rng, rng.randint(40, 60)), story(rng, rng.randint(10, 30))
            else:
                chosen, rejected = story(rng, 30, "kind"), story(rng, 30, "mean")
            out.append({"prompt": f"Write a story about thing {p}.", "chosen": chosen, "rejected": rejected,
                        "source": "human", "vote_id": p * per_prompt + i})
    return out


def prompts_of(rows: list[dict]) -> set[str]:
    return {normalised_prompt(r["prompt"]) for r in rows}


def test_no_prompt_is_on_both_sides_and_each_stays_put_as_votes_arrive():
    data = records(60, 3)
    # The same prompt typed with other case and spacing is the same prompt.
    data += [{**data[0], "prompt": "  write a STORY about   thing 0. ", "vote_id": 999}]
    train, held = split_by_prompt(data, 0.25)
    assert train and held and len(train) + len(held) == len(data)
    assert not prompts_of(train) & prompts_of(held)
    assert 0.1 < len(prompts_of(held)) / 60 < 0.4
    more_train, more_held = split_by_prompt(data + records(90, 2, seed=1)[120:], 0.25)
    assert prompts_of(held) <= prompts_of(more_held) and prompts_of(train) <= prompts_of(more_train)


def test_few_prompts_still_keep_one_on_each_side_and_one_prompt_holds_nothing_out():
    two = records(2, 4)
    for fraction in (0.01, 0.5, 0.99):
        train, held = split_by_prompt(two, fraction)
        assert len(prompts_of(train)) == len(prompts_of(held)) == 1
    one = records(1, 5)
    assert split_by_prompt(one, 0.5) == (one, [])
    assert split_by_prompt(records(5, 2), 0.0)[1] == []
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        split_by_prompt(one, 1.0)


def test_preference_data_holds_out_whole_prompts(arena_dir):
    _, store = arena_dir
    db = store.db
    for prompt in prompts.list_prompts(db):
        stories = completions.completions_for_prompt(db, prompt["id"])
        if len(stories) < 2:
            continue
        a, b = sorted(stories, key=lambda c: c["model_id"])[:2]
        pair = votes.ShownPair(prompt["id"], a["id"], b["id"], a["model_id"], b["model_id"], time.time())
        for n in range(3):
            votes.record_vote(db, pair, annotator_id=None, choice="ab"[n % 2], client_key=f"{prompt['id']}-{n}")
    train, held, _ = preference_data(store, eval_fraction=0.3)
    assert train and held
    assert not prompts_of(train) & prompts_of(held)


def test_when_length_alone_predicts_the_label_the_baseline_shows_it_and_a_random_model_loses():
    data = records(30, 4)
    rng = np.random.default_rng(0)
    report = pairwise_report(data, rng.normal(size=len(data)).tolist())
    assert report["baselines"]["longer story wins"] == 1.0
    assert report["baselines"]["shorter story wins"] == 0.0
    assert report["best_baseline"] == {"name": "longer story wins", "accuracy": 1.0}
    assert report["pairs"] == 120 and report["prompts"] == 30
    assert 0.3 < report["accuracy"] < 0.7 and report["verdict"] == NOT_ABOVE
    assert 'does not beat the best trivial baseline, "longer story wins" (1.00)' in report["summary"]
    # A model that learned only length matches the rule, and that is not beating it.
    by_length = pairwise_report(data, lambda r: len(r["chosen"].split()) - len(r["rejected"].split()))
    assert by_length["accuracy"] == 1.0 and by_length["verdict"] == NOT_ABOVE


def test_a_model_that_sees_what_the_rules_miss_beats_them():
    data = records(40, 3, longer_wins=False)
    report = pairwise_report(data, lambda r: ("kind" in r["chosen"]) - ("kind" in r["rejected"]))
    assert report["accuracy"] == 1.0
    assert report["ci95"][0] > report["best_baseline"]["accuracy"]
    assert report["verdict"] == INTERVAL_ABOVE and report["summary"].startswith("The model beats")
    # Right on 16 of 20 pairs: above the rules, but the interval includes the best of them.
    noisy = pairwise_report(data[:20], [1.0] * 16 + [-1.0] * 4)
    assert noisy["accuracy"] > noisy["best_baseline"]["accuracy"] >= noisy["ci95"][0]
    assert noisy["verdict"] == POINT_ABOVE and "not clearly better" in noisy["summary"]


def test_ties_of_the_scorer_count_half():
    data = records(4, 1)
    assert pairwise_report(data, [1.0, -1.0, 0.0, 0.0])["accuracy"] == 0.5
    assert pairwise_report(data, [1.0, 1.0, 1.0, 0.0])["accuracy"] == 0.875


def test_intervals_shrink_with_pairs_and_one_pair_is_never_a_point():
    def width(n):
        rng = random.Random(n)
        outcomes = [float(rng.random() < 0.7) for _ in range(n)]
        low, high = rate_interval(outcomes, list(range(n)))
        return high - low

    assert width(1) > width(10) > width(100) > width(1000) > 0
    for outcome in (0.0, 0.5, 1.0):
        low, high = rate_interval([outcome], ["only prompt"])
        assert high - low > 0.5 and low <= outcome <= high
    report = pairwise_report(records(1, 1), [2.0])
    assert report["accuracy"] == 1.0 and report["ci95"][0] < 0.5


def test_resampling_is_over_prompts_not_pairs():
    """Pairs of one prompt are not independent: whole prompts right or wrong widen the interval."""
    outcomes = [1.0] * 30 + [0.0] * 30
    independent = rate_interval(outcomes, list(range(60)))
    clustered = rate_interval(outcomes, [i // 10 for i in range(60)])
    assert clustered[1] - clustered[0] > 1.5 * (independent[1] - independent[0])
    assert rate_interval(outcomes, list(range(60)), seed=3) == rate_interval(outcomes, list(range(60)), seed=3)


def test_bad_margins_and_no_pairs_say_what_is_wrong():
    data = records(3, 1)
    with pytest.raises(ValueError, match="2 margins for 3 records"):
        pairwise_report(data, [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        pairwise_report(data, [1.0, float("nan"), 2.0])
    empty = pairwise_report([], [])
    assert empty["verdict"] == NO_DATA and empty["accuracy"] is None and empty["pairs"] == 0
    assert "No held-out pairs" in heldout_markdown(empty)


def test_markdown_shows_accuracy_prompts_baselines_and_warns_only_when_the_model_loses():
    losing = pairwise_report(records(10, 2), [-1.0] * 20)
    text = heldout_markdown(losing)
    assert "**Held-out accuracy:** 0.00" in text and "20 pairs from 10 held-out prompts" in text
    assert "longer story wins 1.00" in text and "repeated 4-grams (lower wins)" in text
    assert "**Warning:** The model does not beat" in text
    winning = pairwise_report(records(40, 3, longer_wins=False), [1.0] * 120)
    assert "Held-out accuracy:** 1.00" in heldout_markdown(winning) and "Warning" not in heldout_markdown(winning)
    assert heldout_markdown(None) == ""


def test_closed_loop_win_rates_carry_an_interval_over_prompts_even_with_one_prompt(arena_dir):
    from bench.closed_loop import head_to_head
    from rlhf.simulate import Oracle
    from storage import models

    settings, store = arena_dir
    child, parent = (m.id for m in models.list_models(store.db)[:2])
    pool = [p["id"] for p in prompts.list_prompts(store.db)[: settings.pool_prompts]]
    oracle = Oracle(min_words=1, max_words=20, both_bad_below=-1.0)
    every = head_to_head(settings, child, parent, pool, oracle, seed=0)
    one = head_to_head(settings, child, parent, pool[:1], oracle, seed=0)
    assert every["pairs"] == len(pool) and one["pairs"] == 1
    for result in (every, one):
        low, high = result["ci95"]
        assert low <= result["win_rate"] <= high and high - low > 0.2
    assert one["ci95"][1] - one["ci95"][0] > every["ci95"][1] - every["ci95"][0]


@pytest.mark.parametrize("kind, params", [
    ("dpo", {"max_steps": 1, "batch_size": 8, "max_length": 96, "max_eval_pairs": 1000}),
    ("dph", {"max_steps": 20, "max_length": 96, "register_reward": False}),
])
def test_dpo_and_dph_jobs_report_the_length_baseline_on_unseen_prompts(arena_dir, kind, params):
    """The reward job's check (tests/test_reward.py), in the same shape for DPO and DPH:
    votes where length alone predicts the label, a few cheap steps."""
    settings, store = arena_dir
    base, _ = _vote_longer(store, n=24)
    job = run_inline(settings, kind, {"base": base, "eval_fraction": 0.3, **params})
    assert job["status"] == "succeeded", job["error"]
    held = models.get_model(store.db, job["result_model_id"]).metrics["heldout"]
    assert job["metrics"]["heldout"] == held
    assert held["best_baseline"] == {"name": "longer story wins", "accuracy": 1.0}
    low, high = held["ci95"]
    assert low <= held["accuracy"] <= high and low < high and held["verdict"] == NOT_ABOVE
    train, unseen, _ = preference_data(store, eval_fraction=0.3)
    assert not prompts_of(train) & prompts_of(unseen)
    assert (held["pairs"], held["prompts"]) == (len(unseen), len(prompts_of(unseen)))
    assert "Warning:** The model does not beat" in heldout_markdown(held)
