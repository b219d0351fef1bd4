"""The annotator's loop as plain functions: sign in, get a pair, vote, skip, undo.

The UI and the HTTP API both go through here, so validation, idempotency and the
"never the same pair twice" rule hold however a vote arrives. Serving a pair is a
database read; nothing here generates text.
"""

from __future__ import annotations

import hmac
import random
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from rlhf.pairing import draw_order, pair_weights
from rlhf.quality import VoteRateLimiter
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
    predicted, predicted_by = scores.score_pair(store.db, view.pair.completion_a, view.pair.completion_b) or (None, None)
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
