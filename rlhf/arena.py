"""The annotator's loop as plain functions: sign in, get a pair, vote, skip, undo.

The UI and the HTTP API both go through here, so validation, idempotency and the
"never the same pair twice" rule hold however a vote arrives. Serving a pair is a
database read; only a live battle (an annotator's own prompt) generates text.
"""

from __future__ import annotations

import hmac
import random
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from rlhf import safety
from rlhf.pairing import draw_order, pair_weights
from rlhf.quality import VoteRateLimiter
from rlhf.records import text_problem
from rlhf.settings import Settings
from storage import annotators, completions, content, models, prompts, scores, votes
from storage import jobs as job_rows
from storage import quality as quality_rows
from storage.db import Store
from storage.votes import ShownPair

NAME_PATTERN = re.compile(r"^[\w][\w .@-]*$")
MAX_TOKEN_CHARS = 100


class ArenaError(ValueError):
    """Bad input from an annotator; the message is shown as is."""


@dataclass(frozen=True)
class PairView:
    pair: ShownPair
    prompt: str
    story_a: str
    story_b: str
    name_a: str
    name_b: str
    client_key: str


def sign_in(store: Store, settings: Settings, name: str, key: str = "", token: str = "",
            limiter: VoteRateLimiter | None = None, address: str | None = None) -> dict:
    """Validate a display name and return the annotator row with its configured role.

    A name belongs to the browser whose secret `token` first signed in with it; another
    token, or a look-alike of a taken or researcher name, is refused. A new name takes a
    slot of `limiter` (new names per address) only once every other check has passed.
    """
    name = (name or "").strip()
    if not name:
        raise ArenaError("Please enter a name to start voting.")
    if len(name) > settings.max_name_chars:
        raise ArenaError(f"Names are limited to {settings.max_name_chars} characters.")
    if name.startswith("@"):
        raise ArenaError("Names starting with @ are Hugging Face accounts: sign in with Hugging Face.")
    if not NAME_PATTERN.match(name):
        raise ArenaError("Names may use letters, digits, spaces and . @ - _ only.")
    if len(token or "") > MAX_TOKEN_CHARS:
        raise ArenaError(f"Browser token: at most {MAX_TOKEN_CHARS} characters.")
    role = settings.role_for(name)
    if role != "annotator" and settings.researcher_key is not None:
        if not hmac.compare_digest((key or "").encode(), settings.researcher_key.encode()):
            raise ArenaError("This name has the researcher role: enter the researcher key to sign in.")
    elif role != "annotator" and settings.hub_oauth:
        raise ArenaError("This name has the researcher role: sign in with Hugging Face.")
    taken = ArenaError(f"The name {name!r} is taken (or looks like a name that is): choose another one. "
                       "If it is yours, sign in from the browser you first used it in.")
    if role == "annotator" and annotators.name_key(name) in {annotators.name_key(r) for r in settings.researchers}:
        raise taken
    existing = annotators.find(store.db, name)
    if existing is None:
        refusal = limiter.admit(None, address) if limiter else None
        if refusal:
            raise ArenaError(refusal)
    row = annotators.sign_in(store.db, existing["name"] if existing else name, role, token or None)
    if role == "annotator" and row["token_hash"] is not None and not annotators.token_matches(row, token or ""):
        raise taken
    return row


def sign_in_hub(store: Store, settings: Settings, username: str) -> dict:
    """A Hugging Face login (the username is verified by OAuth): the role comes from the
    configured Hub-username lists, without the researcher key. Shown as "@username"."""
    username = (username or "").strip()
    if not username:
        raise ArenaError("The Hugging Face login gave no username.")
    return annotators.sign_in_hub(store.db, username, settings.role_for_hub(username))


def next_pair(store: Store, annotator_id: int, rng: random.Random | None = None,
              gold_rate: float = 0.0, prompt_sources: Sequence[str] | None = None,
              collections: Sequence[str] | None = None) -> PairView | None:
    """The most informative unseen pair for this annotator (see rlhf.pairing), or None;
    only on prompts of `prompt_sources` and `collections` when given
    (Settings.pair_prompt_sources, Settings.pair_prompt_collections).

    With probability gold_rate, an unseen gold pair (known answer) instead, if one is left.
    """
    rng = rng or random.Random()
    if gold_rate and rng.random() < gold_rate:
        gold = quality_rows.unseen_gold_pair(store.db, annotator_id)
        if gold is not None:
            sides = [(gold["model_lo"], gold["completion_lo"]), (gold["model_hi"], gold["completion_hi"])]
            rng.shuffle(sides)
            return _view(store, gold["prompt_id"], sides[0], sides[1], gold["gold_id"])
    db = store.db
    sizes = completions.pool_sizes(db)
    policies = {m.id: m.parent_id for m in models.list_models(db, active_only=True) if sizes.get(m.id)}
    if len(policies) < 2:
        return None
    weights = pair_weights(policies, votes.policy_pair_stats(db))
    for model_x, model_y in draw_order(weights, rng):
        found = votes.find_unseen_pair(db, annotator_id, model_x, model_y, prompt_sources, collections)
        if found is None:
            continue
        sides = [(model_x, found["completion_x"]), (model_y, found["completion_y"])]
        rng.shuffle(sides)
        return _view(store, found["prompt_id"], sides[0], sides[1])
    return None


def _view(store: Store, prompt_id: int, side_a: tuple[int, int], side_b: tuple[int, int],
          gold_id: int | None = None) -> PairView:
    db = store.db
    (model_a, completion_a), (model_b, completion_b) = side_a, side_b
    return PairView(
        pair=ShownPair(prompt_id, completion_a, completion_b, model_a, model_b, time.time(), gold_id),
        prompt=prompts.get_prompt(db, prompt_id)["text"],
        story_a=completions.get_completion(db, completion_a)["text"],
        story_b=completions.get_completion(db, completion_b)["text"],
        name_a=models.get_model(db, model_a).name,
        name_b=models.get_model(db, model_b).name,
        client_key=uuid.uuid4().hex,
    )


def submit_vote(
    store: Store, settings: Settings, annotator_id: int, view: PairView, choice: str,
    rationale: str = "", client_key: str | None = None,
    limiter: VoteRateLimiter | None = None, address: str | None = None,
) -> tuple[int, bool]:
    """Record a vote on the pair shown; a repeated client key returns the first vote.

    Refused, with nothing stored: a vote sooner than settings.min_vote_seconds after the pair
    appeared (shown_at is the server's clock), and one over the limiter's rate limits for
    this annotator or client address.
    """
    if choice not in votes.CHOICES:
        raise ArenaError(f"Unknown choice {choice!r}.")
    rationale = (rationale or "").strip()
    if len(rationale) > settings.max_rationale_chars:
        raise ArenaError(f"The reason is limited to {settings.max_rationale_chars} characters.")
    try:
        rationale.encode("utf-8")
    except UnicodeEncodeError:
        raise ArenaError("The reason (Why?) has a character that is not text (a lone surrogate); remove it.") from None
    waited = time.time() - view.pair.shown_at
    if waited < settings.min_vote_seconds:
        raise ArenaError(f"Please read both stories first: votes count from {settings.min_vote_seconds:g} s "
                         f"after the pair appears ({waited:.1f} s so far). Vote again in a moment.")
    refusal = limiter.admit(annotator_id, address) if limiter else None
    if refusal:
        raise ArenaError(refusal)
    # The newest reward model's guess, stored with the vote: live agreement with people.
    predicted, predicted_by = (scores.score_pair(store.db, view.pair.completion_a, view.pair.completion_b)
                               or (None, None))
    return votes.record_vote(
        store.db, view.pair, annotator_id=annotator_id, choice=choice,
        client_key=client_key or view.client_key, rationale=rationale,
        predicted=predicted, predicted_by=predicted_by,
        source="gold" if view.pair.gold_id is not None else "human",
    )


def skip_pair(store: Store, annotator_id: int, view: PairView) -> None:
    votes.mark_seen(store.db, annotator_id, view.pair.completion_a, view.pair.completion_b)


REPORT_TARGETS = ("prompt", "a", "b")


def report_item(store: Store, settings: Settings, annotator_id: int, view: PairView, target: str) -> bool:
    """An annotator reports the prompt or story A or B as unfit for children; the pair is then
    skipped for them. Returns whether the item has left the arena for everyone (after
    settings.reports_to_hide reports; a researcher's confirmation also does it)."""
    if target not in REPORT_TARGETS:
        raise ArenaError(f"Unknown report target {target!r}; expected one of {', '.join(REPORT_TARGETS)}.")
    completion = {"prompt": None, "a": view.pair.completion_a, "b": view.pair.completion_b}[target]
    hidden = content.add_report(store.db, annotator_id, view.pair.prompt_id, completion, settings.reports_to_hide)
    skip_pair(store, annotator_id, view)
    return hidden


def undo_vote(store: Store, settings: Settings, annotator_id: int, vote_id: int) -> PairView | None:
    """Take back a vote inside the undo window and show the same pair again."""
    vote = votes.undo_vote(store.db, vote_id, annotator_id, settings.undo_window_s)
    if vote is None:
        return None
    return _view(
        store, vote["prompt_id"],
        (vote["model_a"], vote["completion_a"]), (vote["model_b"], vote["completion_b"]), vote["gold_id"],
    )


def vote_count(store: Store, annotator_id: int) -> int:
    return votes.annotator_vote_count(store.db, annotator_id)


def preparing_message(store: Store) -> str | None:
    """What the first start is doing, while it is doing it (shown instead of a blank page)."""
    for job in job_rows.list_jobs(store.db, limit=5, kind="prepare"):
        if job["status"] in job_rows.ACTIVE:
            return f"Preparing the arena: {job['progress']:.0%} · {job['message']}"
    return None


# --- Live battle: an annotator's own prompt, two policies writing side by side ----------------

LIVE_COLLECTION = "live"
LIVE_STREAM_INTERVAL_S = 0.2
_live_generation = threading.Lock()  # generation runs in the app process: one at a time


@dataclass(frozen=True)
class LiveUpdate:
    """The two stories so far; `view` is set once both are stored and can be voted on."""

    story_a: str
    story_b: str
    view: PairView | None = None


def live_battle(store: Store, settings: Settings, annotator_id: int, text: str,
                rng: random.Random | None = None) -> Iterator[LiveUpdate]:
    """Two anonymous active policies write a story for the annotator's prompt, streamed side by
    side; the last update carries the pair to vote on as any pool pair.

    The prompt is checked as imports are (rlhf.records.text_problem, rlhf.safety), counts
    against settings.live_battles_per_hour, and is stored with source `user` and the
    annotator's id; the stories join both policies' pools. One live generation runs at a time:
    a second request is refused with a "busy" message rather than queued behind it.
    """
    from rlhf.generate import Decoding  # loads torch: only for a live battle
    from rlhf.scoring import sampling_decoding

    problem = text_problem(text, settings.max_prompt_chars)
    if problem:
        raise ArenaError(f"Your prompt: {problem}.")
    text = text.strip()
    if settings.live_battles_per_hour == 0:
        raise ArenaError("Asking for a story is turned off on this arena.")
    if prompts.requests_since(store.db, annotator_id, time.time() - 3600) >= settings.live_battles_per_hour:
        raise ArenaError(f"You have asked for {settings.live_battles_per_hour} stories in the last hour, "
                         "the most allowed: vote on the pool's pairs meanwhile.")
    policies = [m for m in models.list_models(store.db, active_only=True) if m.kind != "external"]
    if len(policies) < 2:
        raise ArenaError("Two active policies are needed to write stories; there are not yet.")
    check = safety.ContentCheck(store)
    prompt = prompts.add_requested_prompt(store.db, text, annotator_id, LIVE_COLLECTION, check(text))
    if prompt["blocked_reason"] or prompt["retired_at"] is not None:
        raise ArenaError("This prompt cannot be used in the arena (not fit for young children, or retired): "
                         "try another one.")
    if not _live_generation.acquire(blocking=False):
        raise ArenaError("Busy: another story is being written right now. Ask again in a moment.")
    try:
        pair = (rng or random.Random()).sample(policies, 2)
        decodings = [Decoding.from_dict({"max_new_tokens": settings.max_new_tokens, **sampling_decoding(p.decoding)})
                     for p in pair]
        shown = 0.0
        for stories in _live_stories(settings, pair, text, decodings):
            if time.monotonic() - shown >= LIVE_STREAM_INTERVAL_S:
                shown = time.monotonic()
                yield LiveUpdate(stories[0].text, stories[1].text)
    finally:
        _live_generation.release()
    verdicts = check.many([s.text for s in stories])
    ids = [completions.add_completion(store.db, prompt["id"], policy.id, story.text[: settings.max_story_chars],
                                      decoding.to_dict(), story.tokens, story.ms, blocked_reason=verdict,
                                      truncated=story.truncated)
           for policy, story, decoding, verdict in zip(pair, stories, decodings, verdicts)]
    if any(verdicts):
        raise ArenaError("A story came out unfit for young children and was kept out of the arena: ask again.")
    view = _view(store, prompt["id"], (pair[0].id, ids[0]), (pair[1].id, ids[1]))
    yield LiveUpdate(view.story_a, view.story_b, view)


def _live_stories(settings: Settings, pair: Sequence, text: str, decodings: Sequence) -> Iterator[list]:
    """Both stories so far after each step: ONE batched generate call when the two policies share
    weights (the starters: one model, two decodings), else one call per model side by side."""
    from rlhf.generate import stream_stories
    from rlhf.models import generation_dtype, load_causal_lm, resolve_device

    device = resolve_device(settings.device)
    loaded = [load_causal_lm(p.source, device, settings.hub_token, generation_dtype(device)) for p in pair]
    if pair[0].source == pair[1].source:
        yield from stream_stories(*loaded[0], [text, text], decodings, settings.max_new_tokens)
        return
    streams = [stream_stories(*m, [text], [d], settings.max_new_tokens) for m, d in zip(loaded, decodings)]
    latest: list = [None, None]
    running = [True, True]
    while any(running):
        for side, stream in enumerate(streams):
            if running[side]:
                step = next(stream, None)
                running[side] = step is not None
                latest[side] = step[0] if step is not None else latest[side]
        if all(latest):
            yield list(latest)
