"""rlhf/arena.py on a prepared tiny arena: sign in, pairs, votes, skips, undo."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest

from rlhf import arena
from rlhf.arena import ArenaError
from storage import completions, models, prompts
from storage import jobs as job_rows
from tests.conftest import tiny_settings


def _sign_in(arena_dir, name: str = "Ann") -> int:
    settings, store = arena_dir
    return arena.sign_in(store, settings, name)["id"]


def _add_policy(store, name: str, prompt_ids, text=lambda pid: None):
    """A third policy whose stories are written straight into the pool (no generation)."""
    record = models.add_model(store.db, name, "local", path=f"/nowhere/{name}")
    for pid in prompt_ids:
        completions.add_completion(store.db, pid, record.id, text(pid) or f"{name} tells story {pid}")
    return record


def _available_pairs(store) -> int:
    """Unordered story pairs an annotator can be shown: per prompt, C(k, 2) among active policies."""
    active = {m.id for m in models.list_models(store.db, active_only=True)}
    per_prompt = Counter(
        r["prompt_id"] for r in store.db.query("SELECT prompt_id, model_id FROM completions")
        if r["model_id"] in active
    )
    return sum(k * (k - 1) // 2 for k in per_prompt.values())


# --- sign in -------------------------------------------------------------------------------

@pytest.mark.parametrize("name",
                         ["", "   ", None, "x" * 41, "<script>", "bob; drop", "tab\there", "new\nline", "-lead"])
def test_sign_in_rejects_bad_names(store, tmp_path, name):
    settings = tiny_settings(tmp_path)
    with pytest.raises(ArenaError):
        arena.sign_in(store, settings, name)
    assert store.db["annotators"].count == 0


def test_sign_in_creates_once_and_trims(store, tmp_path):
    settings = tiny_settings(tmp_path)
    first = arena.sign_in(store, settings, "  Ann Lee ")
    again = arena.sign_in(store, settings, "Ann Lee")
    assert first["id"] == again["id"] and first["name"] == "Ann Lee"
    assert first["role"] == "annotator"
    assert arena.sign_in(store, settings, "x" * settings.max_name_chars)["name"] == "x" * 40
    assert arena.sign_in(store, settings, "ann.lee@example-1_b")["role"] == "annotator"
    assert store.db["annotators"].count == 3


def test_researcher_role_follows_settings(store, tmp_path):
    settings = tiny_settings(tmp_path, researchers=frozenset({"Rita"}))
    rita = arena.sign_in(store, settings, "Rita")
    assert rita["role"] == "researcher"
    assert arena.sign_in(store, settings, "Ann")["role"] == "annotator"
    # Dropped from the configuration: the same person signs in as an annotator again.
    demoted = arena.sign_in(store, dataclasses.replace(settings, researchers=frozenset()), "Rita")
    assert demoted["id"] == rita["id"] and demoted["role"] == "annotator"


def test_researcher_key_required_when_set(store, tmp_path):
    settings = tiny_settings(tmp_path, researchers=frozenset({"Rita"}), researcher_key="s3cret")
    for key in ("", "wrong", "s3cret "):
        with pytest.raises(ArenaError, match="researcher key"):
            arena.sign_in(store, settings, "Rita", key)
    assert store.db["annotators"].count == 0
    assert arena.sign_in(store, settings, "Rita", "s3cret")["role"] == "researcher"
    # Annotators never need the key.
    assert arena.sign_in(store, settings, "Ann")["role"] == "annotator"


# --- pairs ---------------------------------------------------------------------------------

def test_next_pair_shows_two_policies_on_one_prompt(arena_dir):
    settings, store = arena_dir
    db = store.db
    ann = _sign_in(arena_dir)
    view = arena.next_pair(store, ann, random.Random(0))
    assert view is not None
    p = view.pair
    assert p.model_a != p.model_b and p.completion_a != p.completion_b
    ca, cb = completions.get_completion(db, p.completion_a), completions.get_completion(db, p.completion_b)
    assert ca["prompt_id"] == cb["prompt_id"] == p.prompt_id
    assert (ca["model_id"], cb["model_id"]) == (p.model_a, p.model_b)
    assert (view.story_a, view.story_b) == (ca["text"], cb["text"])
    assert view.prompt == prompts.get_prompt(db, p.prompt_id)["text"]
    assert {view.name_a, view.name_b} == {"tiny-t0.7", "tiny-t1.0"}
    assert view.name_a == models.get_model(db, p.model_a).name
    assert view.client_key and view.client_key != arena.next_pair(store, ann).client_key


def test_no_pair_with_fewer_than_two_policies(arena_dir):
    settings, store = arena_dir
    ann = _sign_in(arena_dir)
    first, second = models.list_models(store.db)
    models.set_active(store.db, second.id, False)
    assert arena.next_pair(store, ann) is None
    models.set_active(store.db, second.id, True)
    assert arena.next_pair(store, ann) is not None


def test_an_annotator_never_sees_a_pair_twice(arena_dir):
    settings, store = arena_dir
    prompt_ids = sorted(completions.prompts_with_completions(store.db, 2), key=lambda r: r["id"])
    prompt_ids = [r["id"] for r in prompt_ids]
    assert len(prompt_ids) == 6
    _add_policy(store, "third", prompt_ids[:4])  # 6 prompts x 1 pair + 4 prompts x 2 more pairs
    available = _available_pairs(store)
    assert available == 6 + 4 * 2

    ann = _sign_in(arena_dir)
    rng = random.Random(5)
    seen = []
    for step in range(available + 5):
        view = arena.next_pair(store, ann, rng)
        if view is None:
            break
        seen.append(frozenset((view.pair.completion_a, view.pair.completion_b)))
        if step % 3 == 2:
            arena.skip_pair(store, ann, view)
        else:
            arena.submit_vote(store, settings, ann, view, "ab"[step % 2])
    assert arena.next_pair(store, ann) is None
    assert len(seen) == len(set(seen)) == available
    assert arena.vote_count(store, ann) == sum(1 for i in range(available) if i % 3 != 2)
    # Seen is per annotator: someone else starts from the full set.
    assert arena.next_pair(store, _sign_in(arena_dir, "Bob")) is not None


def test_inactive_policies_are_never_shown(arena_dir):
    settings, store = arena_dir
    prompt_ids = [r["id"] for r in completions.prompts_with_completions(store.db, 2)]
    third = _add_policy(store, "third", prompt_ids)
    starter = models.get_model_by_name(store.db, "tiny-t1.0")
    models.set_active(store.db, starter.id, False)
    ann = _sign_in(arena_dir)
    shown = 0
    while (view := arena.next_pair(store, ann)) is not None:
        assert starter.id not in (view.pair.model_a, view.pair.model_b)
        assert third.id in (view.pair.model_a, view.pair.model_b)
        arena.skip_pair(store, ann, view)
        shown += 1
    assert shown == len(prompt_ids)


def test_left_right_order_is_randomized(arena_dir):
    settings, store = arena_dir
    ann = _sign_in(arena_dir)
    orders = Counter()
    for seed in range(60):
        view = arena.next_pair(store, ann, random.Random(seed))
        orders[(view.pair.model_a, view.pair.model_b)] += 1
    assert len(orders) == 2, orders  # both seat orders occur
    assert min(orders.values()) >= 10  # and neither is rare


# --- votes ---------------------------------------------------------------------------------

def test_submitting_twice_with_one_key_counts_once(arena_dir):
    settings, store = arena_dir
    ann = _sign_in(arena_dir)
    view = arena.next_pair(store, ann)
    first = arena.submit_vote(store, settings, ann, view, "a", "  A is funnier.  ")
    retry = arena.submit_vote(store, settings, ann, view, "a", "A is funnier.")
    assert first[1] is True and retry == (first[0], False)
    assert arena.vote_count(store, ann) == 1
    row = next(store.db["votes"].rows)
    assert (row["choice"], row["rationale"], row["source"]) == ("a", "A is funnier.", "human")
    assert (row["completion_a"], row["completion_b"]) == (view.pair.completion_a, view.pair.completion_b)
    # An explicit key from the page wins over the view's own.
    other = arena.next_pair(store, ann)
    a = arena.submit_vote(store, settings, ann, other, "b", client_key="page-key-1")
    b = arena.submit_vote(store, settings, ann, other, "b", client_key="page-key-1")
    assert a[1] and b == (a[0], False) and arena.vote_count(store, ann) == 2


def test_too_long_rationale_and_bad_choice_store_nothing(arena_dir):
    settings, store = arena_dir
    ann = _sign_in(arena_dir)
    view = arena.next_pair(store, ann)
    with pytest.raises(ArenaError):
        arena.submit_vote(store, settings, ann, view, "a", "x" * (settings.max_rationale_chars + 1))
    with pytest.raises(ArenaError):
        arena.submit_vote(store, settings, ann, view, "left")
    assert store.db["votes"].count == 0 and store.db["seen_pairs"].count == 0
    # Exactly at the limit is fine.
    _, new = arena.submit_vote(store, settings, ann, view, "tie", "y" * settings.max_rationale_chars)
    assert new and store.db["votes"].count == 1


def test_undo_restores_the_pair(arena_dir):
    settings, store = arena_dir
    ann = _sign_in(arena_dir)
    available = _available_pairs(store)
    last_id = last_view = None
    for _ in range(available):
        last_view = arena.next_pair(store, ann)
        last_id, _ = arena.submit_vote(store, settings, ann, last_view, "b")
    assert arena.next_pair(store, ann) is None

    restored = arena.undo_vote(store, settings, ann, last_id)
    assert restored is not None
    assert restored.pair.prompt_id == last_view.pair.prompt_id
    assert (restored.pair.completion_a, restored.pair.completion_b) == (last_view.pair.completion_a,
                                                                        last_view.pair.completion_b)
    assert (restored.story_a, restored.story_b) == (last_view.story_a, last_view.story_b)
    assert arena.vote_count(store, ann) == available - 1
    assert store.db.execute("SELECT 1 FROM votes WHERE id = ?", [last_id]).fetchone() is None
    # The pair is servable again, and only that pair.
    again = arena.next_pair(store, ann)
    assert {again.pair.completion_a, again.pair.completion_b} == {last_view.pair.completion_a,
                                                                  last_view.pair.completion_b}
    vote_id, new = arena.submit_vote(store, settings, ann, restored, "a")
    assert new and arena.vote_count(store, ann) == available
    assert next(store.db["votes"].rows_where("id = ?", [vote_id]))["choice"] == "a"


def test_undo_refused_for_others_and_after_the_window(arena_dir):
    settings, store = arena_dir
    ann, bob = _sign_in(arena_dir), _sign_in(arena_dir, "Bob")
    view = arena.next_pair(store, ann)
    vote_id, _ = arena.submit_vote(store, settings, ann, view, "a")
    assert arena.undo_vote(store, settings, bob, vote_id) is None
    store.db.execute("UPDATE votes SET voted_at = voted_at - ? WHERE id = ?", [settings.undo_window_s + 5, vote_id])
    assert arena.undo_vote(store, settings, ann, vote_id) is None
    assert arena.vote_count(store, ann) == 1
    longer = dataclasses.replace(settings, undo_window_s=settings.undo_window_s + 60)
    assert arena.undo_vote(store, longer, ann, vote_id) is not None
    assert arena.vote_count(store, ann) == 0


# --- untrusted text ------------------------------------------------------------------------

def test_html_in_stories_is_stored_verbatim_and_escaped_on_the_page(arena_dir):
    from ui.common import story_html

    settings, store = arena_dir
    evil = '<script>alert("pwned")</script><img src=x onerror="alert(1)"> & <b>bold</b>'
    prompt_ids = [r["id"] for r in completions.prompts_with_completions(store.db, 2)]
    _add_policy(store, "evil", prompt_ids, text=lambda pid: evil)
    models.set_active(store.db, models.get_model_by_name(store.db, "tiny-t1.0").id, False)
    ann = _sign_in(arena_dir)
    view = arena.next_pair(store, ann)
    shown = [s for s in (view.story_a, view.story_b) if s == evil]
    assert shown == [evil]  # verbatim out of the database, nothing mangled
    stored = store.db.execute("SELECT text FROM completions WHERE text = ?", [evil]).fetchall()
    assert len(stored) == len(prompt_ids)
    page = story_html(evil)
    assert "<script" not in page.lower() and "<img" not in page.lower() and "<b>" not in page
    assert "&lt;script&gt;" in page and "&amp;" in page and "&quot;pwned&quot;" in page
    assert page.startswith('<div class="story">') and page.endswith("</div>")


# --- first start ---------------------------------------------------------------------------

def test_preparing_message_while_prepare_job_runs(arena_dir):
    settings, store = arena_dir
    db = store.db
    assert arena.preparing_message(store) is None
    other = job_rows.create_job(db, "generate", {"model_ids": [1]})
    job_rows.claim_next_job(db)
    assert arena.preparing_message(store) is None  # other kinds of jobs say nothing
    job_rows.finish_job(db, other, "succeeded")

    job_id = job_rows.create_job(db, "prepare", {})
    assert arena.preparing_message(store) is not None  # queued already counts
    job_rows.claim_next_job(db)
    job_rows.report_progress(db, job_id, 0.42, "3/12 stories written")
    message = arena.preparing_message(store)
    assert message is not None and "42%" in message and "3/12 stories written" in message
    job_rows.finish_job(db, job_id, "succeeded")
    assert arena.preparing_message(store) is None
