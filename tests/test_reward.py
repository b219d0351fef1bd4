"""Reward models (rlhf.reward, storage.scores): params, migration, training end to end on a
learnable preference (people always prefer the longer story), pool scores, the scorer and
the prediction stored with each live vote."""

from __future__ import annotations

import json
import random
import time

import pytest

from rlhf import arena, hub, metric_reward, preferences
from rlhf.heldout import NOT_ABOVE, heldout_markdown, normalised_prompt
from rlhf.jobs import run_inline
from rlhf.reward import PRESET_VALUES, STEP_CAPS, RewardParams
from rlhf.runner import train
from rlhf.scoring import load_reward_scorer, score_new_completions
from rlhf.training import JobProgress, preference_data
from storage import annotators, completions, jobs, models, prompts, scores, votes
from storage.db import Store
from storage.schema import MIGRATIONS
from storage.votes import ShownPair
from tests.conftest import run_cli

WORDS = ("cat dog sun moon tree happy little big red blue ran jumped saw the a and friend "
         "home played sang bird fish hat boat star cake").split()
PAIRS = 64


def _story(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def _vote_longer(store: Store, n: int = PAIRS, seed: int = 0) -> tuple[int, int]:
    """n new prompts, a short and a long story from each starter policy, and a human vote
    for the longer one each time (the longer story sits left or right at random)."""
    db = store.db
    rng = random.Random(seed)
    policy_x, policy_y = [m.id for m in models.list_models(db)][:2]
    rater = annotators.sign_in(db, "rater", "annotator")["id"]
    for i in range(n):
        text = f"Tell a story about friend number {i}."
        prompts.add_prompts(db, [text], source="user")
        prompt_id = db.execute("SELECT id FROM prompts WHERE text = ?", [text]).fetchone()[0]
        short, long = _story(rng, rng.randint(2, 6)), _story(rng, rng.randint(22, 40))
        texts = (short, long) if rng.random() < 0.5 else (long, short)
        cx = completions.add_completion(db, prompt_id, policy_x, texts[0])
        cy = completions.add_completion(db, prompt_id, policy_y, texts[1])
        sides = [(policy_x, cx, texts[0]), (policy_y, cy, texts[1])]
        rng.shuffle(sides)
        (ma, ca, ta), (mb, cb, tb) = sides
        pair = ShownPair(prompt_id, ca, cb, ma, mb, time.time())
        votes.record_vote(db, pair, annotator_id=rater, choice="a" if len(ta) > len(tb) else "b",
                          client_key=f"k{i}")
    return policy_x, policy_y


TINY_PARAMS = {"max_steps": 16, "learning_rate": 2e-3, "batch_size": 8, "max_length": 96, "train_layers": -1}


# --- params ------------------------------------------------------------------------------

def test_params_defaults_follow_the_preset_and_explicit_keys_win():
    quick = RewardParams.from_dict({})
    assert (quick.preset, quick.backbone, quick.base) == ("quick", "policy", None)
    assert quick.max_steps == PRESET_VALUES["quick"]["policy"]["max_steps"]
    full = RewardParams.from_dict({"preset": "full", "backbone": "minilm"})
    assert full.max_steps == PRESET_VALUES["full"]["minilm"]["max_steps"]
    mine = RewardParams.from_dict({"preset": "full", "max_steps": 7, "learning_rate": 1e-3, "base": "3"})
    assert (mine.max_steps, mine.learning_rate, mine.base) == (7, 1e-3, 3)
    assert mine.batch_size == PRESET_VALUES["full"]["policy"]["batch_size"]
    assert RewardParams.from_dict({"max_steps": None}).max_steps == quick.max_steps  # unset form field
    assert (quick.sources, quick.datasets, quick.score_pool) == ("human", None, False)


def test_quick_steps_make_at_least_one_pass_up_to_the_cap():
    quick = RewardParams.from_dict({})  # batch 4, 20 steps, cap 120
    assert quick.steps_for(16) == quick.max_steps  # small data: the preset's steps (5 passes)
    assert quick.steps_for(400) == 100  # one pass over 400 pairs, more than the preset's 20
    assert quick.steps_for(10_000) == STEP_CAPS["quick"]["policy"]
    assert RewardParams.from_dict({"backbone": "minilm"}).steps_for(10_000) == STEP_CAPS["quick"]["minilm"]
    assert RewardParams.from_dict({"max_steps": 3}).steps_for(400) == 3  # an explicit budget is kept
    assert "explicit" not in quick.to_dict()


@pytest.mark.parametrize("params, message", [
    ({"steps": 3}, "Unknown reward parameter"),
    ({"preset": "huge"}, "preset must be one of"),
    ({"backbone": "bert"}, "backbone must be one of"),
    ({"max_steps": 0}, "max_steps must be between"),
    ({"max_steps": 2.5}, "max_steps must be a whole number"),
    ({"batch_size": True}, "batch_size must be a whole number"),
    ({"learning_rate": 0}, "learning_rate must be in"),
    ({"learning_rate": "fast"}, "learning_rate must be a number"),
    ({"eval_fraction": 0.95}, "eval_fraction must be in"),
    ({"min_pairs": 1}, "min_pairs must be between"),
    ({"max_length": 8}, "max_length must be between"),
    ({"train_layers": -2}, "train_layers must be between"),
    ({"base": "first"}, "base must be a whole number"),
    ({"sources": "weak"}, "sources must be one of human, import, both"),
    ({"datasets": "foxes"}, "datasets selects imported data sets: set sources to import or both"),
    ({"sources": "import", "datasets": "no spaces"}, "datasets: 'no spaces'"),
    ({"sources": "both", "datasets": " , "}, "datasets: name at least one"),
    ({"score_pool": "yes"}, "score_pool must be true or false"),
])
def test_params_reject_bad_values_clearly(params, message):
    with pytest.raises(ValueError, match=message):
        RewardParams.from_dict(params)


# --- migration and storage -----------------------------------------------------------------

def test_migration_adds_scores_table_and_vote_columns(tmp_path):
    from storage.db import connect

    db = connect(tmp_path / "old.db")
    MIGRATIONS.apply(db, stop_before="m002_reward_scores")  # a database from before rewards
    assert "predicted" not in db["votes"].columns_dict
    db.conn.close()
    store = Store(tmp_path / "old.db")  # opening applies the new migration
    db = store.db
    assert {"predicted", "predicted_by"} <= set(db["votes"].columns_dict)
    assert db["votes"].columns_dict["predicted"] is float
    assert set(db["reward_scores"].columns_dict) >= {"completion_id", "reward_model_id", "score"}
    assert db["reward_scores"].pks == ["completion_id", "reward_model_id"]
    assert {"votes_pair_stats_insert", "votes_pair_stats_delete"} <= {t.name for t in db.triggers}
    db.conn.close()


def test_scores_pair_prediction_and_agreement(store):
    db = store.db
    x = models.add_model(db, "x", "local", path="/m/x")
    y = models.add_model(db, "y", "local", path="/m/y")
    old = models.add_model(db, "rm-old", "reward", path="/m/rm1", active=False)
    new = models.add_model(db, "rm-new", "reward", path="/m/rm2", active=False)
    prompts.add_prompts(db, ["p1", "p2"])
    c = [completions.add_completion(db, pid, m.id, f"s{pid}{m.id}") for pid in (1, 2) for m in (x, y)]
    assert scores.score_pair(db, c[0], c[1]) is None
    scores.save_scores(db, old.id, {c[0]: 0.0, c[1]: 5.0, c[2]: 1.0, c[3]: 0.0})
    scores.save_scores(db, new.id, [(c[0], 2.0), (c[1], 0.0)])  # newest scored only prompt 1
    p, by = scores.score_pair(db, c[0], c[1])
    assert by == new.id and p == pytest.approx(1 / (1 + pow(2.718281828459045, -2.0)))
    p2, by2 = scores.score_pair(db, c[2], c[3])
    assert by2 == old.id and 0.5 < p2 < 1
    assert scores.newest_reward_model_id(db) == new.id
    assert [r["id"] for r in scores.unscored_completions(db, new.id)] == [c[2], c[3]]
    assert scores.scores_for(db, old.id, [c[1]]) == {c[1]: 5.0}

    rater = annotators.sign_in(db, "r", "annotator")["id"]
    now = time.time()
    for i, (choice, predicted) in enumerate([("a", 0.9), ("b", 0.8), ("tie", 0.7), ("b", None)]):
        pair = ShownPair(1, c[0], c[1], x.id, y.id, now)
        votes.record_vote(db, pair, annotator_id=rater, choice=choice, client_key=str(i),
                          predicted=predicted, predicted_by=new.id if predicted is not None else None)
    summary = scores.agreement(db)
    assert {k: summary[k] for k in ("votes", "predicted", "decided", "agreed")} == \
        {"votes": 4, "predicted": 3, "decided": 2, "agreed": 1}
    assert summary["agreement"] == 0.5
    assert summary["by_model"] == [{"reward_model_id": new.id, "reward_model": "rm-new", "decided": 2,
                                    "agreed": 1, "agreement": 0.5}]
    assert scores.agreement(db, sources=("weak",))["agreement"] is None


# --- training --------------------------------------------------------------------------------

def test_reward_model_learns_longer_is_better_and_predicts_live_votes(arena_dir):
    settings, store = arena_dir
    db = store.db
    policy_x, policy_y = _vote_longer(store)
    jobs_before = len(jobs.list_jobs(db, limit=100))

    job = run_inline(settings, "reward", {"base": policy_x, **TINY_PARAMS, "score_pool": True})
    assert job["status"] == "succeeded", job["error"]
    record = models.get_model(db, job["result_model_id"])
    assert (record.kind, record.parent_id, record.active) == ("reward", policy_x, False)
    m = record.metrics
    assert m["steps"] == TINY_PARAMS["max_steps"] and m["votes_used"] == PAIRS
    assert m["heldout"]["pairs"] > 0 and m["train_pairs"] + m["heldout"]["pairs"] == PAIRS
    assert m["heldout"]["accuracy"] >= 0.75, m
    assert m["epochs"] == round(TINY_PARAMS["max_steps"] * TINY_PARAMS["batch_size"] / m["train_pairs"], 2)
    assert job["metrics"]["heldout"] == m["heldout"]
    # a reward model is no story policy: no pool job was queued for it
    assert len(jobs.list_jobs(db, limit=100)) == jobs_before + 1
    assert not list(settings.models_dir.glob(f"reward-job{job['id']}/checkpoint-*"))

    # the whole pool was scored, as asked
    pool = db["completions"].count
    assert m["pool_scored"] == pool == len(scores.scores_for(db, record.id))

    # the scorer: higher for the longer story, same numbers as stored, batch-independent
    scorer = load_reward_scorer(record, "cpu")
    assert load_reward_scorer(record, "cpu") is scorer
    rng = random.Random(7)
    short, long = _story(rng, 3), _story(rng, 30)
    s_short, s_long = scorer(["Tell a story about a boat.", "Tell a story about a boat."], [short, long])
    assert s_long > s_short
    row = db.execute("SELECT c.id, p.text, c.text FROM completions c JOIN prompts p ON p.id = c.prompt_id"
                     " ORDER BY c.id DESC LIMIT 1").fetchone()
    assert scorer([row[1]], [row[2]])[0] == pytest.approx(scores.scores_for(db, record.id)[row[0]], abs=1e-4)

    # a vote through the arena stores the reward model's prediction
    voter = arena.sign_in(store, settings, "newcomer")["id"]
    view = arena.next_pair(store, voter, random.Random(0))
    vote_id, new = arena.submit_vote(store, settings, voter, view, "a")
    vote = db["votes"].get(vote_id)
    assert new and vote["predicted_by"] == record.id and 0.0 < vote["predicted"] < 1.0
    assert scores.agreement(db)["predicted"] == 1

    # stories a generate job writes later are scored as they are written
    prompts.add_prompts(db, ["A brand new prompt."], source="user")
    generated = run_inline(settings, "generate", {"model_ids": [policy_x], "prompts": None})
    assert generated["status"] == "succeeded", generated["error"]
    (cid, text), = db.execute(
        "SELECT c.id, c.text FROM completions c JOIN prompts p ON p.id = c.prompt_id"
        " WHERE p.text = 'A brand new prompt.'").fetchall()
    expected = scorer(["A brand new prompt."], [text])[0]
    assert scores.scores_for(db, record.id, [cid])[cid] == pytest.approx(expected, abs=1e-4)
    assert score_new_completions(store, settings, policy_x) == 0
    pid = db.execute("SELECT prompt_id FROM completions WHERE id = ?", [cid]).fetchone()[0]
    completions.add_completion(db, pid, policy_y, long)
    assert score_new_completions(store, settings) == 1
    assert score_new_completions(store, settings) == 0

    # a re-run of the same job (re-queued after a crash) reuses the registered model
    jobs.update_job(db, job["id"], status="running")
    again = train(settings, "reward", {"base": policy_x, **TINY_PARAMS, "score_pool": True},
                  JobProgress(settings, job["id"]))
    assert again.id == record.id and len([x for x in models.list_models(db) if x.kind == "reward"]) == 1


def test_reward_job_refuses_bad_inputs(arena_dir):
    settings, store = arena_dir
    progress = JobProgress(settings, None)
    with pytest.raises(ValueError, match="at least 8 decided votes"):
        train(settings, "reward", {}, progress)
    policy_x, _ = _vote_longer(store, n=10)
    with pytest.raises(ValueError, match="No base policy with id 999"):
        train(settings, "reward", {"base": 999}, progress)
    job = run_inline(settings, "reward", {"base": policy_x, "max_steps": 2, "batch_size": 2, "max_length": 64})
    assert job["status"] == "succeeded", job["error"]
    with pytest.raises(ValueError, match="is a reward model"):
        train(settings, "reward", {"base": job["result_model_id"]}, progress)
    failed = run_inline(settings, "reward", {"nonsense": 1})
    assert failed["status"] == "failed" and "Unknown reward parameter" in failed["error"]


def test_minilm_backbone_trains_and_scores(arena_dir):
    settings, store = arena_dir
    _vote_longer(store, n=24)
    job = run_inline(settings, "reward", {"backbone": "minilm", "max_steps": 8, "batch_size": 8,
                                          "learning_rate": 1e-4, "max_length": 64})
    assert job["status"] == "succeeded", job["error"]
    record = models.get_model(store.db, job["result_model_id"])
    assert (record.parent_id, record.active, record.metrics["backbone"]) == (None, False, "minilm")
    assert record.metrics["steps"] == 8 and record.metrics["max_length"] == 64
    # by default the job scores no pool story: new stories are scored as they are written
    assert "pool_scored" not in record.metrics and scores.scores_for(store.db, record.id) == {}
    scorer = load_reward_scorer(record, "cpu")
    values = scorer(["A story about a cat."] * 2, ["The cat sat.", "The cat ran home and sang a song."])
    assert len(values) == 2 and all(isinstance(v, float) for v in values)


def test_metrics_backbone_learns_the_preference_from_the_story_metrics(arena_dir):
    """Longer stories always win: the fitted length weight is positive, the held-out pairs are
    all ranked right, and the scorer read back from the model folder prefers the longer story."""
    settings, store = arena_dir
    _vote_longer(store, n=40)
    job = run_inline(settings, "reward", {"backbone": "metrics"})
    assert job["status"] == "succeeded", job["error"]
    record = models.get_model(store.db, job["result_model_id"])
    assert (record.parent_id, record.active, record.metrics["backbone"]) == (None, False, "metrics")
    assert record.metrics["steps"] is None and "epochs" not in record.metrics  # one closed-form fit
    weights = record.metrics["weights"]
    assert set(weights) == set(metric_reward.FEATURES) and weights["log_length"] > 0
    assert weights["log_length"] == max(weights.values())
    assert record.metrics["heldout"]["accuracy"] == 1.0
    scorer = load_reward_scorer(record, "cpu")
    short, long = scorer(["Tell a story about a cat."] * 2,
                         ["The cat sat.", "The cat ran home, sang a song to the moon and then slept all day."])
    assert long > short


def test_metrics_reward_needs_pairs_and_its_own_feature_list():
    with pytest.raises(ValueError, match="at least one preference pair"):
        metric_reward.fit([])
    model = metric_reward.fit([{"prompt": "A cat.", "chosen": "The cat sat down and slept.", "rejected": "Cat."}])
    with pytest.raises(ValueError, match="reads"):
        metric_reward.make_metric_scorer({**model, "features": ["length"]})


# --- honest numbers: the held-out block, from the CLI to the model card ------------------------

def test_cli_reward_job_reports_the_length_baseline_on_prompts_it_never_saw(arena_dir):
    """Votes where length alone predicts the label: the held-out report names "longer story
    wins" (1.0) as the baseline to beat, on prompts disjoint from the training prompts."""
    settings, store = arena_dir
    policy_x, _ = _vote_longer(store)
    sets = [a for key, value in TINY_PARAMS.items() for a in ("--set", f"{key}={value}")]
    proc = run_cli("train", "reward", "--data-dir", str(settings.data_dir), "--base", str(policy_x), *sets,
                   "--json", "--starter", "tiny", "--device", "cpu", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "succeeded", result["error"]
    held = result["metrics"]["heldout"]
    assert held["best_baseline"] == {"name": "longer story wins", "accuracy": 1.0}
    assert held["baselines"]["shorter story wins"] == 0.0
    low, high = held["ci95"]
    assert 0.0 <= low <= held["accuracy"] <= high <= 1.0 and low < high
    assert held["verdict"] == NOT_ABOVE and "does not beat" in held["summary"]  # nothing beats 1.0
    train_records, held_out, _ = preference_data(store, eval_fraction=RewardParams.from_dict({}).eval_fraction)
    seen = {normalised_prompt(r["prompt"]) for r in train_records}
    unseen = {normalised_prompt(r["prompt"]) for r in held_out}
    assert not seen & unseen and (held["pairs"], held["prompts"]) == (len(held_out), len(unseen))
    for key in ("eval_accuracy", "train_accuracy", "eval_pairs"):  # one held-out number, not two
        assert key not in result["metrics"]
    # The model card says the same (the Jobs tab reads the job's metrics, which are these).
    record = models.get_model(store.db, result["model_id"])
    assert record.metrics["heldout"] == held
    card = hub.model_card(store, settings, record, "arena/rm").text
    assert heldout_markdown(held) in card and 'does not beat the best trivial baseline, "longer story wins"' in card


def test_reward_job_trains_on_imported_pairs_only(arena_dir):
    settings, store = arena_dir
    db = store.db
    rng = random.Random(3)

    def pairs(animal: str, n: int) -> list[tuple[str, dict]]:
        return [(f"line {i + 1}", {"prompt": f"Tell a story about {animal} number {i}.",
                                   "chosen": _story(rng, 30), "rejected": _story(rng, 4)}) for i in range(n)]

    preferences.import_preferences(store, settings, pairs("a fox", 12), "foxes", "test")
    preferences.import_preferences(store, settings, pairs("an owl", 10), "owls", "test")
    with pytest.raises(ValueError, match="there are 0"):  # no human votes in this arena
        train(settings, "reward", {"max_steps": 1}, JobProgress(settings, None))
    params = {**TINY_PARAMS, "max_steps": 4, "sources": "import"}
    both = run_inline(settings, "reward", params)
    assert both["status"] == "succeeded", both["error"]
    assert both["metrics"]["votes_used"] == 22 and both["metrics"]["heldout"]["pairs"] > 0
    foxes = run_inline(settings, "reward", {**params, "datasets": "foxes"})
    assert foxes["status"] == "succeeded", foxes["error"]
    m = foxes["metrics"]
    assert m["votes_used"] == 12 and m["params"]["sources"] == "import" and m["params"]["datasets"] == "foxes"
    assert m["train_pairs"] + m["heldout"]["pairs"] == 12
    assert votes.imported_datasets(db)  # the imports stay where they were
    missing = run_inline(settings, "reward", {**params, "datasets": "hens"})
    assert missing["status"] == "failed" and "there are 0. Sources: import (hens)." in missing["error"]
