"""Annotator quality: minimum time on a pair, gold pairs, gold accuracy and agreement, and
exclusion from training data and the leaderboard, checked with simulated annotators of
known accuracy voting through rlhf.arena on a store built for the purpose."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import pytest

from rlhf import arena, quality
from rlhf.__main__ import main as cli
from rlhf.arena import ArenaError
from rlhf.export import preference_records
from rlhf.leaderboard import standings
from rlhf.simulate import Annotator, Oracle
from storage import completions, models, prompts, votes
from storage import quality as quality_rows
from storage.db import Store
from tests.conftest import tiny_settings
from tests.test_simulate import CUT_OFF, GOOD, LOOPING

PROMPTS = 80
STORIES = {"good": GOOD, "loopy": LOOPING, "cut-off": CUT_OFF}
CAREFUL = [Annotator(f"careful-{i}", accuracy=0.95) for i in range(3)]
SLOPPY = Annotator("sloppy", accuracy=0.55)
ALWAYS_A = Annotator("always-a", position_bias=1.0)  # sides are randomized: A is a coin flip
ROUNDS = 150


def build_pool(store) -> dict[str, int]:
    """Three policies whose stories the oracle ranks good > cut-off > loopy on every prompt."""
    ids = {name: models.add_model(store.db, name, "local", path=f"/nowhere/{name}").id for name in STORIES}
    texts = [f'Write a story about a fox. Use the words "moon" and "river". (#{i})' for i in range(PROMPTS)]
    prompts.add_prompts(store.db, texts)
    for row in prompts.list_prompts(store.db):
        for name, story in STORIES.items():
            completions.add_completion(store.db, row["id"], ids[name], story)
    return ids


def settings_for(tmp_path, **overrides):
    return tiny_settings(tmp_path, **{"gold_rate": 0.5, "min_gold_accuracy": 0.8, "min_gold_votes": 10, **overrides})


def vote_as(store, settings, annotator: Annotator, annotator_id: int, pair_rng, choice_rng, oracle) -> bool:
    view = arena.next_pair(store, annotator_id, pair_rng, gold_rate=settings.gold_rate)
    if view is None:
        return False
    choice = annotator.choose(oracle, view.prompt, view.story_a, view.story_b, choice_rng)
    arena.submit_vote(store, settings, annotator_id, view, choice)
    return True


@pytest.fixture(scope="module")
def crowd_dir(tmp_path_factory):
    """Three careful annotators (95% as the oracle), a sloppy one (55%) and one who always picks A,
    gold pairs mixed in."""
    data_dir = tmp_path_factory.mktemp("crowd")
    settings, store = settings_for(data_dir), Store(data_dir / "arena.db")
    build_pool(store)
    for row in prompts.list_prompts(store.db):
        quality.add_gold_pair(store, row["id"], "good", "loopy")
    oracle = Oracle()
    people = [*CAREFUL, SLOPPY, ALWAYS_A]
    ids = {a.name: arena.sign_in(store, settings, a.name)["id"] for a in people}
    pair_rng = random.Random(1)
    choice_rngs = {a.name: random.Random(100 + i) for i, a in enumerate(people)}
    for _ in range(ROUNDS):
        for person in people:
            vote_as(store, settings, person, ids[person.name], pair_rng, choice_rngs[person.name], oracle)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.db.conn.close()
    return data_dir, ids


@pytest.fixture
def crowd(crowd_dir, tmp_path):
    """A private copy of the crowd's votes: (settings, store, annotator ids by name)."""
    data_dir, ids = crowd_dir
    shutil.copy(data_dir / "arena.db", tmp_path / "arena.db")
    store = Store(tmp_path / "arena.db")
    yield settings_for(tmp_path), store, ids
    store.db.conn.close()


def test_gold_accuracy_and_agreement_separate_careful_from_sloppy(crowd):
    settings, store, ids = crowd
    rows = {r["annotator"]: r for r in quality.report(store, settings)}
    careful, sloppy, always_a = [rows[a.name] for a in CAREFUL], rows[SLOPPY.name], rows[ALWAYS_A.name]
    for row in [*careful, sloppy, always_a]:
        assert row["gold_votes"] >= 20 and row["shared_pairs"] >= 20, row
    assert min(r["gold_accuracy"] for r in careful) >= 0.8
    assert sloppy["gold_accuracy"] <= 0.75 and always_a["gold_accuracy"] <= 0.75
    assert min(r["kappa"] for r in careful) > max(sloppy["kappa"], always_a["kappa"]) + 0.15
    assert abs(always_a["kappa"]) < 0.25
    assert sorted(name for name, r in rows.items() if r["below_threshold"]) == [ALWAYS_A.name, SLOPPY.name]


def test_gold_votes_stay_out_of_pair_statistics_leaderboard_and_training(crowd):
    settings, store, ids = crowd
    db = store.db
    gold_ids = {r[0] for r in db.execute("SELECT id FROM votes WHERE source = 'gold'").fetchall()}
    human = db.execute("SELECT count(*) FROM votes WHERE source = 'human'").fetchone()[0]
    assert gold_ids and human
    assert db.execute("SELECT count(*) FROM votes WHERE source = 'gold' AND gold_id IS NULL").fetchone()[0] == 0
    assert votes.human_vote_total(db) == human
    assert sum(r["n"] for r in votes.human_comparisons(db)) == human
    exported = {r["vote_id"] for r in preference_records(store, include_undecided=True)}
    assert len(exported) == human and not exported & gold_ids


def test_excluding_the_flagged_annotators_removes_their_votes_from_training_and_leaderboard(crowd):
    settings, store, ids = crowd
    db = store.db
    flagged = [SLOPPY.name, ALWAYS_A.name]
    flagged_votes = {r[0] for r in db.execute(
        "SELECT id FROM votes WHERE annotator_id IN (?, ?) AND source = 'human'", [ids[n] for n in flagged]).fetchall()}
    before = {r["vote_id"] for r in preference_records(store, include_undecided=True)}
    board_before = sum(r["votes"] for r in standings(store))
    kappa_before = {r["annotator"]: r["kappa"] for r in quality.report(store, settings)}
    # A weak label has no annotator: excluding someone must not drop it.
    pair = votes.find_unseen_pair(db, 0, 1, 2)  # annotator 0 does not exist: every pair is unseen
    weak = votes.ShownPair(pair["prompt_id"], pair["completion_x"], pair["completion_y"], 1, 2, 0.0)
    weak_id, _ = votes.record_vote(db, weak, annotator_id=None, choice="a", client_key="weak", source="weak",
                                   confidence=0.9)
    assert flagged_votes and flagged_votes <= before

    assert quality.exclude_below_threshold(store, settings) == flagged
    after = {r["vote_id"] for r in preference_records(store, include_undecided=True)}
    assert after == before - flagged_votes
    assert weak_id in {r["vote_id"] for r in preference_records(store, sources=("weak",))}
    assert sum(r["votes"] for r in standings(store)) < board_before
    assert sum(r["n"] for r in votes.human_comparisons(db)) == len(before) - len(flagged_votes)
    rows = {r["annotator"]: r for r in quality.report(store, settings)}
    assert rows[SLOPPY.name]["excluded"] and "gold accuracy below 80%" in rows[SLOPPY.name]["excluded_reason"]
    # Excluded annotators do not shape the others' majority: careful ones agree more.
    assert all(rows[a.name]["kappa"] > max(0.55, kappa_before[a.name]) for a in CAREFUL)

    quality.set_excluded(store, SLOPPY.name, excluded=False)
    quality.set_excluded(store, ALWAYS_A.name, excluded=False)
    assert {r["vote_id"] for r in preference_records(store, include_undecided=True)} == before
    assert quality.exclude_below_threshold(store, settings_for(store.path.parent, min_gold_votes=10_000)) == []


def test_a_vote_faster_than_the_minimum_is_refused_and_not_stored(store, tmp_path):
    settings = settings_for(tmp_path, min_vote_seconds=2.0, gold_rate=0.0)
    build_pool(store)
    ann = arena.sign_in(store, settings, "quick")["id"]
    view = arena.next_pair(store, ann)
    with pytest.raises(ArenaError, match="read both stories first: votes count from 2 s"):
        arena.submit_vote(store, settings, ann, view, "a")
    assert arena.vote_count(store, ann) == 0
    read = dataclasses.replace(view, pair=dataclasses.replace(view.pair, shown_at=view.pair.shown_at - 2.5))
    vote_id, new = arena.submit_vote(store, settings, ann, read, "a")
    assert new and arena.vote_count(store, ann) == 1
    off = settings_for(tmp_path, min_vote_seconds=0.0)
    assert arena.submit_vote(store, off, ann, arena.next_pair(store, ann), "b")[1]


def test_gold_pairs_are_served_unseen_and_undo_keeps_them_gold(store, tmp_path):
    settings = settings_for(tmp_path, gold_rate=1.0)
    build_pool(store)
    first_prompt = prompts.list_prompts(store.db)[0]["id"]
    gold_id = quality.add_gold_pair(store, first_prompt, "good", "loopy")
    ann = arena.sign_in(store, settings, "gina")["id"]
    view = arena.next_pair(store, ann, gold_rate=1.0)
    assert view.pair.gold_id == gold_id and {view.name_a, view.name_b} == {"good", "loopy"}
    vote_id, _ = arena.submit_vote(store, settings, ann, view, "a")
    assert store.db["votes"].get(vote_id)["source"] == "gold" and votes.human_vote_total(store.db) == 0
    restored = arena.undo_vote(store, settings, ann, vote_id)
    assert restored.pair.gold_id == gold_id
    arena.submit_vote(store, settings, ann, restored, "b")
    assert arena.next_pair(store, ann, gold_rate=1.0).pair.gold_id is None  # the only gold pair is seen
    assert arena.next_pair(store, arena.sign_in(store, settings, "hal")["id"]).pair.gold_id is None  # rate 0
    listed = quality_rows.list_gold_pairs(store.db)
    assert ([(g["id"], g["better_policy"], g["worse_policy"], g["votes"]) for g in listed]
            == [(gold_id, "good", "loopy", 1)])


def test_gold_pairs_are_checked(store, tmp_path):
    build_pool(store)
    first, second = (p["id"] for p in prompts.list_prompts(store.db)[:2])
    with pytest.raises(LookupError, match="No policy named 'nobody'"):
        quality.add_gold_pair(store, first, "nobody", "loopy")
    with pytest.raises(ValueError, match="two different stories"):
        quality.add_gold_pair(store, first, "good", "good")
    story = {c["model_id"]: c["id"] for c in completions.completions_for_prompt(store.db, second)}
    other = completions.completions_for_prompt(store.db, first)[0]["id"]
    with pytest.raises(ValueError, match="same prompt"):
        quality_rows.add_gold_pair(store.db, story[1], other)
    quality.add_gold_pair(store, first, "good", "loopy")
    with pytest.raises(ValueError, match="already gold pair"):
        quality.add_gold_pair(store, first, "2", "1")  # ids work as well as names
    with pytest.raises(ValueError, match="source 'gold'"):
        votes.record_vote(store.db, arena.next_pair(store, 1, gold_rate=0.0).pair, annotator_id=None,
                          choice="a", client_key="x", source="gold")


def test_cli_gold_and_quality(store, capsys):
    data_dir = store.path.parent
    build_pool(store)
    arena.sign_in(store, tiny_settings(data_dir), "sam")
    prompt_id = prompts.list_prompts(store.db)[0]["id"]

    def run(*args: str) -> dict:
        code = cli([*args, "--data-dir", str(data_dir), "--json"])
        document = json.loads(capsys.readouterr().out)
        return {"code": code, **document}

    added = run("gold", "add", "--prompt", str(prompt_id), "--better", "good", "--worse", "loopy")
    assert added["code"] == 0 and added["gold_pair"]["better_policy"] == "good"
    assert [g["id"] for g in run("gold", "list")["gold_pairs"]] == [added["gold_pair"]["id"]]
    assert run("gold", "add", "--prompt", str(prompt_id), "--better", "good", "--worse", "nobody")["code"] == 2
    excluded = run("quality", "--exclude", "sam")
    assert (excluded["code"] == 0
            and [r["excluded"] for r in excluded["annotators"] if r["annotator"] == "sam"] == [True])
    assert [r["excluded"] for r in run("quality", "--include", "sam")["annotators"]] == [False]
