"""storage/: schema and migrations, models, prompts, completions, votes, jobs, concurrency."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from storage import annotators, completions, jobs, models, prompts, votes
from storage.db import BUSY_TIMEOUT_MS, Store, connect, write_transaction
from storage.schema import MIGRATIONS
from storage.votes import ShownPair

TABLES = {"annotators", "jobs", "models", "prompts", "completions", "votes", "seen_pairs", "policy_pairs"}


def _policy(db, name: str, **kw) -> models.ModelRecord:
    return models.add_model(db, name, "local", path=f"/models/{name}", **kw)


def _pair(db, prompt_text: str = "A story about a cat.", names=("alpha", "beta")) -> ShownPair:
    """Two policies with a story each on one prompt; shown with the first on the left."""
    ids = []
    for name in names:
        record = models.get_model_by_name(db, name) or _policy(db, name)
        ids.append(record.id)
    prompts.add_prompts(db, [prompt_text])
    prompt_id = db.execute("SELECT id FROM prompts WHERE text = ?", [prompt_text]).fetchone()[0]
    c = [completions.add_completion(db, prompt_id, m, f"story by {m} for {prompt_id}") for m in ids]
    return ShownPair(prompt_id, c[0], c[1], ids[0], ids[1], time.time())


def _swapped(pair: ShownPair) -> ShownPair:
    return ShownPair(pair.prompt_id, pair.completion_b, pair.completion_a, pair.model_b, pair.model_a, pair.shown_at)


def _stats(db) -> dict:
    rows = votes.policy_pair_stats(db)
    assert len(rows) <= 1
    return rows[0] if rows else {"votes": 0, "lo_wins": 0, "hi_wins": 0, "ties": 0, "both_bad": 0}


# --- database, schema, migrations --------------------------------------------------------

def test_opening_applies_every_migration(store):
    db = store.db
    assert TABLES <= set(db.table_names())
    assert [m.name for m in MIGRATIONS.applied(db)] == [m.name for m in MIGRATIONS._migrations]
    assert MIGRATIONS.pending(db) == []
    assert {"votes_pair_stats_insert", "votes_pair_stats_delete"} <= {t.name for t in db.triggers}


def test_opening_twice_is_idempotent_and_keeps_data(store):
    prompts.add_prompts(store.db, ["kept across reopen"])
    applied = [(m.name, m.applied_at) for m in MIGRATIONS.applied(store.db)]
    again = Store(store.path)  # would fail on "table already exists" if migrations re-ran
    assert [(m.name, m.applied_at) for m in MIGRATIONS.applied(again.db)] == applied
    assert prompts.prompt_count(again.db) == 1
    again.db.conn.close()


def test_wal_busy_timeout_and_foreign_keys_on_every_connection(store):
    def pragmas(db):
        return tuple(db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "busy_timeout", "foreign_keys"))

    seen = [(store.db, pragmas(store.db))]

    def in_thread():  # a handler thread gets its own connection with the same pragmas
        db = store.db
        seen.append((db, pragmas(db)))
        db.conn.close()

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen[0][0] is not seen[1][0]
    assert BUSY_TIMEOUT_MS > 0
    for _, values in seen:
        assert values == ("wal", BUSY_TIMEOUT_MS, 1)


def test_same_thread_reuses_its_connection(store):
    assert store.db is store.db


# --- models --------------------------------------------------------------------------------

def test_add_get_and_list_models_with_lineage(store):
    db = store.db
    parent = models.add_model(db, "base", "starter", path="/m/base", decoding={"temperature": 0.7})
    child = models.add_model(db, "base-dpo", "dpo", path="/m/dpo", parent_id=parent.id, metrics={"loss": 0.5})
    hub = models.add_model(db, "from-hub", "hub", hub_id="org/model")
    assert models.get_model(db, child.id) == child
    assert child.parent_id == parent.id and child.metrics == {"loss": 0.5}
    assert parent.decoding == {"temperature": 0.7} and parent.active
    assert parent.source == "/m/base" and hub.source == "org/model"
    assert [m.name for m in models.list_models(db)] == ["base", "base-dpo", "from-hub"]
    assert models.get_model_by_name(db, "from-hub") == hub
    assert models.get_model_by_name(db, "nope") is None


def test_set_active_filters_active_listing(store):
    db = store.db
    a, b = _policy(db, "a"), _policy(db, "b")
    off = models.set_active(db, b.id, False)
    assert off.active is False
    assert [m.id for m in models.list_models(db, active_only=True)] == [a.id]
    assert {m.id for m in models.list_models(db)} == {a.id, b.id}
    assert models.set_active(db, b.id, True).active is True


def test_update_metrics_merges(store):
    db = store.db
    m = _policy(db, "a", metrics={"loss": 1.0, "steps": 10})
    updated = models.update_metrics(db, m.id, {"loss": 0.4, "reward": 2.5})
    assert updated.metrics == {"loss": 0.4, "steps": 10, "reward": 2.5}
    assert models.get_model(db, m.id).metrics == updated.metrics


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "x", "kind": "banana", "path": "/m"}, "kind"),
    ({"name": "x", "kind": "local"}, "path"),
])
def test_add_model_validation(store, kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.add_model(store.db, **kwargs)
    assert models.list_models(store.db) == []


def test_duplicate_policy_name_refused(store):
    _policy(store.db, "same")
    with pytest.raises(ValueError, match="already exists"):
        _policy(store.db, "same")
    assert len(models.list_models(store.db)) == 1


def test_unknown_model_ids_raise_lookup_error(store):
    for call in (lambda: models.get_model(store.db, 42),
                 lambda: models.set_active(store.db, 42, False),
                 lambda: models.update_metrics(store.db, 42, {"a": 1})):
        with pytest.raises(LookupError):
            call()


# --- prompts and completions ------------------------------------------------------------------

def test_add_prompts_counts_only_new_ones(store):
    db = store.db
    assert prompts.add_prompts(db, ["one", "two", "three"]) == 3
    assert prompts.add_prompts(db, ["two", "four", "four"]) == 1
    assert prompts.prompt_count(db) == 4
    assert [p["text"] for p in prompts.list_prompts(db)] == ["one", "two", "three", "four"]
    with pytest.raises(ValueError):
        prompts.add_prompts(db, ["five"], source="martian")
    assert prompts.prompt_count(db) == 4


def test_one_completion_per_prompt_and_policy(store):
    db = store.db
    m = _policy(db, "a")
    prompts.add_prompts(db, ["p1", "p2"])
    first = completions.add_completion(db, 1, m.id, "the first story", tokens=3)
    again = completions.add_completion(db, 1, m.id, "a different story")
    assert again == first
    assert completions.get_completion(db, first)["text"] == "the first story"
    assert completions.pool_sizes(db) == {m.id: 1}
    assert [p["id"] for p in completions.prompts_without_completion(db, m.id)] == [2]
    other = _policy(db, "b")
    assert completions.add_completion(db, 1, other.id, "b's story") != first
    assert [c["model_name"] for c in completions.completions_for_prompt(db, 1)] == ["a", "b"]


def test_completion_stores_whether_the_budget_cut_it(store):
    db = store.db
    m = _policy(db, "a")
    prompts.add_prompts(db, ["p1", "p2", "p3"])
    cut = completions.add_completion(db, 1, m.id, "A cat sat.", tokens=200, truncated=True)
    ended = completions.add_completion(db, 2, m.id, "A dog ran.", tokens=40, truncated=False)
    unknown = completions.add_completion(db, 3, m.id, "An owl hooted.")
    assert [completions.get_completion(db, i)["truncated"] for i in (cut, ended, unknown)] == [1, 0, None]


# --- votes ----------------------------------------------------------------------------------

def test_record_vote_is_idempotent_per_client_key(store):
    db = store.db
    pair = _pair(db)
    ann = annotators.sign_in(db, "ann", "annotator")
    first = votes.record_vote(db, pair, annotator_id=ann["id"], choice="a", client_key="k1")
    second = votes.record_vote(db, pair, annotator_id=ann["id"], choice="b", client_key="k1")
    assert first[1] is True
    assert second == (first[0], False)
    assert db["votes"].count == 1
    assert next(db["votes"].rows)["choice"] == "a"  # the retry did not overwrite the vote
    assert _stats(db)["votes"] == 1
    # Anonymous votes (no annotator) are deduplicated by key as well.
    anon = votes.record_vote(db, pair, annotator_id=None, choice="a", client_key="k2")
    assert votes.record_vote(db, pair, annotator_id=None, choice="a", client_key="k2") == (anon[0], False)
    assert db["votes"].count == 2


def test_record_vote_rejects_unknown_choice_and_source(store):
    db = store.db
    pair = _pair(db)
    with pytest.raises(ValueError):
        votes.record_vote(db, pair, annotator_id=None, choice="c", client_key="k")
    with pytest.raises(ValueError):
        votes.record_vote(db, pair, annotator_id=None, choice="a", client_key="k", source="robot")
    assert db["votes"].count == 0


@pytest.mark.parametrize("flip", [False, True], ids=["lo-left", "hi-left"])
def test_policy_pair_counts_follow_votes_and_undo(store, flip):
    db = store.db
    pair = _pair(db)
    if flip:
        pair = _swapped(pair)
    lo, hi = sorted((pair.model_a, pair.model_b))
    ann = annotators.sign_in(db, "ann", "annotator")
    choices = ["a", "a", "a", "b", "tie", "tie", "both_bad"]
    ids = [votes.record_vote(db, pair, annotator_id=ann["id"], choice=c, client_key=f"k{i}")[0]
           for i, c in enumerate(choices)]

    def expected(choice_list):
        winners = [pair.model_a if c == "a" else pair.model_b for c in choice_list if c in ("a", "b")]
        return {"votes": len(choice_list), "lo_wins": winners.count(lo), "hi_wins": winners.count(hi),
                "ties": choice_list.count("tie"), "both_bad": choice_list.count("both_bad")}

    stats = _stats(db)
    assert (stats["model_lo"], stats["model_hi"]) == (lo, hi)
    assert {k: stats[k] for k in expected(choices)} == expected(choices)
    assert votes.human_vote_total(db) == len(choices)

    # Weak and simulated labels never touch the human pair statistics.
    votes.record_vote(db, pair, annotator_id=None, choice="a", client_key="w", source="weak", confidence=0.9)
    votes.record_vote(db, pair, annotator_id=None, choice="b", client_key="s", source="simulated")
    assert {k: _stats(db)[k] for k in expected(choices)} == expected(choices)

    # Undo each human vote in turn: the counts go back step by step.
    remaining = list(choices)
    for vote_id, choice in zip(ids, choices):
        assert votes.undo_vote(db, vote_id, ann["id"], window_s=30)["choice"] == choice
        remaining.remove(choice)
        stats = _stats(db)
        assert {k: stats[k] for k in expected(remaining)} == expected(remaining)
    assert votes.policy_pair_stats(db) == []
    assert votes.human_vote_total(db) == 0


def test_both_seat_orders_land_on_one_pair_row(store):
    db = store.db
    pair = _pair(db)
    ann = annotators.sign_in(db, "ann", "annotator")
    votes.record_vote(db, pair, annotator_id=ann["id"], choice="a", client_key="1")
    votes.record_vote(db, _swapped(pair), annotator_id=ann["id"], choice="a", client_key="2")
    stats = _stats(db)
    # The same choice letter with the seats swapped is a win for each policy once.
    assert (stats["votes"], stats["lo_wins"], stats["hi_wins"]) == (2, 1, 1)


def test_undo_outside_window_keeps_vote(store):
    db = store.db
    pair = _pair(db)
    ann = annotators.sign_in(db, "ann", "annotator")
    vote_id, _ = votes.record_vote(db, pair, annotator_id=ann["id"], choice="a", client_key="k")
    db.execute("UPDATE votes SET voted_at = voted_at - 60 WHERE id = ?", [vote_id])
    assert votes.undo_vote(db, vote_id, ann["id"], window_s=30) is None
    assert db["votes"].count == 1 and _stats(db)["votes"] == 1
    assert db["seen_pairs"].count == 1
    assert votes.undo_vote(db, vote_id, ann["id"], window_s=120)["id"] == vote_id
    assert db["votes"].count == 0 and db["seen_pairs"].count == 0


def test_undo_of_another_annotators_vote_refused(store):
    db = store.db
    pair = _pair(db)
    ann = annotators.sign_in(db, "ann", "annotator")
    eve = annotators.sign_in(db, "eve", "annotator")
    vote_id, _ = votes.record_vote(db, pair, annotator_id=ann["id"], choice="a", client_key="k")
    assert votes.undo_vote(db, vote_id, eve["id"], window_s=30) is None
    assert db["votes"].count == 1 and _stats(db)["votes"] == 1
    assert votes.annotator_vote_count(db, ann["id"]) == 1


def test_seen_pairs_hide_a_judged_pair_from_that_annotator_only(store):
    db = store.db
    pair = _pair(db)
    ann = annotators.sign_in(db, "ann", "annotator")
    bob = annotators.sign_in(db, "bob", "annotator")
    assert votes.find_unseen_pair(db, ann["id"], pair.model_a, pair.model_b) is not None
    votes.record_vote(db, pair, annotator_id=ann["id"], choice="a", client_key="k")
    assert votes.find_unseen_pair(db, ann["id"], pair.model_a, pair.model_b) is None
    assert votes.find_unseen_pair(db, ann["id"], pair.model_b, pair.model_a) is None
    found = votes.find_unseen_pair(db, bob["id"], pair.model_b, pair.model_a)
    assert found == {"prompt_id": pair.prompt_id, "completion_x": pair.completion_b, "completion_y": pair.completion_a}


# Known bug (reported): storage uses sqlite-utils' db.atomic(), which issues a plain
# (deferred) BEGIN. record_vote / claim_next_job / request_cancel read first and write
# second, so when another connection commits in between, SQLite cannot upgrade the stale
# read snapshot and fails at once with "database is locked" (SQLITE_BUSY_SNAPSHOT; the
# busy timeout does not apply). Fix: open these transactions with BEGIN IMMEDIATE.
# --- jobs -----------------------------------------------------------------------------------

def test_jobs_are_claimed_oldest_first(store):
    db = store.db
    ids = [jobs.create_job(db, "generate", {"n": i}) for i in range(3)]
    assert all(jobs.get_job(db, i)["status"] == "queued" for i in ids)
    claimed = []
    while (job := jobs.claim_next_job(db)) is not None:
        assert job["status"] == "running" and job["started_at"] is not None
        claimed.append(job)
    assert [j["id"] for j in claimed] == ids
    assert [j["params"] for j in claimed] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert {j["id"] for j in jobs.running_jobs(db)} == set(ids)


def test_report_progress_until_cancel_then_finish(store):
    db = store.db
    job_id = jobs.create_job(db, "generate", {})
    jobs.claim_next_job(db)
    assert jobs.report_progress(db, job_id, 0.25, "a quarter") is True
    job = jobs.get_job(db, job_id)
    assert (job["progress"], job["message"]) == (0.25, "a quarter")
    assert jobs.report_progress(db, job_id, 7.0, "x" * 2000) is True
    job = jobs.get_job(db, job_id)
    assert job["progress"] == 1.0 and len(job["message"]) <= 500

    assert jobs.request_cancel(db, job_id) == "cancelling"
    assert jobs.report_progress(db, job_id, 0.5, "still going?") is False
    assert jobs.get_job(db, job_id)["message"] == "cancelling"
    jobs.finish_job(db, job_id, "cancelled", error="cancelled by a researcher")
    job = jobs.get_job(db, job_id)
    assert job["status"] == "cancelled" and job["finished_at"] is not None
    assert jobs.running_jobs(db) == []
    assert jobs.request_cancel(db, job_id) == "cancelled"  # nothing to do any more


def test_finish_job_records_result(store):
    db = store.db
    job_id = jobs.create_job(db, "dpo", {"beta": 0.1})
    jobs.claim_next_job(db)
    m = _policy(db, "trained")
    jobs.finish_job(db, job_id, "succeeded", result_model_id=m.id, metrics={"loss": 0.3})
    job = jobs.get_job(db, job_id)
    assert (job["status"], job["progress"], job["result_model_id"], job["metrics"]) == ("succeeded", 1.0, m.id,
                                                                                        {"loss": 0.3})
    with pytest.raises(ValueError):
        jobs.finish_job(db, job_id, "running")
    with pytest.raises(LookupError):
        jobs.get_job(db, 999)


def test_cancel_of_queued_job_is_immediate(store):
    db = store.db
    first = jobs.create_job(db, "generate", {})
    second = jobs.create_job(db, "generate", {})
    assert jobs.request_cancel(db, first) == "cancelled"
    assert jobs.get_job(db, first)["status"] == "cancelled"
    assert jobs.claim_next_job(db)["id"] == second
    assert jobs.claim_next_job(db) is None


def test_a_lane_claims_only_its_own_kinds(store):
    """The worker's heavy lane claims training kinds; the light lane every other kind."""
    db = store.db
    kinds = ("dpo", "generate", "reward", "publish")
    dpo, generate, reward, publish = (jobs.create_job(db, kind, {}) for kind in kinds)
    training = ("dpo", "reward")
    assert jobs.claim_next_job(db, training, other_kinds=True)["id"] == generate
    assert jobs.claim_next_job(db, training)["id"] == dpo
    assert jobs.claim_next_job(db, training, other_kinds=True)["id"] == publish
    assert jobs.claim_next_job(db, training, other_kinds=True) is None  # reward stays for its lane
    assert jobs.get_job(db, reward)["status"] == "queued"
    assert jobs.claim_next_job(db)["id"] == reward


def test_concurrent_claims_take_each_job_once(store):
    db = store.db
    ids = [jobs.create_job(db, "generate", {"i": i}) for i in range(40)]
    claimed: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def claimer():
        try:
            start.wait()
            while (job := jobs.claim_next_job(store.db)) is not None:
                claimed.append(job["id"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            store.db.conn.close()

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    assert sorted(claimed) == ids


# --- concurrency ------------------------------------------------------------------------------

def test_concurrent_writers_lose_nothing(store):
    """8 threads x 50 votes through one shared Store: each thread writes on its own connection."""
    pair = _pair(store.db)
    names = [f"writer{i}" for i in range(8)]
    ids = [annotators.sign_in(store.db, n, "annotator")["id"] for n in names]
    errors: list[BaseException] = []
    connections = []
    start = threading.Barrier(len(ids))

    def writer(annotator_id: int):
        try:
            db = store.db
            connections.append(db)
            start.wait()
            for i in range(50):
                vote_id, new = votes.record_vote(
                    db, pair, annotator_id=annotator_id, choice="ab"[i % 2], client_key=f"{annotator_id}-{i}")
                assert new
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            store.db.conn.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    assert len({id(c) for c in connections}) == len(ids)  # thread-local connections
    assert store.db["votes"].count == 400
    assert votes.human_vote_total(store.db) == 400  # the trigger saw every insert
    per = {r["annotator"]: r["votes"] for r in votes.votes_per_annotator(store.db)}
    assert per == {n: 50 for n in names}


def test_vote_survives_a_writer_committing_inside_its_transaction(store):
    """Deterministic form of the race: another connection commits between the key check and
    the insert of record_vote (a Gradio thread, a job process). The vote must still land."""
    db = store.db
    pair = _pair(db)
    ann = annotators.sign_in(db, "ann", "annotator")
    other = connect(store.path)
    other.conn.execute("PRAGMA busy_timeout = 200")  # with a write lock held, give up fast
    fired = []

    def interleave(sql: str) -> None:
        if not fired and sql.startswith('INSERT INTO "votes"'):
            fired.append(sql)
            try:
                prompts.add_prompts(other, ["written by another connection meanwhile"])
            except sqlite3.OperationalError:
                pass  # fine: the vote's transaction already holds the write lock

    db.conn.set_trace_callback(interleave)
    try:
        vote_id, new = votes.record_vote(db, pair, annotator_id=ann["id"], choice="a", client_key="k")
    finally:
        db.conn.set_trace_callback(None)
        other.conn.close()
    assert fired, "the interleaving hook never ran"
    assert new and db["votes"].count == 1 and votes.human_vote_total(db) == 1


def test_a_write_transaction_inside_another_joins_it(tmp_path):
    """Queuing a job while a job's models are registered: the inner block commits with the
    outer one, and an inner failure undoes only the inner block."""
    store = Store(tmp_path / "arena.db")
    db = store.db
    with write_transaction(db):
        first = jobs.create_job(db, "generate", {})
        with pytest.raises(ValueError), write_transaction(db):
            jobs.create_job(db, "generate", {})
            raise ValueError("inner failure")
    assert [j["id"] for j in jobs.list_jobs(db)] == [first]
