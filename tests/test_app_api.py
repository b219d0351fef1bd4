"""The HTTP API of a running app, through gradio_client: validation, guards, idempotency,
export, policies, and many annotators voting at once.

One app (tiny random GPT-2, six-prompt pool, researcher `rita`) serves the module; the
tests read its SQLite file directly to check what was (and was not) stored.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest

from bench.app_server import TINY_ARGS, execute, query, running_app, wait_for, wait_for_pool
from rlhf.heldout import heldout_markdown, pairwise_report
from rlhf.ranking import PRELIMINARY_VOTES

gradio_client = pytest.importorskip("gradio_client")
AppError = pytest.importorskip("gradio_client.exceptions").AppError

RESEARCHER = "rita"
STARTER_NAMES = ("tiny-t0.7", "tiny-t1.0")
VOTE_ENDPOINTS = ("/vote_a", "/vote_b", "/vote_tie", "/vote_both_bad")
SIGN_IN_KEY = 5  # index of the client key among /sign_in's outputs
VOTE_KEY = 4  # ... and among a vote's outputs
VOTE_REVEAL = 7
MAX_RATIONALE = 1000  # Settings.max_rationale_chars
# Short stories keep the added policy's generation job quick.
ADDED_DECODING = {"temperature": 0.9, "top_p": 0.9, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("api-arena")
    with running_app(data_dir, env={"STORY_ARENA_RESEARCHERS": RESEARCHER}, extra_args=TINY_ARGS) as (url, _):
        wait_for_pool(data_dir)
        yield url, data_dir


def client(url: str):
    return gradio_client.Client(url, verbose=False)


def sign_in(url: str, name: str):
    """A fresh client (its own session) signed in as `name`; returns (client, outputs)."""
    c = client(url)
    return c, c.predict(name, "", api_name="/sign_in")


def db(data_dir: Path) -> Path:
    return data_dir / "arena.db"


def annotator_id(data_dir: Path, name: str) -> int:
    rows = query(db(data_dir), "SELECT id FROM annotators WHERE name = ?", [name])
    assert rows, f"no annotator {name!r}"
    return rows[0][0]


def votes_by(data_dir: Path, name: str) -> list[tuple]:
    return query(
        db(data_dir),
        "SELECT v.id, v.choice, v.client_key, v.rationale, v.completion_a, v.completion_b FROM votes v"
        " JOIN annotators a ON a.id = v.annotator_id WHERE a.name = ? ORDER BY v.id",
        [name],
    )


def models_snapshot(data_dir: Path) -> list[tuple]:
    return query(db(data_dir), "SELECT id, name, active, path FROM models ORDER BY id")


def job_count(data_dir: Path) -> int:
    return query(db(data_dir), "SELECT count(*) FROM jobs")[0][0]


def model_id(data_dir: Path, name: str) -> int:
    rows = query(db(data_dir), "SELECT id FROM models WHERE name = ?", [name])
    assert rows, f"no policy {name!r}"
    return rows[0][0]


def table_rows(value: dict) -> list[dict]:
    """A Dataframe output as dicts keyed by header."""
    return [dict(zip(value["headers"], row)) for row in value["data"]]


@pytest.fixture(scope="module")
def researcher(app):
    url, data_dir = app
    c, out = sign_in(url, RESEARCHER)
    assert out[0] == f"Signed in as **{RESEARCHER}** (researcher)."
    return c


@pytest.fixture(scope="module")
def added_policy(app, researcher):
    """The tiny model's own folder added again under a new name, by the researcher."""
    url, data_dir = app
    folder = data_dir / "models" / "tiny-gpt2"
    assert (folder / "config.json").is_file()
    jobs_before = job_count(data_dir)
    table, message = researcher.predict("tiny-copy", str(folder), json.dumps(ADDED_DECODING), api_name="/add_policy")
    return {"folder": folder, "table": table, "message": message, "jobs_before": jobs_before,
            "id": model_id(data_dir, "tiny-copy")}


def test_sign_in_validates_names(app):
    url, data_dir = app
    c = client(url)
    before = query(db(data_dir), "SELECT count(*) FROM annotators")[0][0]
    cases = {
        "": "Please enter a name",
        "   ": "Please enter a name",
        "<script>alert(1)</script>": "Names may use letters",
        "a/b": "Names may use letters",
        "x" * 41: "40 characters",
    }
    for name, message in cases.items():
        with pytest.raises(AppError, match=message):
            c.predict(name, "", api_name="/sign_in")
    assert query(db(data_dir), "SELECT count(*) FROM annotators")[0][0] == before

    # A valid name works, is trimmed, and comes with a pair and its client key.
    out = c.predict("  Zoe Q.  ", "", api_name="/sign_in")
    assert out[0] == "Signed in as **Zoe Q.** (annotator)."
    assert "your votes: **0**" in out[1]
    assert '<div class="story">' in out[3] and '<div class="story">' in out[4]
    assert len(out[SIGN_IN_KEY]) == 32
    assert query(db(data_dir), "SELECT role FROM annotators WHERE name = 'Zoe Q.'") == [("annotator",)]


def test_voting_needs_a_signed_in_session(app):
    url, data_dir = app
    before = query(db(data_dir), "SELECT count(*) FROM votes")[0][0]
    c = client(url)
    for endpoint in VOTE_ENDPOINTS:
        with pytest.raises(AppError, match="Sign in"):
            c.predict("somekey", "", api_name=endpoint)
    with pytest.raises(AppError, match="Sign in"):
        c.predict(api_name="/undo")
    assert query(db(data_dir), "SELECT count(*) FROM votes")[0][0] == before


def test_a_repeated_client_key_counts_once(app):
    url, data_dir = app
    c, out = sign_in(url, "Iris")
    key = out[SIGN_IN_KEY]
    first = c.predict(key, "clear winner", api_name="/vote_b")
    assert "You chose <b>B is better</b>" in first[VOTE_REVEAL]
    assert first[VOTE_KEY] and first[VOTE_KEY] != key, "the next pair comes with a new key"
    c.predict(key, "clear winner", api_name="/vote_b")  # a retry of the same request
    rows = votes_by(data_dir, "Iris")
    assert len(rows) == 1, rows
    assert rows[0][1:4] == ("b", key, "clear winner")
    # The retry did not spend the pair now on screen: its key still votes.
    c.predict(first[VOTE_KEY], "", api_name="/vote_a")
    assert [r[1] for r in votes_by(data_dir, "Iris")] == ["b", "a"]


def test_undo_takes_back_only_the_last_vote(app):
    url, data_dir = app
    c, out = sign_in(url, "Uma")
    voted = c.predict(out[SIGN_IN_KEY], "", api_name="/vote_tie")
    c.predict(voted[VOTE_KEY], "", api_name="/vote_a")
    assert [r[1] for r in votes_by(data_dir, "Uma")] == ["tie", "a"]
    undone = c.predict(api_name="/undo")
    assert "Vote undone" in undone[-1]
    assert "your votes: **1**" in undone[0]
    assert [r[1] for r in votes_by(data_dir, "Uma")] == ["tie"]
    with pytest.raises(AppError, match="Nothing to undo"):
        c.predict(api_name="/undo")
    assert [r[1] for r in votes_by(data_dir, "Uma")] == ["tie"]


def test_annotators_cannot_use_researcher_actions(app):
    url, data_dir = app
    models_before, jobs_before = models_snapshot(data_dir), job_count(data_dir)
    folder = str(data_dir / "models" / "tiny-gpt2")
    never_signed_in = client(url)
    annotator, out = sign_in(url, "Nora")
    assert "(annotator)" in out[0]
    for c in (never_signed_in, annotator):
        with pytest.raises(AppError, match="researcher role|Sign in"):
            c.predict(False, api_name="/export")
        with pytest.raises(AppError, match="researcher role|Sign in"):
            c.predict("sneaky", folder, "{}", api_name="/add_policy")
        with pytest.raises(AppError, match="researcher role|Sign in"):
            c.predict(model_id(data_dir, STARTER_NAMES[0]), False, api_name="/set_active")
    assert models_snapshot(data_dir) == models_before
    assert job_count(data_dir) == jobs_before
    assert not list((data_dir / "exports").glob("*.jsonl"))
    # Annotators see totals per source but not who voted.
    annotator.predict(out[SIGN_IN_KEY], "", api_name="/vote_a")
    by_source, by_annotator, agreement = annotator.predict(api_name="/vote_counts")
    assert [row["source"] for row in table_rows(by_source)] == ["human"]
    assert by_annotator["data"] == [] and agreement["data"] == []


def test_researcher_exports_preferences(app, researcher):
    url, data_dir = app
    key = researcher.predict(RESEARCHER, "", api_name="/sign_in")[SIGN_IN_KEY]
    after_a = researcher.predict(key, "", api_name="/vote_a")
    researcher.predict(after_a[VOTE_KEY], "", api_name="/vote_tie")
    mine = votes_by(data_dir, RESEARCHER)
    assert [r[1] for r in mine] == ["a", "tie"]
    decided_id, tie_id = mine[0][0], mine[1][0]

    records = [json.loads(line) for line in researcher.predict(False, api_name="/export").splitlines()]
    assert records, "the export is empty"
    for record in records:
        assert isinstance(record["prompt"], str) and record["prompt"]
        assert isinstance(record["chosen"], str) and isinstance(record["rejected"], str)
    decided = query(db(data_dir), "SELECT count(*) FROM votes WHERE source = 'human' AND choice IN ('a', 'b')")[0][0]
    assert len(records) == decided
    by_vote = {r["vote_id"]: r for r in records}
    assert tie_id not in by_vote
    # Choice "a": the chosen text is story A, the rejected one story B.
    (prompt, text_a, text_b), = query(
        db(data_dir),
        "SELECT p.text, ca.text, cb.text FROM votes v JOIN prompts p ON p.id = v.prompt_id"
        " JOIN completions ca ON ca.id = v.completion_a JOIN completions cb ON cb.id = v.completion_b"
        " WHERE v.id = ?", [decided_id],
    )
    assert by_vote[decided_id]["prompt"] == prompt
    assert (by_vote[decided_id]["chosen"], by_vote[decided_id]["rejected"]) == (text_a, text_b)

    # With undecided votes included, the tie is there with its label.
    labelled = {r["vote_id"]: r for r in map(json.loads, researcher.predict(True, api_name="/export").splitlines())}
    assert labelled[tie_id]["label"] == "tie"
    assert "label" not in labelled[decided_id]


def test_add_policy_rejects_a_bogus_path(app, researcher):
    url, data_dir = app
    models_before, jobs_before = models_snapshot(data_dir), job_count(data_dir)
    bogus = str(data_dir / "no-such-model")
    with pytest.raises(AppError) as error:
        researcher.predict("ghost", bogus, "{}", api_name="/add_policy")
    assert bogus in str(error.value)
    assert "does not exist" in str(error.value)
    # Other refusals, each with its reason and nothing stored.
    folder = str(data_dir / "models" / "tiny-gpt2")
    with pytest.raises(AppError, match="already exists"):
        researcher.predict(STARTER_NAMES[0], folder, "{}", api_name="/add_policy")
    with pytest.raises(AppError, match="Policy names"):
        researcher.predict("no spaces!", folder, "{}", api_name="/add_policy")
    with pytest.raises(AppError, match="JSON"):
        researcher.predict("ghost", folder, "{temperature", api_name="/add_policy")
    with pytest.raises(AppError, match="temperature"):
        researcher.predict("ghost", folder, '{"temperature": 5}', api_name="/add_policy")
    assert models_snapshot(data_dir) == models_before
    assert job_count(data_dir) == jobs_before


def test_add_policy_from_a_local_folder_queues_its_stories(app, added_policy):
    url, data_dir = app
    assert "Added **tiny-copy**" in added_policy["message"]
    assert "tiny-copy" in [row["name"] for row in table_rows(added_policy["table"])]
    (kind, path, active, decoding), = query(
        db(data_dir), "SELECT kind, path, active, decoding FROM models WHERE id = ?", [added_policy["id"]]
    )
    assert (kind, path, active) == ("local", str(added_policy["folder"].resolve()), 1)
    assert json.loads(decoding) == ADDED_DECODING
    jobs = query(db(data_dir), "SELECT kind, params FROM jobs ORDER BY id")[added_policy["jobs_before"]:]
    assert len(jobs) == 1
    assert jobs[0][0] == "generate"
    assert json.loads(jobs[0][1]) == {"model_ids": [added_policy["id"]], "prompts": 6}


def test_set_active_toggles_a_policy(app, researcher):
    url, data_dir = app
    target = model_id(data_dir, STARTER_NAMES[1])

    def active() -> int:
        return query(db(data_dir), "SELECT active FROM models WHERE id = ?", [target])[0][0]

    try:
        table, message = researcher.predict(target, False, api_name="/set_active")
        assert message == f"**{STARTER_NAMES[1]}** is now inactive."
        assert active() == 0
        assert {r["name"]: r["active"] for r in table_rows(table)}[STARTER_NAMES[1]] is False
        table, message = researcher.predict(target, True, api_name="/set_active")
        assert message == f"**{STARTER_NAMES[1]}** is now active."
        assert active() == 1
    finally:
        if active() != 1:
            researcher.predict(target, True, api_name="/set_active")
    with pytest.raises(AppError, match="No policy with id 9999"):
        researcher.predict(9999, False, api_name="/set_active")


def test_an_overlong_rationale_is_refused(app):
    url, data_dir = app
    c, out = sign_in(url, "Otto")
    key = out[SIGN_IN_KEY]
    with pytest.raises(AppError, match=f"limited to {MAX_RATIONALE} characters"):
        c.predict(key, "x" * (MAX_RATIONALE + 1), api_name="/vote_a")
    assert votes_by(data_dir, "Otto") == []
    # The pair is still on screen and the limit itself is allowed.
    c.predict(key, "y" * MAX_RATIONALE, api_name="/vote_a")
    rows = votes_by(data_dir, "Otto")
    assert len(rows) == 1 and rows[0][3] == "y" * MAX_RATIONALE


def test_concurrent_annotators_each_vote_once_per_pair(app):
    url, data_dir = app
    clients, votes_each = 8, 5
    names = [f"Crowd {i}" for i in range(clients)]
    start = threading.Barrier(clients, timeout=90)
    errors: list[tuple[str, BaseException]] = []
    counted = dict.fromkeys(names, 0)  # votes the app acknowledged, per annotator

    def annotate(name: str, seed: int) -> None:
        rng, key = random.Random(seed), None
        try:
            c = client(url)
            key = c.predict(name, "", api_name="/sign_in")[SIGN_IN_KEY]
        except Exception as exc:  # reported from the main thread
            errors.append((name, exc))
        start.wait()  # every client votes at the same time
        try:
            for _ in range(votes_each if key is not None else 0):
                assert key, f"{name} ran out of pairs"
                key = c.predict(key, "", api_name=rng.choice(VOTE_ENDPOINTS))[VOTE_KEY]
                counted[name] += 1
        except Exception as exc:
            errors.append((name, exc))

    threads = [threading.Thread(target=annotate, args=(n, i)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a voting thread hung"

    marks = ", ".join("?" for _ in names)
    rows = query(
        db(data_dir),
        "SELECT a.name, min(v.completion_a, v.completion_b), max(v.completion_a, v.completion_b),"
        f" v.client_key FROM votes v JOIN annotators a ON a.id = v.annotator_id WHERE a.name IN ({marks})",
        names,
    )
    # Whatever happened, every acknowledged vote is stored once and nothing else is.
    assert len({r[:3] for r in rows}) == len(rows), "an annotator voted twice on one pair"
    assert len({r[3] for r in rows}) == len(rows)
    stored = {n: sum(1 for r in rows if r[0] == n) for n in names}
    assert stored == counted
    # The trigger-maintained pair table agrees with the votes it summarises.
    (total,), = query(db(data_dir), "SELECT count(*) FROM votes WHERE source = 'human'")
    (summed,), = query(db(data_dir), "SELECT coalesce(sum(votes), 0) FROM policy_pairs")
    assert summed == total

    assert not errors, errors
    assert stored == dict.fromkeys(names, votes_each)
    assert len(rows) == clients * votes_each


def test_leaderboard_counts_every_human_vote(app):
    url, data_dir = app
    summary, table, _ = client(url).predict(api_name="/leaderboard")
    (total,), = query(db(data_dir), "SELECT count(*) FROM votes WHERE source = 'human'")
    assert summary == f"Human votes: **{total}**"
    rows = {r["policy"]: r for r in table_rows(table)}
    assert set(STARTER_NAMES) <= set(rows)
    # Every vote involves two policies.
    assert sum(r["votes"] for r in rows.values()) == 2 * total
    # Few votes: the standing is marked preliminary, and its interval is never a point.
    for row in rows.values():
        fitted = row["wins"] + row["losses"] + row["ties"]
        assert row["preliminary"] == ("yes" if fitted < PRELIMINARY_VOTES else "")
        assert fitted == 0 or row["ci_low"] < row["score"] < row["ci_high"]


def test_added_policy_gets_its_stories_written(app, added_policy):
    url, data_dir = app
    wait_for(
        lambda: query(db(data_dir), "SELECT count(*) FROM completions WHERE model_id = ?",
                      [added_policy["id"]])[0][0] == 6,
        180, "the added policy's six stories",
        on_timeout=lambda: str(query(db(data_dir), "SELECT id, kind, status, error FROM jobs")),
    )
    (status,), = query(db(data_dir), "SELECT status FROM jobs WHERE kind = 'generate' ORDER BY id DESC LIMIT 1")
    assert status in ("running", "succeeded")
    # The policy's own decoding settings were used to write them.
    params = query(db(data_dir), "SELECT gen_params FROM completions WHERE model_id = ?", [added_policy["id"]])
    assert {json.loads(p)["max_new_tokens"] for (p,) in params} == {ADDED_DECODING["max_new_tokens"]}
    models_table = table_rows(client(url).predict(api_name="/models"))
    assert {r["name"]: r["stories"] for r in models_table}["tiny-copy"] == 6


def test_simulated_annotators_vote_through_the_api(app):
    from rlhf.simulate import simulate

    url, data_dir = app
    (before,), = query(db(data_dir), "SELECT count(*) FROM votes")
    result = simulate(url, annotators=2, votes=3, accuracy=1.0, seed=7)
    assert result["errors"] == []
    assert result["votes_cast"] == 6
    assert result["oracle_agreement"] == 1.0  # accuracy 1: every vote is the oracle's choice
    assert result["latency_median_s"] > 0 and result["latency_p99_s"] >= result["latency_median_s"]
    (after,), = query(db(data_dir), "SELECT count(*) FROM votes")
    assert after - before == 6
    names = {r[0] for r in query(db(data_dir), "SELECT name FROM annotators WHERE name LIKE 'sim-7-%'")}
    assert names == {"sim-7-0", "sim-7-1"}


def test_job_details_show_the_held_out_evaluation(app, researcher):
    url, data_dir = app
    held_out = [{"prompt": f"Prompt {i}.", "chosen": "A long story about a cat who found a hat.", "rejected": "A cat."}
                for i in range(4)]
    report = pairwise_report(held_out, [0.5, -1.0, -1.0, -2.0])
    job_ids = []
    for metrics in ({"heldout": report, "eval_accuracy": 0.25}, {"train_loss": 0.1}):
        execute(db(data_dir), "INSERT INTO jobs (kind, params, status, progress, message, created_at, metrics)"
                " VALUES ('reward', '{}', 'succeeded', 1.0, 'done', 0, ?)", [json.dumps(metrics)])
        job_ids.append(query(db(data_dir), "SELECT max(id) FROM jobs")[0][0])
    _, _, text = researcher.predict(job_ids[0], api_name="/job_details")
    assert text == heldout_markdown(report)
    assert "0.25 (95% interval" in text and "4 pairs from 4 held-out prompts" in text
    assert "longer story wins 1.00" in text and "**Warning:** The model does not beat" in text
    assert researcher.predict(job_ids[1], api_name="/job_details")[2] == ""


def test_researcher_only_job_launch(app, researcher):
    url, data_dir = app
    jobs_before = job_count(data_dir)
    mallory, _ = sign_in(url, "mallory")
    with pytest.raises(AppError, match="researcher role"):
        mallory.predict("reward", "{}", None, api_name="/train")
    with pytest.raises(AppError, match="researcher role"):
        mallory.predict(1, api_name="/cancel_job")
    assert job_count(data_dir) == jobs_before
    given = {"batch_size": 2, "max_steps": 3, "min_annotators": 2}
    message = researcher.predict("reward", json.dumps(given), None, api_name="/train")
    assert "Queued job" in message
    (job_id, params), = query(db(data_dir),
                              "SELECT id, params FROM jobs WHERE kind = 'reward' ORDER BY id DESC LIMIT 1")
    assert json.loads(params) == given
    researcher.predict(job_id, api_name="/cancel_job")
    wait_for(lambda: query(db(data_dir), "SELECT status FROM jobs WHERE id = ?", [job_id])[0][0] == "cancelled", 30,
             "the queued job to be cancelled")
    with pytest.raises(AppError, match="JSON"):
        researcher.predict("dpo", "{not json", None, api_name="/train")
    jobs_now = job_count(data_dir)
    for args, message in [
        (("dpo", '{"base": 999}', None), "No base policy with id 999"),
        (("dpo", '{"base": 1, "loss_type": "kto"}', None), "loss_type must be one of"),
        (("rloo", '{"base": 1}', None), "RLOO needs reward_model"),
        (("rloo", '{"base": 1, "reward_model": 2}', None), "not a reward model"),
        (("reward", '{"base": "abc"}', None), "base must be a whole number"),
        (("pretrain", "{}", None), "Choose a corpus"),
    ]:
        with pytest.raises(AppError, match=message):
            researcher.predict(*args, api_name="/train")
    assert job_count(data_dir) == jobs_now
