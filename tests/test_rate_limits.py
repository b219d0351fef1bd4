"""Abuse controls: the sliding-window rate limiter on its own (fake clock), and a running app
refusing too-fast and over-limit votes over HTTP, with researcher-only quality actions."""

from __future__ import annotations

import time

import pytest

from bench.app_server import TINY_ARGS, query, running_app, wait_for_pool
from rlhf import arena
from rlhf.quality import PRUNE_ABOVE, WINDOW_S, VoteRateLimiter
from rlhf.simulate import read_screen

gradio_client = pytest.importorskip("gradio_client")
AppError = pytest.importorskip("gradio_client.exceptions").AppError

RESEARCHER = "rita"
MIN_VOTE_S = 1.0
PER_ANNOTATOR, PER_ADDRESS = 2, 3


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_per_annotator_window_slides():
    clock = FakeClock()
    limiter = VoteRateLimiter(per_annotator=3, per_address=0, clock=clock)
    assert [limiter.admit(7, "10.0.0.1") for _ in range(3)] == [None] * 3
    refusal = limiter.admit(7, "10.0.0.1")
    assert refusal == "Too many votes: at most 3 a minute per annotator. Please wait 60 s."
    assert limiter.admit(8, "10.0.0.1") is None, "another annotator has their own window (address unlimited)"
    clock.now += 20
    assert "Please wait 40 s" in limiter.admit(7, "10.0.0.1")
    clock.now += 40
    assert limiter.admit(7, "10.0.0.1") is None, "the oldest vote left the window"


def test_per_address_window_is_shared_by_annotators_and_refusals_count_nothing():
    clock = FakeClock()
    limiter = VoteRateLimiter(per_annotator=0, per_address=2, clock=clock)
    assert limiter.admit(1, "10.0.0.1") is None and limiter.admit(2, "10.0.0.1") is None
    for _ in range(5):
        assert "from one network address" in limiter.admit(3, "10.0.0.1")
    assert limiter.admit(3, "10.0.0.2") is None and limiter.admit(3, None) is None
    clock.now += WINDOW_S
    assert limiter.admit(3, "10.0.0.1") is None  # refused attempts did not fill the window


def test_limits_of_zero_are_off():
    limiter = VoteRateLimiter(per_annotator=0, per_address=0, clock=FakeClock())
    assert all(limiter.admit(1, "10.0.0.1") is None for _ in range(1000))
    assert not limiter._windows, "nothing is tracked for a limit that is off"


def test_stale_windows_are_dropped():
    clock = FakeClock()
    limiter = VoteRateLimiter(per_annotator=5, per_address=0, clock=clock)
    for i in range(PRUNE_ABOVE):
        assert limiter.admit(i, "10.0.0.1") is None
    clock.now += WINDOW_S + 1
    limiter.admit(-1, "10.0.0.9")
    assert len(limiter._windows) == 1


def test_submit_vote_refuses_over_the_limit_and_stores_nothing(arena_dir):
    settings, store = arena_dir
    limiter = VoteRateLimiter(per_annotator=1, per_address=0)
    ann = arena.sign_in(store, settings, "Rae")["id"]
    arena.submit_vote(store, settings, ann, arena.next_pair(store, ann), "a", limiter=limiter, address="1.2.3.4")
    with pytest.raises(arena.ArenaError, match="at most 1 a minute per annotator"):
        arena.submit_vote(store, settings, ann, arena.next_pair(store, ann), "b", limiter=limiter, address="1.2.3.4")
    assert arena.vote_count(store, ann) == 1


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("limits-arena")
    limits = ("--min-vote-seconds", str(MIN_VOTE_S), "--annotator-votes-per-minute", str(PER_ANNOTATOR),
              "--ip-votes-per-minute", str(PER_ADDRESS), "--gold-rate", "1")
    with running_app(data_dir, env={"STORY_ARENA_RESEARCHERS": RESEARCHER},
                     extra_args=(*TINY_ARGS, *limits)) as (url, _):
        wait_for_pool(data_dir)
        yield url, data_dir / "arena.db"


def signed_in(url: str, name: str):
    c = gradio_client.Client(url, verbose=False)
    return c, read_screen(c.predict(name, "", api_name="/sign_in"))


def votes_of(db, name: str) -> int:
    return query(db, "SELECT count(*) FROM votes v JOIN annotators a ON a.id = v.annotator_id WHERE a.name = ?",
                 [name])[0][0]


def read_then_vote(c, screen, endpoint: str = "/vote_a"):
    time.sleep(MIN_VOTE_S + 0.2)
    return read_screen(c.predict(screen.client_key, "", api_name=endpoint))


def test_the_app_refuses_fast_and_over_limit_votes_and_serves_gold_pairs(app):
    url, db = app
    ann, screen = signed_in(url, "Ada")
    with pytest.raises(AppError, match="read both stories first"):
        ann.predict(screen.client_key, "", api_name="/vote_a")
    assert votes_of(db, "Ada") == 0
    screen = read_then_vote(ann, screen)
    screen = read_then_vote(ann, screen, "/vote_b")
    assert votes_of(db, "Ada") == PER_ANNOTATOR
    with pytest.raises(AppError, match=f"at most {PER_ANNOTATOR} a minute per annotator"):
        read_then_vote(ann, screen)
    assert votes_of(db, "Ada") == PER_ANNOTATOR

    other, screen = signed_in(url, "Bo")
    read_then_vote(other, screen)  # the address's third vote in the minute
    with pytest.raises(AppError, match=f"at most {PER_ADDRESS} a minute from one network address"):
        read_then_vote(other, read_screen(other.predict(api_name="/skip")))
    assert votes_of(db, "Bo") == 1

    # Quality actions are the researcher's: refused to an annotator, through the API too.
    with pytest.raises(AppError, match="researcher role"):
        ann.predict(1, "tiny-t0.7", "tiny-t1.0", api_name="/add_gold_pair")
    with pytest.raises(AppError, match="researcher role"):
        ann.predict("Bo", api_name="/exclude_annotator")
    researcher, _ = signed_in(url, RESEARCHER)
    prompt_id, better_text = query(db,
                                   "SELECT c.prompt_id, c.text FROM completions c JOIN models m ON m.id = c.model_id"
                                       " WHERE m.name = 'tiny-t0.7' ORDER BY c.prompt_id LIMIT 1")[0]
    _, gold_table, note = researcher.predict(prompt_id, "tiny-t0.7", "tiny-t1.0", api_name="/add_gold_pair")
    assert "Added gold pair" in note and "tiny-t0.7" in gold_table
    table, _, note = researcher.predict("Bo", api_name="/exclude_annotator")
    assert "Bo is excluded" in note and "excluded: excluded by a researcher" in table
    assert query(db, "SELECT excluded_at IS NOT NULL FROM annotators WHERE name = 'Bo'") == [(1,)]

    # Gold rate 1: a newcomer's first pair is the gold pair.
    _, screen = signed_in(url, "Cy")
    assert better_text in (screen.story_a, screen.story_b)
