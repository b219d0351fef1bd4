"""Live battle: an annotator's own prompt, two policies streaming from one batched generate call."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from rlhf import arena
from rlhf.arena import ArenaError
from rlhf.generate import Decoding, RowDecoding, stream_stories
from rlhf.models import load_causal_lm
from storage import completions, models, prompts, votes

PROMPT = "A story about a hedgehog who learns to whistle."


def _sign_in(store, settings, name="Ann") -> int:
    return arena.sign_in(store, settings, name)["id"]


def _run(store, settings, annotator, text=PROMPT, seed=0) -> list[arena.LiveUpdate]:
    return list(arena.live_battle(store, settings, annotator, text, random.Random(seed)))


def test_row_decoding_samples_each_row_with_its_own_settings():
    scores = torch.randn(2, 50)
    warped = RowDecoding([Decoding(top_p=0.01), Decoding(top_p=1.0)])(torch.zeros(2, 3, dtype=torch.long), scores)
    assert torch.isfinite(warped[0]).sum() == 1  # top-p 0.01 keeps only the likeliest token
    assert torch.isfinite(warped[1]).all()


def test_stream_stories_streams_every_row_and_ends_with_the_finished_stories(arena_dir):
    settings, store = arena_dir
    policy = models.list_models(store.db, active_only=True)[0]
    model, tokenizer = load_causal_lm(policy.source, torch.device("cpu"))
    decodings = [Decoding(temperature=0.7, max_new_tokens=12), Decoding(temperature=1.0, max_new_tokens=12)]
    snapshots = list(stream_stories(model, tokenizer, [PROMPT, PROMPT], decodings, 12, seed=1))
    assert len(snapshots) > 2 and all(len(s) == 2 for s in snapshots)
    tokens = [[story.tokens for story in s] for s in snapshots[:-1]]
    assert tokens == sorted(tokens) and tokens[0] != tokens[-1]  # the stories grow step by step
    final = snapshots[-1]
    assert all(0 < story.tokens <= 12 for story in final)
    again = list(stream_stories(model, tokenizer, [PROMPT, PROMPT], decodings, 12, seed=1))[-1]
    assert [s.text for s in again] == [s.text for s in final]


def test_live_battle_streams_stores_the_prompt_and_stories_and_takes_a_vote(arena_dir):
    settings, store = arena_dir
    annotator = _sign_in(store, settings)
    updates = _run(store, settings, annotator)
    assert len(updates) >= 2 and all(u.view is None for u in updates[:-1])
    view = updates[-1].view
    assert view is not None and view.prompt == PROMPT and view.pair.model_a != view.pair.model_b
    prompt = prompts.get_prompt(store.db, view.pair.prompt_id)
    assert (prompt["source"], prompt["requested_by"]) == ("user", annotator)
    assert prompt["collection"] == arena.LIVE_COLLECTION
    stored = {c["model_id"]: c["text"] for c in completions.completions_for_prompt(store.db, prompt["id"])}
    assert stored == {view.pair.model_a: view.story_a, view.pair.model_b: view.story_b}
    vote_id, created = arena.submit_vote(store, settings, annotator, view, "a")
    assert created and arena.submit_vote(store, settings, annotator, view, "a") == (vote_id, False)
    assert votes.annotator_vote_count(store.db, annotator) == 1


def test_live_battle_refuses_bad_prompts_with_the_reason(arena_dir):
    settings, store = arena_dir
    annotator = _sign_in(store, settings)
    with pytest.raises(ArenaError, match="empty"):
        _run(store, settings, annotator, "   ")
    with pytest.raises(ArenaError, match=f"over {settings.max_prompt_chars} characters"):
        _run(store, settings, annotator, "x" * (settings.max_prompt_chars + 1))
    with pytest.raises(ArenaError, match="not fit for young children"):
        _run(store, settings, annotator, "A story about a murder in the woods.")
    blocked = prompts.list_prompts(store.db, sources=["user"])
    assert [p["blocked_reason"] for p in blocked] == ["theme: murder"]


def test_live_battle_caps_requests_per_annotator(arena_dir):
    settings, store = arena_dir
    capped = dataclasses.replace(settings, live_battles_per_hour=1)
    ann, bob = _sign_in(store, capped), _sign_in(store, capped, "Bob")
    _run(store, capped, ann)
    with pytest.raises(ArenaError, match="in the last hour"):
        _run(store, capped, ann, "A story about a shy cloud.")
    assert _run(store, capped, bob, "A story about a shy cloud.")[-1].view is not None
    with pytest.raises(ArenaError, match="turned off"):
        _run(store, dataclasses.replace(settings, live_battles_per_hour=0), bob, "A story about a kite.")


def test_one_live_generation_at_a_time(arena_dir):
    settings, store = arena_dir
    annotator = _sign_in(store, settings)
    running = arena.live_battle(store, settings, annotator, PROMPT, random.Random(0))
    next(running)  # the first stream is writing
    with pytest.raises(ArenaError, match="Busy"):
        _run(store, settings, _sign_in(store, settings, "Bob"), "A story about a shy cloud.")
    running.close()
    assert _run(store, settings, annotator, "A story about a shy cloud.")[-1].view is not None


def test_policies_with_different_weights_stream_side_by_side(arena_dir):
    settings, store = arena_dir
    first = models.list_models(store.db, active_only=True)[0]
    other = models.add_model(store.db, "tiny-copy", "local", path=first.source + "/", decoding={"temperature": 0.9})
    for policy in models.list_models(store.db, active_only=True):
        if policy.id not in (first.id, other.id):
            models.set_active(store.db, policy.id, False)
    view = _run(store, settings, _sign_in(store, settings))[-1].view
    assert {view.pair.model_a, view.pair.model_b} == {first.id, other.id}
