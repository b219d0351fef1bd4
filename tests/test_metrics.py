"""Automatic story metrics per policy: values, storage, intervals, the pool-job hook,
perplexity on a configured corpus, the Metrics tab's table and plot."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
from scipy import stats

from rlhf import metrics
from rlhf.jobs import run_inline
from rlhf.settings import add_arguments, from_args
from rlhf.story_features import distinct_ngram_share, words
from storage import completions, models, scores
from storage import metrics as metric_rows
from tests.conftest import tiny_settings

PROMPT = 'Write a story about a cat. Use the words "hat", "mat" and "moon".'
LOOPING = "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat. The end."
CORPUS = "\n\n".join(
    f"Once upon a time a little {animal} found a {thing} in the garden. It was happy and told its friends."
    for animal in ("fox", "cat", "dog", "owl", "bee", "hen") for thing in ("hat", "ball", "kite")
)


def test_distinct_n_counts_distinct_ngrams():
    assert distinct_ngram_share("the cat the dog", 1) == pytest.approx(3 / 4)
    assert distinct_ngram_share("the cat the cat", 2) == pytest.approx(2 / 3)
    assert distinct_ngram_share("", 1) is None and distinct_ngram_share("one", 2) is None


def test_story_metric_values_read_prompt_and_text():
    values = metrics.story_metric_values(PROMPT, LOOPING)
    assert values["prompt_adherence"] == pytest.approx(1 / 3)  # "mat" only
    assert values["loop"] == 1.0 and values["ending"] == 1.0
    assert values["length"] == 20.0
    assert values["distinct_1"] == pytest.approx(6 / 20)
    assert values["repetition"] > 0.9
    assert "readability" in values  # 20 words: Flesch applies
    fresh = metrics.story_metric_values("Write a story about a robot.", "A robot woke up and")
    assert fresh["loop"] == 0.0 and fresh["ending"] == 0.0
    # No required words asked, too short for Flesch: those metrics are left out, not faked.
    assert "prompt_adherence" not in fresh and "readability" not in fresh
    assert set(values) <= set(metrics.STORY_METRICS)


def test_t_interval_matches_scipy():
    sample = np.array([3.0, 4.0, 4.0, 5.0, 2.0, 4.0])
    summary = metrics.t_interval(len(sample), sample.mean(), (sample ** 2).mean())
    low, high = stats.t.interval(0.95, len(sample) - 1, loc=sample.mean(), scale=stats.sem(sample))
    assert (summary.low, summary.high) == (pytest.approx(low), pytest.approx(high))
    single = metrics.t_interval(1, 2.0, 4.0)
    assert single.mean == 2.0 and single.low is None and single.high is None


def test_tiny_starter_pool_gets_metrics_once_and_per_policy_intervals(arena_dir):
    settings, store = arena_dir
    db = store.db
    sizes = completions.pool_sizes(db)
    assert metrics.measure_new_stories(store) == sum(sizes.values()) == 12
    assert metrics.measure_new_stories(store) == 0  # incremental: nothing is measured twice

    rows = {r.name: r for r in metrics.policy_table(store)}
    assert set(rows) == {"tiny-t0.7", "tiny-t1.0"}
    for row in rows.values():
        assert row.stories == 6
        length = row.metrics["length"]
        assert length.n == 6 and length.low <= length.mean <= length.high
        assert {"repetition", "distinct_1", "ending", "loop"} <= set(row.metrics)
    # Means are the means of the stored per-story values.
    policy = rows["tiny-t0.7"]
    ids = [c["id"] for c in db.query("SELECT id FROM completions WHERE model_id = ?", [policy.model_id])]
    stored = metric_rows.story_metric_values(db, ids)
    assert policy.metrics["length"].mean == pytest.approx(np.mean([stored[i]["length"] for i in ids]))

    # A reward model's stored scores become a per-policy metric; the reward model is no row.
    reward = models.add_model(db, "reward-<b>x</b>", "reward", path="/nowhere")
    scores.save_scores(db, reward.id, {i: float(n) for n, i in enumerate(ids)})
    rows = {r.name: r for r in metrics.policy_table(store)}
    assert "reward-<b>x</b>" not in rows
    assert rows["tiny-t0.7"].metrics[metrics.REWARD_PREFIX + "reward-<b>x</b>"].mean == pytest.approx(2.5)
    assert metrics.REWARD_PREFIX + "reward-<b>x</b>" not in rows["tiny-t1.0"].metrics


def test_generate_job_measures_each_new_batch(arena_dir):
    settings, store = arena_dir
    policy_ids = [m.id for m in models.list_models(store.db)]
    job = run_inline(settings, "generate", {"model_ids": policy_ids, "prompts": 8})
    assert job["status"] == "succeeded", job["error"]
    assert completions.pool_sizes(store.db) == {i: 8 for i in policy_ids}
    # Every story, old and new, was measured by the job itself.
    assert metric_rows.stories_without_metrics(store.db) == []
    assert metrics.measure_new_stories(store) == 0


def test_prepare_job_measures_the_starter_pool(arena_dir):
    settings, store = arena_dir
    assert len(metric_rows.stories_without_metrics(store.db)) == 12
    job = run_inline(settings, "prepare", {})
    assert job["status"] == "succeeded", job["error"]
    assert metric_rows.stories_without_metrics(store.db) == []


def test_perplexity_is_measured_per_policy_once_per_corpus(arena_dir, tmp_path):
    settings, store = arena_dir
    ids = [m.id for m in models.list_models(store.db)]
    assert metrics.measure_policies(store, settings, ids) == {}  # no corpus configured
    corpus = tmp_path / "stories.txt"
    corpus.write_text(CORPUS)
    configured = tiny_settings(settings.data_dir, metrics_corpus=corpus)
    measured = metrics.measure_policies(store, configured, ids)
    assert set(measured) == set(ids)
    value = measured[ids[0]]
    assert math.isfinite(value) and value > 1
    # Both starter policies are the same weights: one figure.
    assert measured[ids[1]] == value
    assert metrics.measure_policies(store, configured, ids) == {}
    row = {r.name: r for r in metrics.policy_table(store)}["tiny-t0.7"]
    assert row.metrics[metrics.PERPLEXITY].mean == value
    corpus.write_text(CORPUS + "\n\nA new story about a frog who sings.")
    assert set(metrics.measure_policies(store, configured, ids)) == set(ids)  # the corpus changed


def test_a_failing_perplexity_never_fails_the_pool_job(arena_dir, tmp_path, capsys):
    settings, store = arena_dir
    corpus = tmp_path / "short.txt"
    corpus.write_text("Too short.\n\nStill short.")
    ids = [m.id for m in models.list_models(store.db)]
    assert metrics.measure_policies(store, tiny_settings(settings.data_dir, metrics_corpus=corpus), ids) == {}
    assert "no perplexity for tiny-t0.7" in capsys.readouterr().err
    assert metric_rows.policy_metrics(store.db) == []


def test_metrics_corpus_setting_is_a_checked_flag(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS)
    settings = from_args(parser.parse_args(["--metrics-corpus", str(corpus)]), {})
    assert settings.metrics_corpus == corpus.resolve()
    assert from_args(parser.parse_args([]), {}).metrics_corpus is None
    assert from_args(parser.parse_args([]),
                     {"STORY_ARENA_METRICS_CORPUS": str(corpus)}).metrics_corpus == corpus.resolve()
    with pytest.raises(ValueError, match="--metrics-corpus"):
        from_args(parser.parse_args(["--metrics-corpus", str(tmp_path / "missing.txt")]), {})


def _child_policy(store, parent_name: str, name: str, story: str) -> int:
    db = store.db
    parent = models.get_model_by_name(db, parent_name)
    child = models.add_model(db, name, "dpo", path=parent.path, parent_id=parent.id)
    for row in db.query("SELECT DISTINCT prompt_id FROM completions WHERE model_id = ?", [parent.id]):
        completions.add_completion(db, row["prompt_id"], child.id, f"{story} ({row['prompt_id']}).")
    return child.id


def test_pool_stores_which_stories_were_cut_and_the_metrics_tab_shows_the_share(arena_dir):
    from ui.metrics import table_html

    settings, store = arena_dir
    db = store.db
    stored = list(db.query("SELECT model_id, tokens, truncated FROM completions"))
    # The tiny starter rarely samples end-of-sequence: a story is cut exactly when it used the budget.
    assert stored and all(r["truncated"] == int(r["tokens"] == settings.max_new_tokens) for r in stored)
    assert any(r["truncated"] for r in stored)
    child_id = _child_policy(store, "tiny-t0.7", "dpo-imported", "A fox found a kite")  # no flag stored
    metrics.measure_new_stories(store)
    rows = {r.model_id: r for r in metrics.policy_table(store)}
    for model_id in {r["model_id"] for r in stored}:
        share = np.mean([r["truncated"] for r in stored if r["model_id"] == model_id])
        assert rows[model_id].metrics["truncated"].mean == pytest.approx(share)
    assert "truncated" not in rows[child_id].metrics  # unknown is left out, not counted as "not cut"
    assert f">{metrics.STORY_METRICS['truncated'].label}</th>" in table_html(list(rows.values()))


def test_parent_comparison_and_tab_rendering(arena_dir):
    from ui.metrics import comparison_figure, table_html

    settings, store = arena_dir
    child_id = _child_policy(store, "tiny-t0.7", "dpo-<script>x</script>", "A fox found a red kite and smiled")
    metrics.measure_new_stories(store)
    rows = metrics.policy_table(store)
    points = metrics.parent_comparison(rows, child_id)
    assert {p["role"] for p in points} == {"parent", "policy"}
    by_role = {(p["metric"], p["role"]): p for p in points}
    assert by_role["ending", "policy"]["mean"] == 1.0  # every child story ends on "."
    assert by_role["length", "parent"]["policy"] == "tiny-t0.7"
    assert metrics.parent_comparison(rows, models.get_model_by_name(store.db, "tiny-t0.7").id) == []

    page = table_html(rows)
    assert "<script>" not in page and "dpo-&lt;script&gt;x&lt;/script&gt;" in page
    assert page.count("<tr>") == 1 + len(rows)
    figure = comparison_figure(points)
    assert len(figure.axes) == len({p["metric"] for p in points})
    assert len(comparison_figure([]).axes) == 1


def test_agreement_bench_prints_json_for_ratings_and_app_votes(arena_dir, tmp_path, capsys):
    import json
    import random

    from bench import metric_agreement
    from rlhf import arena

    settings, store = arena_dir
    # A HANNA-shaped file whose every criterion is the story's length: length must rank it perfectly.
    stories = [" ".join(["word"] * (10 + 7 * i)) + "." for i in range(8)]
    hanna = tmp_path / "hanna.jsonl"
    hanna.write_text("\n".join(json.dumps(
        {"prompt": "A story about words.", "story": s,
         **{c: float(len(s.split())) for c in metric_agreement.HANNA_CRITERIA}}
    ) for s in stories))
    votes = 0
    for name in ("Ivy", "Jo", "Kit"):
        who = arena.sign_in(store, settings, name)
        while (view := arena.next_pair(store, who["id"], random.Random(votes))) is not None and votes < 6:
            longer = "a" if len(words(view.story_a)) >= len(words(view.story_b)) else "b"
            vote_id, _ = arena.submit_vote(store, settings, who["id"], view, longer)
            metrics.rate_vote(store, who["id"], vote_id,
                              {side: {c: 3 + (side == longer) for c in ("coherence", "prompt_adherence", "engagement")}
                                                           for side in "ab"})
            votes += 1

    assert metric_agreement.main(["--quick", "--hanna", str(hanna), "--data-dir", str(settings.data_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quick"] is True and report["hanna"]["stories"] == 8
    length = next(row for row in report["hanna"]["table"] if row["metric"] == "length")
    assert all(v["spearman"] == 1.0 and v["kendall"] == 1.0 for v in length["criteria"].values())
    assert abs(report["hanna"]["strongest"]["coherence"]["spearman"]) == 1.0
    loop = next(row for row in report["hanna"]["table"] if row["metric"] == "loop")
    assert loop["criteria"]["coherence"]["spearman"] is None  # constant on these stories
    app = report["app"]
    assert app["decided_human_votes"] == votes == 6
    # Every vote chose the longer story: length never picks the other one.
    assert app["metrics"]["length"]["accuracy"] in (1.0, None)
    assert app["metrics"]["length"]["votes"] == votes
    assert app["ratings"]["stories"] > 0
    assert {row["metric"] for row in app["ratings"]["table"]} >= {"length"}
