"""Rounds (rlhf.rounds): the trigger, the acceptance rule, restarts, failing steps, recipe
checks and the CLI, on copies of the tiny prepared arena.

Most tests drive a round's step jobs by hand (a job ends as the job runner would end it:
its models registered and its results recorded), so the state machine is tested in
milliseconds; one test runs the real reward and RAFT jobs of a round on the tiny starter.
"""

from __future__ import annotations

import itertools
import json
import time

import pytest

from bench.app_server import wait_for
from rlhf import jobs, rounds
from storage import completions, models, prompts, votes
from storage import jobs as job_rows
from storage import rounds as round_rows
from storage.db import Store
from tests.test_cli import cli_main  # noqa: F401
from tests.test_jobs import worker, worker_env  # noqa: F401

_keys = itertools.count()


def starters(store) -> tuple[int, int]:
    first, second = (m.id for m in models.list_models(store.db) if m.kind == "starter")
    return first, second


def cast(store, winner: int, loser: int, n: int, choice: str | None = None) -> None:
    """n human votes between two policies, one per prompt in turn, for `winner` (or `choice`
    for all of them: tie, both_bad); the winner's story is side A on odd votes, B on even."""
    db = store.db
    shared = [p["id"] for p in prompts.list_prompts(db)
              if {winner, loser} <= {c["model_id"] for c in completions.completions_for_prompt(db, p["id"])}]
    for i in range(n):
        prompt_id = shared[i % len(shared)]
        story = {c["model_id"]: c["id"] for c in completions.completions_for_prompt(db, prompt_id)}
        sides = [(winner, story[winner]), (loser, story[loser])][:: 1 if i % 2 else -1]
        pair = votes.ShownPair(prompt_id, sides[0][1], sides[1][1], sides[0][0], sides[1][0], time.time())
        won = "a" if sides[0][0] == winner else "b"
        votes.record_vote(db, pair, annotator_id=None, choice=choice or won, client_key=f"round-test-{next(_keys)}")


def finish_step(store, job_id: int, kind: str, parent: int) -> int:
    """End a step job as the runner does: its model registered (a policy with the parent's
    stories for a policy kind), its results recorded, the job succeeded."""
    db = store.db
    base = models.get_model(db, parent)
    record = models.add_model(db, f"{kind}-job{job_id}", kind, path=base.path, parent_id=parent, job_id=job_id,
                              active=kind != "reward",
                              metrics={"heldout": {"accuracy": 0.75, "ci95": [0.5, 0.9], "prompts": 2,
                                                   "best_baseline": {"name": "longer story wins", "accuracy": 0.5}}})
    if kind != "reward":
        for prompt in prompts.list_prompts(db):
            for story in completions.completions_for_prompt(db, prompt["id"]):
                if story["model_id"] == parent:
                    completions.add_completion(db, prompt["id"], record.id, story["text"] + " The end.")
    job_rows.record_results(db, job_id, [record.id], {"votes_used": 7, "data_hash": "abc123"})
    job_rows.finish_job(db, job_id, "succeeded", result_model_id=record.id)
    return record.id


def to_collecting(store, parent: int) -> tuple[dict, int]:
    """Start a round and end its reward and raft steps; (the round, its child)."""
    started = rounds.start_round(store)
    rounds.tick(store)
    reward_job = round_rows.get_round(store.db, started["id"])["job_ids"][0]
    assert job_rows.get_job(store.db, reward_job)["kind"] == "reward"
    finish_step(store, reward_job, "reward", parent)
    rounds.tick(store)
    current = round_rows.get_round(store.db, started["id"])
    raft_job = job_rows.get_job(store.db, current["job_ids"][1])
    assert raft_job["kind"] == "raft" and raft_job["params"]["base"] == parent
    assert raft_job["params"]["reward_model"] == current["reward_model_id"]
    child = finish_step(store, raft_job["id"], "raft", parent)
    rounds.tick(store)
    current = round_rows.get_round(store.db, started["id"])
    assert current["status"] == "collecting" and current["child_ids"] == [child]
    assert (current["votes_used"], current["votes_hash"]) == (7, "abc123")
    return current, child


def test_the_vote_trigger_fires_at_n_new_decided_votes_and_not_before(arena_dir):
    settings, store = arena_dir
    first, second = starters(store)
    rounds.set_recipe(store, {"every_votes": 3})
    cast(store, first, second, 2)
    cast(store, first, second, 2, choice="tie")  # ties and both-bad votes decide nothing
    cast(store, first, second, 1, choice="both_bad")
    assert rounds.tick(store) is None and round_rows.list_rounds(store.db) == []
    cast(store, second, first, 1)
    started = rounds.tick(store)
    assert started["status"] == "training" and started["trigger"] == "3 new votes"
    assert started["parent_id"] == first  # the first starter is the first champion
    assert job_rows.get_job(store.db, started["job_ids"][0])["kind"] == "reward"
    # One round at a time, and the next count starts from this round's start.
    cast(store, first, second, 3)
    rounds.cancel_round(store, started["id"])
    assert job_rows.get_job(store.db, started["job_ids"][0])["status"] == "cancelled"
    assert rounds.trigger_fired(store, rounds.current_recipe(store)) == "3 new votes"
    rounds.tick(store)
    assert len(round_rows.list_rounds(store.db)) == 2
    assert rounds.trigger_fired(store, rounds.current_recipe(store)) is None


def test_the_schedule_trigger_and_on_demand_only(arena_dir):
    settings, store = arena_dir
    rounds.set_recipe(store, {})
    assert rounds.current_recipe(store).trigger == "on demand"
    store.db.execute("UPDATE round_recipe SET set_at = set_at - 3600")
    assert rounds.tick(store) is None  # on demand: never by itself
    rounds.set_recipe(store, {"schedule_minutes": 30})
    assert rounds.tick(store) is None
    store.db.execute("UPDATE round_recipe SET set_at = set_at - 1801")
    assert rounds.tick(store)["trigger"] == "schedule"


def test_a_child_that_beats_its_parent_is_promoted_and_becomes_the_champion(arena_dir):
    settings, store = arena_dir
    first, second = starters(store)
    rounds.set_recipe(store, {"min_votes": 10})
    current, child = to_collecting(store, first)
    cast(store, child, first, 9)
    cast(store, child, second, 5)  # votes against another policy do not count
    assert rounds.tick(store)["status"] == "collecting"  # 9 of 10 votes: not judged yet
    cast(store, child, first, 1)
    assert rounds.tick(store) is None
    decided = round_rows.get_round(store.db, current["id"])
    assert decided["status"] == "decided" and decided["promoted_id"] == child
    result = decided["results"][str(child)]
    assert result["votes"] == 10 and result["decision"] == "promoted" and result["ci95"][0] > 0.5
    assert rounds.champion(store) == child and models.get_model(store.db, child).active
    assert rounds.start_round(store)["parent_id"] == child  # the next round starts from it


def test_a_child_that_does_not_clear_half_is_retired_at_the_vote_cap(arena_dir):
    settings, store = arena_dir
    first, _ = starters(store)
    rounds.set_recipe(store, {"min_votes": 10, "max_votes": 20})
    current, child = to_collecting(store, first)
    cast(store, child, first, 6)
    cast(store, first, child, 4)
    rounds.tick(store)  # 6 of 10 won: the interval holds 0.5, so it waits for the cap
    assert round_rows.get_round(store.db, current["id"])["status"] == "collecting"
    cast(store, child, first, 5)
    cast(store, first, child, 5)
    rounds.tick(store)
    decided = round_rows.get_round(store.db, current["id"])
    assert decided["status"] == "decided" and decided["promoted_id"] is None
    assert decided["results"][str(child)]["decision"] == "retired" and decided["results"][str(child)]["votes"] == 20
    assert not models.get_model(store.db, child).active and rounds.champion(store) == first


def test_a_restart_mid_round_neither_loses_the_round_nor_promotes_twice(arena_dir):
    settings, store = arena_dir
    first, _ = starters(store)
    rounds.set_recipe(store, {"min_votes": 5})
    current, child = to_collecting(store, first)
    cast(store, child, first, 5)
    # The app restarts: a new store and worker on the same file find the round and decide it once.
    restarted = Store(settings.db_path)
    jobs.JobWorker(settings).recover()
    assert round_rows.get_round(restarted.db, current["id"])["status"] == "collecting"
    rounds.tick(restarted)
    rounds.tick(store)
    assert not round_rows.decide(store.db, current["id"], retire=[child], promoted_id=None)  # already decided
    decided = round_rows.get_round(store.db, current["id"])
    assert decided["status"] == "decided" and decided["promoted_id"] == child
    assert models.get_model(store.db, child).active
    assert [r["promoted_id"] for r in round_rows.list_rounds(store.db)] == [child]

    # A restart while a step job runs: the job is interrupted, the round ends as failed, kept.
    second_round = rounds.start_round(store)
    rounds.tick(store)
    job_rows.claim_next_job(store.db, {"reward"})
    jobs.JobWorker(settings).recover()
    rounds.tick(Store(settings.db_path))
    failed = round_rows.get_round(store.db, second_round["id"])
    assert failed["status"] == "failed" and "interrupted" in failed["reason"] and failed["promoted_id"] is None
    assert rounds.champion(store) == child


def test_a_failing_step_ends_the_round_with_nothing_promoted(arena_dir):
    settings, store = arena_dir
    first, _ = starters(store)
    rounds.set_recipe(store, {"steps": ["raft", "dpo"]})
    started = rounds.start_round(store)
    rounds.tick(store)
    reward_job = round_rows.get_round(store.db, started["id"])["job_ids"][0]
    finish_step(store, reward_job, "reward", first)
    rounds.tick(store)
    raft_job = round_rows.get_round(store.db, started["id"])["job_ids"][1]
    job_rows.finish_job(store.db, raft_job, "failed", error="ValueError: out of stories")
    rounds.tick(store)
    rounds.tick(store)
    failed = round_rows.get_round(store.db, started["id"])
    assert failed["status"] == "failed" and failed["promoted_id"] is None and failed["child_ids"] == []
    assert "raft step" in failed["reason"] and "out of stories" in failed["reason"]
    assert len(failed["job_ids"]) == 2  # the dpo step was never queued
    assert rounds.champion(store) == first
    assert [j["kind"] for j in job_rows.list_jobs(store.db) if j["kind"] == "dpo"] == []


@pytest.mark.parametrize(("values", "field"), [
    ({"every_votes": 0}, "every_votes"),
    ({"every_votes": 5, "schedule_minutes": 10}, "schedule_minutes"),
    ({"steps": ["ppo"]}, "steps"),
    ({"steps": []}, "steps"),
    ({"min_votes": 20, "max_votes": 10}, "max_votes"),
    ({"step_params": {"raft": {"k": 1}}}, "step_params.raft: k"),
    ({"step_params": {"raft": {"base": 1}}}, "step_params.raft.base"),
    ({"step_params": {"dpo": {"beta": 0.1}}}, "step_params.dpo"),
    ({"step_params": {"reward": {"nonsense": 1}}}, "nonsense"),
    ({"starting_policy": 999}, "starting_policy"),
    ({"trigger": "now"}, "trigger"),
])
def test_recipe_errors_name_the_field(arena_dir, values, field):
    settings, store = arena_dir
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        rounds.set_recipe(store, values)
    assert round_rows.get_recipe(store.db) is None


def test_the_cli_sets_lists_starts_and_cancels_rounds(arena_dir, cli_main):  # noqa: F811
    settings, store = arena_dir
    data = ["--data-dir", str(settings.data_dir), "--starter", "tiny"]
    code, out, err = cli_main("rounds", "set", "--json", *data, "--every-votes", "5", "--steps", "raft,dpo",
                              "--min-votes", "12", "--set", "raft.k=3", "--set", "reward.max_steps=4")
    assert code == 0, err
    recipe = json.loads(out)["recipe"]
    assert recipe["version"] == 1 and recipe["recipe"]["steps"] == ["raft", "dpo"]
    assert recipe["recipe"]["step_params"] == {"raft": {"k": 3}, "reward": {"max_steps": 4}}
    assert rounds.current_recipe(store).every_votes == 5

    code, out, _ = cli_main("rounds", "start", "--json", *data)
    assert code == 0
    round_id = json.loads(out)["round"]["id"]
    rounds.tick(store)
    code, out, _ = cli_main("rounds", "list", "--json", *data)
    listed = json.loads(out)
    assert listed["champion"] == starters(store)[0] and listed["recipe"]["recipe"]["min_votes"] == 12
    (shown,) = listed["rounds"]
    assert shown["id"] == round_id and shown["status"] == "training" and shown["jobs"][0]["step"] == "reward"
    assert job_rows.get_job(store.db, shown["jobs"][0]["job_id"])["params"]["max_steps"] == 4

    code, out, _ = cli_main("rounds", "cancel", str(round_id), "--json", *data)
    assert code == 0 and json.loads(out)["round"]["status"] == "cancelled"
    code, out, _ = cli_main("rounds", "set", "--json", *data, "--set", "raft.k=1")
    assert code == 2 and "step_params.raft: k" in json.loads(out)["error"]


def test_a_round_runs_its_real_jobs_on_the_tiny_starter(arena_dir):
    """Reward and RAFT jobs, as the worker would run them, then the child's pool and votes."""
    settings, store = arena_dir
    first, second = starters(store)
    cast(store, first, second, 6)
    cast(store, second, first, 2)
    rounds.set_recipe(store, {"min_votes": 3, "step_params": {
        "reward": {"max_steps": 2, "min_pairs": 2, "batch_size": 2, "max_length": 64},
        "raft": {"k": 2, "prompts": 2, "max_steps": 1, "batch_size": 2, "max_new_tokens": 8}}})
    started = rounds.start_round(store)
    for _ in range(6):
        rounds.tick(store)
        job = job_rows.claim_next_job(store.db)
        if job is None:
            break
        assert jobs.execute(settings, job["id"])["status"] == "succeeded", job_rows.get_job(store.db, job["id"])
    current = round_rows.get_round(store.db, started["id"])
    assert current["status"] == "collecting", current
    (child,) = current["child_ids"]
    assert models.get_model(store.db, child).parent_id == first
    assert models.get_model(store.db, current["reward_model_id"]).kind == "reward"
    assert current["votes_used"] == 8 and current["votes_hash"]
    cast(store, first, child, 3)
    rounds.tick(store)
    (shown,) = rounds.rounds_report(store)
    assert shown["status"] == "decided" and shown["children"][0]["decision"] == "retired"
    assert [j["status"] for j in shown["jobs"]] == ["succeeded", "succeeded"]
    history = rounds.champion_history(store)
    assert [p["model_id"] for p in history] == [first, first] and history[0]["ci_low"] < history[0]["ci_high"]


def test_the_rounds_table_escapes_text_and_shows_a_failed_steps_error_to_researchers_only(arena_dir):
    from ui.rounds import RECIPE_FIELDS, recipe_values, rounds_html

    settings, store = arena_dir
    rounds.set_recipe(store, {})
    started = rounds.start_round(store)
    rounds.tick(store)
    job_rows.finish_job(store.db, round_rows.get_round(store.db, started["id"])["job_ids"][0],
                        "failed", error="<script>alert(1)</script> in /srv/secret/path")
    rounds.tick(store)
    researcher = rounds_html(store, {"role": "researcher"})
    assert "&lt;script&gt;" in researcher and "<script>" not in researcher
    annotator = rounds_html(store, {"role": "annotator"})
    assert "/srv/secret/path" not in annotator and "(the error is shown to researchers)" in annotator
    # The form's raw values: left at their defaults they are not sent, the rest are typed.
    form = {"every_votes": "12", "schedule_minutes": "", "steps": ["dpo", "raft"], "step_params": '{"dpo": {}}',
            "min_votes": 50, "max_votes": "", "starting_policy": None}
    assert recipe_values([form[f.name] for f in RECIPE_FIELDS]) == {
        "every_votes": 12, "steps": ["dpo", "raft"], "step_params": {"dpo": {}}}


def test_the_job_worker_starts_rounds_and_a_restart_mid_step_ends_the_round_as_failed(arena_dir, worker):  # noqa: F811
    """The worker's pass ticks the round: N votes start it and its reward job runs; the app
    stopping mid-step interrupts the job, and the next worker ends the round as failed."""
    settings, store = arena_dir
    first, second = starters(store)
    rounds.set_recipe(store, {"every_votes": 2, "step_params": {"reward": {"max_steps": 500, "min_pairs": 2}}})
    worker.start()
    cast(store, first, second, 2)
    wait_for(lambda: (r := round_rows.active_round(store.db)) and r["job_ids"]
             and job_rows.get_job(store.db, r["job_ids"][0])["status"] == "running", 60, "the reward step to run")
    worker.stop()
    restarted = jobs.JobWorker(settings, poll_s=0.1).start()
    try:
        (only,) = round_rows.list_rounds(store.db)
        wait_for(lambda: round_rows.get_round(store.db, only["id"])["status"] == "failed", 30, "the round to fail")
    finally:
        restarted.stop()
    failed = round_rows.get_round(store.db, only["id"])
    assert "reward step" in failed["reason"] and "interrupted" in failed["reason"] and failed["promoted_id"] is None
