"""Weak supervision (rlhf.weak, storage.weak): each labeling function on hand-made pairs,
the label model on synthetic votes with known truth, weak votes kept off the leaderboard,
the `weak` job through the CLI, the reward job trained with weak labels, the Data-tab view."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest

from rlhf.jobs import run_inline
from rlhf.leaderboard import standings
from rlhf.training import weak_training_pairs
from rlhf.weak import (
    ABSTAIN,
    LF_NAMES,
    PREFER_A,
    PREFER_B,
    WeakParams,
    confident,
    fit_label_model,
    label_pool,
    prob_a,
    votes_for_pair,
)
from storage import annotators, completions, models, prompts, votes, weak
from storage.db import Store
from storage.votes import ShownPair
from tests.conftest import tiny_settings

WORDS_PROMPT = 'Write a funny story about a dragon who sneezes bubbles. Use the words "bubble" and "birthday".'
PLAIN_PROMPT = "Write a story about a lighthouse keeper and a seagull who becomes her helper."
GOOD = ("Once upon a time a little dragon named Pip sneezed. Out came a bubble! On his birthday, all "
        "his friends laughed and played with the bubbles. Pip was so happy. The dragon smiled and said "
        "thank you to everyone. They ate cake and sang songs until the moon came up.")
SIMPLE = ("The cat sat on the mat. The dog ran to the cat. They had fun in the sun all day long. "
          "Then they went home to bed.")
WORDY = ("Notwithstanding considerable organizational complications, the municipality inaugurated "
         "comprehensive infrastructure investments, facilitating extraordinary economic revitalization.")
VARIED = ("Mia found a shiny map under her bed. It showed a river, three hills and a hidden cave full of "
          "old coins. She packed bread, a lamp and warm socks, then walked past the farm where goats "
          "chewed grass. At noon she reached the cave.")
SAMEY = ("The dog ran and the dog sat and the cat ran and the cat sat and the dog ran to the cat and "
         "the cat ran to the dog and the dog sat by the cat and the cat sat by the dog and the dog ran "
         "and sat.")
LOOPING = "The dragon sat down. The dragon sat down. The dragon sat down. The dragon sat down."
LIGHTHOUSE = ("The lighthouse keeper was lonely until a seagull landed on her window. The seagull became her "
              "helper and carried her lamp oil.")
CAT = ("A small cat chased a red ball across the kitchen floor and then fell asleep in a warm basket "
       "by the fire.")
SAD_END = ("Once upon a time a little dragon named Pip sneezed. Out came a bubble on his birthday. Nobody "
           "came. Pip cried alone. He felt terrible, lonely and sad.")
META = ("Sure! Here is a story about a dragon. Once upon a time a little dragon named Pip sneezed. Out "
        "came a bubble on his birthday. His friends laughed and they ate cake.")
GIBBERISH = ("Blorf zzkt quopple vree snarg plimf wubbo krendle fzap drummix oog nerble. Thrip vox zindle "
             "morp glabber quinx splee vorn yeb tronk. Flib.")

# (labeling function, prompt, story A, story B, expected vote)
LF_CASES = [
    ("length", WORDS_PROMPT, GOOD, "Pip sneezed a bubble on his birthday.", PREFER_A),
    ("length", WORDS_PROMPT, GOOD, GOOD.rsplit(" ", 5)[0] + ".", ABSTAIN),  # 5 words apart
    ("readability", PLAIN_PROMPT, SIMPLE, WORDY + " " + WORDY, PREFER_A),
    ("readability", PLAIN_PROMPT, SIMPLE, "The cat sat.", ABSTAIN),  # too short to measure
    ("type_token_ratio", PLAIN_PROMPT, VARIED, SAMEY, PREFER_A),
    ("type_token_ratio", PLAIN_PROMPT, VARIED, "Mia found a map.", ABSTAIN),
    ("repetition", WORDS_PROMPT, GOOD, LOOPING, PREFER_A),
    ("repetition", WORDS_PROMPT, GOOD, SIMPLE, ABSTAIN),
    ("loops", WORDS_PROMPT, LOOPING, GOOD, PREFER_B),
    ("loops", WORDS_PROMPT, "The dragon sat down. The dragon sat down.", GOOD, ABSTAIN),  # twice is no loop
    ("required_words", WORDS_PROMPT, GOOD, "Pip sneezed a big bubble and everyone laughed.", PREFER_A),
    ("required_words", PLAIN_PROMPT, GOOD, "Pip sneezed a big bubble.", ABSTAIN),  # none required
    ("prompt_keywords", PLAIN_PROMPT, LIGHTHOUSE, CAT, PREFER_A),
    ("prompt_keywords", "Write a story.", LIGHTHOUSE, CAT, ABSTAIN),  # no content words to check
    ("ending", WORDS_PROMPT, GOOD, "Pip sneezed a bubble and then the", PREFER_A),
    ("ending", WORDS_PROMPT, GOOD, SIMPLE, ABSTAIN),
    ("sentiment", WORDS_PROMPT, GOOD, SAD_END, PREFER_A),
    ("sentiment", WORDS_PROMPT, GOOD, SIMPLE, ABSTAIN),
    ("meta_talk", WORDS_PROMPT, META, GOOD, PREFER_B),
    ("meta_talk", WORDS_PROMPT, SIMPLE, GOOD, ABSTAIN),
    ("real_words", WORDS_PROMPT, GIBBERISH, GOOD, PREFER_B),
    ("real_words", WORDS_PROMPT, SIMPLE, GOOD, ABSTAIN),
]


@pytest.mark.parametrize("lf, prompt, text_a, text_b, expected", LF_CASES,
                         ids=[f"{c[0]}-{'abstain' if c[4] == ABSTAIN else 'votes'}" for c in LF_CASES])
def test_each_labeling_function_votes_or_abstains_as_its_threshold_says(lf, prompt, text_a, text_b, expected):
    assert votes_for_pair(prompt, text_a, text_b)[lf] == expected
    mirrored = ABSTAIN if expected == ABSTAIN else 1 - expected
    assert votes_for_pair(prompt, text_b, text_a)[lf] == mirrored  # swapping the stories swaps the vote


def test_every_labeling_function_is_pinned():
    assert {c[0] for c in LF_CASES if c[4] != ABSTAIN} == set(LF_NAMES) == {c[0] for c in LF_CASES if c[4] == ABSTAIN}


def test_label_model_recovers_known_truth_and_beats_majority_vote():
    rng = np.random.default_rng(0)
    n, accuracies, coverage = 3000, [0.95, 0.85, 0.75, 0.65, 0.6], 0.6
    truth = rng.integers(0, 2, n)
    matrix = np.full((n, len(accuracies)), ABSTAIN)
    for j, accuracy in enumerate(accuracies):
        votes_here = rng.random(n) < coverage
        right = rng.random(n) < accuracy
        matrix[votes_here, j] = np.where(right, truth, 1 - truth)[votes_here]
    matrix[:50] = ABSTAIN  # some pairs no LF speaks on

    model = fit_label_model(matrix, epochs=500, seed=0)
    p_a = prob_a(model, matrix)
    assert np.all(p_a[:50] == 0.5)
    covered = (matrix != ABSTAIN).any(axis=1)
    predicted = np.where(p_a > 0.5, PREFER_A, PREFER_B)
    model_accuracy = (predicted == truth)[covered].mean()
    for_a, for_b = (matrix == PREFER_A).sum(axis=1), (matrix == PREFER_B).sum(axis=1)
    decided = covered & (for_a != for_b)
    majority_accuracy = (np.where(for_a > for_b, PREFER_A, PREFER_B) == truth)[decided].mean()
    assert model_accuracy > 0.85 and model_accuracy >= majority_accuracy
    sure = confident(p_a, 0.9)
    assert sure.sum() > 500 and (predicted == truth)[sure].mean() > 0.95
    learned = model.get_weights()  # the label model's estimate of each LF's accuracy
    assert learned[0] > learned[2] > learned[4]
    # the side a story is shown on carries no meaning: swapping the votes mirrors P(A)
    assert np.allclose(prob_a(model, np.where(matrix == ABSTAIN, ABSTAIN, 1 - matrix)), 1 - p_a, atol=1e-6)


@pytest.mark.parametrize("params, message", [
    ({"thresh": 0.8}, "Unknown weak parameter"),
    ({"base": 1}, "Unknown weak parameter"),
    ({"threshold": 0.4}, "threshold must be in"),
    ({"threshold": "high"}, "threshold must be a number"),
    ({"max_steps": 0}, "max_steps must be between"),
    ({"preset": "huge"}, "preset must be one of"),
    ({"seed": -1}, "seed must be between"),
])
def test_weak_params_reject_bad_values_clearly(params, message):
    with pytest.raises(ValueError, match=message):
        WeakParams.from_dict(params)


def test_weak_params_defaults_and_presets():
    assert WeakParams.from_dict(None) == WeakParams()
    assert WeakParams.from_dict({"preset": "full"}).max_steps > WeakParams().max_steps
    assert WeakParams.from_dict({"preset": "full", "max_steps": 7, "threshold": 0.9}).max_steps == 7


# --- a pool with a known preference ---------------------------------------------------------

def _pool(store: Store, n_prompts: int, voted: int, seed: int = 0) -> tuple[int, int]:
    """Two policies' stories for n prompts: one writes good stories, the other short,
    looping or cut-off ones (side shuffled). People vote for the good one on the first
    `voted` prompts."""
    db = store.db
    rng = random.Random(seed)
    good_model = models.add_model(db, "good", "local", path="/m/good").id
    bad_model = models.add_model(db, "bad", "local", path="/m/bad").id
    rater = annotators.sign_in(db, "rater", "annotator")["id"]
    bad_stories = (LOOPING, "Pip sneezed a bubble and then the", GIBBERISH, SAD_END)
    for i in range(n_prompts):
        text = f'Write a story about a dragon number {i}. Use the words "bubble" and "birthday".'
        prompts.add_prompts(db, [text], source="user")
        prompt_id = db.execute("SELECT id FROM prompts WHERE text = ?", [text]).fetchone()[0]
        sides = [(good_model, GOOD.replace("Pip", f"Pip{i}")), (bad_model, rng.choice(bad_stories))]
        rng.shuffle(sides)
        ids = [(m, completions.add_completion(db, prompt_id, m, t)) for m, t in sides]
        if i < voted:
            (ma, ca), (mb, cb) = ids
            pair = ShownPair(prompt_id, ca, cb, ma, mb, time.time())
            votes.record_vote(db, pair, annotator_id=rater, choice="a" if ma == good_model else "b",
                              client_key=f"k{i}")
    return good_model, bad_model


def test_weak_votes_never_reach_the_leaderboard_and_replace_each_other(tmp_path):
    settings = tiny_settings(tmp_path / "data")
    store = settings.store()
    db = store.db
    good_model, _ = _pool(store, n_prompts=12, voted=4)
    before = (votes.policy_pair_stats(db), votes.human_comparisons(db), votes.human_vote_total(db),
              votes.votes_per_annotator(db),
              [(r["policy"], r["wins"], r["losses"]) for r in standings(store)])

    for _ in range(2):  # a second labelling replaces the first
        job = run_inline(settings, "weak", {})
        assert job["status"] == "succeeded", job["error"]
        count = db.execute("SELECT count(*) FROM votes WHERE source = 'weak'").fetchone()[0]
        assert count == job["metrics"]["weak_labels"] == 8  # every unvoted pair, none of the voted
    assert db.execute("SELECT count(*) FROM votes WHERE source = 'weak' AND annotator_id IS NOT NULL"
                      " OR source = 'weak' AND confidence < 0.7").fetchone()[0] == 0
    # the label model picked the good story on every unvoted pair
    assert db.execute("SELECT count(*) FROM votes WHERE source = 'weak' AND"
                      " ((choice = 'a' AND model_a != ?) OR (choice = 'b' AND model_b != ?))",
                      [good_model, good_model]).fetchone()[0] == 0
    after = (votes.policy_pair_stats(db), votes.human_comparisons(db), votes.human_vote_total(db),
              votes.votes_per_annotator(db),
             [(r["policy"], r["wins"], r["losses"]) for r in standings(store)])
    assert after == before
    assert {r["source"]: r["votes"] for r in votes.votes_per_source(db)} == {"human": 4, "weak": 8}

    # a job re-run after it stored its labels (killed before finishing) labels nothing again
    stored = db.execute("SELECT id FROM votes WHERE source = 'weak' ORDER BY id").fetchall()
    from rlhf.jobs import execute
    from storage import jobs as job_rows

    job_rows.update_job(db, job["id"], status="running")
    assert execute(settings, job["id"])["metrics"] == job["metrics"]
    assert db.execute("SELECT id FROM votes WHERE source = 'weak' ORDER BY id").fetchall() == stored

    # a weak pair people vote on later is theirs alone: no longer weak training data
    pair = weak.pool_pairs(db)[-1]
    assert not pair["human_voted"]
    assert len(weak.weak_votes_clear_of_humans(db, 0.7)) == 8
    shown = ShownPair(pair["prompt_id"], pair["completion_b"], pair["completion_a"], pair["model_b"],
                      pair["model_a"], time.time())
    votes.record_vote(db, shown, annotator_id=None, choice="a", client_key="late")
    assert len(weak.weak_votes_clear_of_humans(db, 0.7)) == 7
    assert len(weak.weak_votes_clear_of_humans(db, 1.01)) == 0
    # deleting weak votes (a new labelling) leaves the human pair statistics alone
    weak.replace_weak_votes(db, [])
    assert votes.human_vote_total(db) == 5
    store.db.conn.close()


def test_label_pool_reports_lf_and_label_model_accuracy_against_people(tmp_path):
    store = Store(tmp_path / "arena.db")
    _pool(store, n_prompts=10, voted=6)
    report = label_pool(store, WeakParams()).report
    assert (report["pool_pairs"], report["unvoted_pairs"], report["human_pairs"]) == (10, 4, 6)
    assert report["coverage"] == 1.0 and report["label_model_accuracy"] == 1.0
    assert report["label_model_coverage"] == 1.0 and report["human_pairs_above_threshold"] == 6
    assert report["weak_labels"] == 4
    by_name = {row["lf"]: row for row in report["lfs"]}
    assert list(by_name) == list(LF_NAMES)
    assert by_name["required_words"]["coverage"] > 0 and by_name["required_words"]["accuracy"] == 1.0
    for row in report["lfs"]:
        assert row["coverage"] is not None and 0 <= row["coverage"] <= 1
        assert row["accuracy"] is None or 0 <= row["accuracy"] <= 1
        assert (row["accuracy"] is None) == (row["human_pairs"] == 0)
    store.db.conn.close()


def test_empty_pool_is_a_clear_error(tmp_path):
    store = Store(tmp_path / "arena.db")
    with pytest.raises(ValueError, match="stories from two policies"):
        label_pool(store, WeakParams())
    store.db.conn.close()


# --- the CLI ----------------------------------------------------------------------------

def test_cli_train_weak_json_reports_a_job_without_a_model(tmp_path, capfd, monkeypatch):
    from rlhf.__main__ import main
    from rlhf.settings import ENV_VARS

    for name in ENV_VARS.values():
        monkeypatch.delenv(name, raising=False)
    settings = tiny_settings(tmp_path / "data")
    store = settings.store()
    _pool(store, n_prompts=8, voted=3)
    capfd.readouterr()
    code = main(["train", "weak", "--data-dir", str(settings.data_dir), "--json", "--set", "threshold=0.8"])
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    result = json.loads(out)  # the whole of stdout is one JSON document
    assert (result["kind"], result["status"], result["error"], result["model_id"]) == ("weak", "succeeded", None, None)
    metrics = result["metrics"]
    assert metrics["weak_labels"] == 5 and metrics["coverage"] == 1.0
    assert metrics["label_model_accuracy"] == 1.0 and metrics["params"]["threshold"] == 0.8
    assert len(metrics["lfs"]) == len(LF_NAMES)

    code = main(["train", "weak", "--data-dir", str(settings.data_dir), "--json", "--set", "threshold=0.2"])
    out, _ = capfd.readouterr()
    assert code == 1 and "threshold must be in" in json.loads(out)["error"]
    store.db.conn.close()


# --- the reward job with weak labels -------------------------------------------------------

def test_weak_training_pairs_sample_by_weight_and_skip_human_pairs(tmp_path):
    store = Store(tmp_path / "arena.db")
    _pool(store, n_prompts=40, voted=10)
    labelling = label_pool(store, WeakParams())
    from rlhf.weak import store_weak_labels

    assert store_weak_labels(store, labelling, 0.7) == 30
    everything = weak_training_pairs(store, 0.7, 1.0)
    assert len(everything) == 30 and all(r["source"] == "weak" for r in everything)
    assert all(r["chosen"].startswith("Once upon a time a little dragon named Pip") for r in everything)
    half = weak_training_pairs(store, 0.7, 0.5)
    assert 5 <= len(half) <= 25 and half == weak_training_pairs(store, 0.7, 0.5)  # seeded
    assert weak_training_pairs(store, 1.0, 1.0) == []
    store.db.conn.close()


def test_reward_job_adds_weak_pairs_to_training_only(arena_dir):
    settings, store = arena_dir
    _pool(store, n_prompts=30, voted=10)
    params = {"backbone": "minilm", "max_steps": 2, "batch_size": 4, "max_length": 48, "min_pairs": 4,
              "eval_fraction": 0.3, "weak_labels": True}
    refused = run_inline(settings, "reward", params)
    assert refused["status"] == "failed" and "run the weak job first" in refused["error"]

    assert run_inline(settings, "weak", {})["status"] == "succeeded"
    job = run_inline(settings, "reward", {**params, "weak_weight": 0.5})
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    weak_total = len(weak.weak_votes_clear_of_humans(store.db, 0.8))
    assert weak_total >= 20 and 0 < m["weak_pairs_used"] < weak_total
    assert m["params"]["weak_labels"] is True and m["params"]["weak_weight"] == 0.5
    # the held-out report and the training pair count are of human votes only
    assert m["votes_used"] == 10 and m["train_pairs"] + m["heldout"]["pairs"] == 10

    from rlhf.reward import RewardParams

    for bad, message in [({"weak_labels": "yes"}, "weak_labels must be true or false"),
                         ({"weak_threshold": 0.3}, "weak_threshold must be in"),
                         ({"weak_weight": 0}, "weak_weight must be in"),
                         ({"weak_weight": 2}, "weak_weight must be in")]:
        with pytest.raises(ValueError, match=message):
            RewardParams.from_dict(bad)


# --- the Data tab -------------------------------------------------------------------------

def test_data_tab_weak_analysis_is_for_researchers_only(tmp_path):
    import gradio as gr

    from ui.data import WEAK_COLUMNS, build_data_tab

    settings = tiny_settings(tmp_path / "data")
    store = settings.store()
    _pool(store, n_prompts=6, voted=2)
    with gr.Blocks() as demo:
        build_data_tab(settings, store, gr.State(None))
    analysis = next(f.fn for f in demo.fns.values() if f.api_name == "weak_analysis")
    for who in (None, {"id": 1, "name": "ann", "role": "annotator"}):
        with pytest.raises(gr.Error, match="researcher role|Sign in"):
            analysis(who)
    summary, table = analysis({"id": 2, "name": "rita", "role": "researcher"})
    assert "**6** pool pairs (4 without human votes)" in summary and "accuracy **100%**" in summary
    assert list(table.columns) == WEAK_COLUMNS and list(table["lf"]) == list(LF_NAMES)
    store.db.conn.close()
