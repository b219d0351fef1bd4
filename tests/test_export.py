"""rlhf/export.py: votes as TRL preference records (prompt, chosen, rejected)."""

from __future__ import annotations

import json
import random

import pytest

from rlhf import arena
from rlhf.export import preference_records, write_jsonl
from storage import votes


@pytest.fixture
def voted(arena_dir):
    """One vote of each kind on different pairs; returns {choice: (view, vote id)}."""
    settings, store = arena_dir
    ann = arena.sign_in(store, settings, "Ann")["id"]
    rng = random.Random(3)
    out = {}
    for choice in ("a", "b", "tie", "both_bad"):
        view = arena.next_pair(store, ann, rng)
        vote_id, _ = arena.submit_vote(store, settings, ann, view, choice, rationale=f"why {choice}")
        out[choice] = (view, vote_id)
    # Make sure the two stories of each decided pair differ, so a swap would be visible.
    for choice in ("a", "b"):
        view, _ = out[choice]
        assert view.story_a != view.story_b
    return settings, store, out


def test_decided_votes_become_chosen_and_rejected(voted):
    settings, store, out = voted
    records = list(preference_records(store))
    by_vote = {r["vote_id"]: r for r in records}
    assert set(by_vote) == {out["a"][1], out["b"][1]}  # ties and both-bad left out by default

    view_a, id_a = out["a"]
    rec = by_vote[id_a]
    assert (rec["prompt"], rec["chosen"], rec["rejected"]) == (view_a.prompt, view_a.story_a, view_a.story_b)

    view_b, id_b = out["b"]
    rec = by_vote[id_b]  # 'b' preferred the right-hand story: chosen is B
    assert (rec["prompt"], rec["chosen"], rec["rejected"]) == (view_b.prompt, view_b.story_b, view_b.story_a)
    assert all(r["source"] == "human" and "label" not in r and "margin" not in r for r in records)


def test_undecided_votes_kept_with_a_label_when_asked(voted):
    settings, store, out = voted
    records = {r["vote_id"]: r for r in preference_records(store, include_undecided=True)}
    assert set(records) == {vote_id for _, vote_id in out.values()}
    for choice in ("tie", "both_bad"):
        view, vote_id = out[choice]
        rec = records[vote_id]
        assert rec["label"] == choice
        assert {rec["chosen"], rec["rejected"]} == {view.story_a, view.story_b}
    assert "label" not in records[out["a"][1]] and "label" not in records[out["b"][1]]


def test_weak_labels_only_when_their_source_is_asked_for(voted):
    settings, store, out = voted
    view, _ = out["a"]
    weak_id, _ = votes.record_vote(store.db, view.pair, annotator_id=None, choice="b",
                                   client_key="weak-1", source="weak", confidence=0.75)
    assert weak_id not in {r["vote_id"] for r in preference_records(store)}
    both = {r["vote_id"]: r for r in preference_records(store, sources=("human", "weak"))}
    weak = both[weak_id]
    assert (weak["source"], weak["margin"]) == ("weak", 0.75)
    assert (weak["chosen"], weak["rejected"]) == (view.story_b, view.story_a)
    only_weak = list(preference_records(store, sources=("weak",)))
    assert [r["vote_id"] for r in only_weak] == [weak_id]


def test_write_jsonl_round_trips_through_datasets(voted, tmp_path):
    from datasets import load_dataset

    settings, store, out = voted
    records = list(preference_records(store))
    path = tmp_path / "out" / "prefs.jsonl"
    assert write_jsonl(iter(records), path) == len(records) == 2
    assert [p.name for p in path.parent.iterdir()] == ["prefs.jsonl"]  # no temp file left
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records

    ds = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert ds.num_rows == len(records)
    assert ds["chosen"] == [r["chosen"] for r in records]
    assert ds["rejected"] == [r["rejected"] for r in records]


def test_write_jsonl_keeps_unicode_and_replaces_whole_file(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("stale content\n" * 10, encoding="utf-8")
    records = [{"prompt": "Écris une histoire 🐢", "chosen": "Il était une fois…", "rejected": "x\ny"}]
    assert write_jsonl(records, path) == 1
    text = path.read_text(encoding="utf-8")
    assert "🐢" in text and "stale" not in text and len(text.splitlines()) == 1
    assert json.loads(text) == records[0]
    assert write_jsonl([], path) == 0 and path.read_text() == ""
