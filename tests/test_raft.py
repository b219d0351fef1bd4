"""RAFT (rejection-sampling fine-tuning): parameters, which stories are kept, and the job
end to end on the tiny starter (votes -> reward model -> RAFT -> a child policy in the arena)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from rlhf import scoring, training
from rlhf.divergence import sampled_kl
from rlhf.heldout import split_by_prompt
from rlhf.jobs import run_inline
from rlhf.models import load_causal_lm
from rlhf.progress import JobProgress
from rlhf.raft import RaftParams, prompt_split, sft_record, winners
from rlhf.runner import output_dir, train
from storage import annotators, completions, models, votes
from storage import jobs as job_rows
from storage import prompts as prompt_rows
from tests.conftest import RecordingProgress

CPU = torch.device("cpu")


@pytest.mark.parametrize(("params", "message"), [
    ({"base": 1}, "RAFT needs reward_model"),
    ({"reward_model": 2}, "RAFT needs base"),
    ({"base": 1, "reward_model": 2, "k": 1}, "k must be between 2 and 64"),
    ({"base": 1, "reward_model": 2, "margin": -1}, "margin must be in [0.0, 1000.0]"),
    ({"base": 1, "reward_model": 2, "epochs": 0}, "epochs must be in (0.0, 100.0]"),
    ({"base": 1, "reward_model": 2, "iterations": 11}, "iterations must be between 1 and 10"),
    ({"base": 1, "reward_model": 2, "prompt_source": "web"}, "prompt_source must be one of all, seed"),
    ({"base": 1, "reward_model": 2, "lora": "yes"}, "lora must be true or false"),
    ({"base": 1, "reward_model": 2, "kk": 4}, "Unknown RAFT parameter(s): kk"),
])
def test_bad_parameters_give_one_line_errors(params, message):
    with pytest.raises(ValueError) as excinfo:
        RaftParams.from_dict(params)
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_winners_are_each_prompts_best_story_when_it_beats_the_mean_by_the_margin():
    prompts = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    stories = ["a1", "a2", "a3", "b1", "b2", "b3", "c1", "c2", "c3"]
    rewards = [0.1, 0.9, 0.2, 0.5, 0.5, 0.5, 1.0, 0.0, 0.7]
    kept = winners(prompts, stories, rewards, k=3, margin=0.0)
    assert [(w["prompt"], w["story"], w["reward"]) for w in kept] == [("a", "a2", 0.9), ("c", "c1", 1.0)]
    # c's best beats its mean (0.567) by 0.43, a's (0.4) by 0.5: a margin of 0.45 keeps only a.
    assert [w["story"] for w in winners(prompts, stories, rewards, k=3, margin=0.45)] == ["a2"]


def test_only_a_story_that_ended_by_itself_teaches_the_policy_to_stop(arena_dir):
    """A story the budget cut ends without end-of-sequence in its fine-tuning record; the loss
    covers the story (and EOS when it ended by itself), never the prompt."""
    settings, store = arena_dir
    policy = models.list_models(store.db)[0]
    _, tokenizer = load_causal_lm(policy.source, "cpu")
    prompts, stories, rewards = ["p"] * 2 + ["q"] * 2, ["Tom ran home.", "x", "y", "Sam sat down."], [1, 0, 0, 1]
    kept = winners(prompts, stories, rewards, k=2, margin=0.0, cut=[False, False, False, True])
    finished, cut = (sft_record(tokenizer, w["prompt"], w["story"], w["cut"]) for w in kept)
    for record, story in ((finished, "Tom ran home."), (cut, "Sam sat down.")):
        assert len(record["input_ids"]) == len(record["completion_mask"])
        taught = [t for t, m in zip(record["input_ids"], record["completion_mask"]) if m]
        assert tokenizer.decode(taught, skip_special_tokens=True).strip() == story
        assert record["completion_mask"][0] == 0
    assert finished["input_ids"][-1] == tokenizer.eos_token_id
    assert cut["input_ids"][-1] != tokenizer.eos_token_id


def test_training_prompts_never_include_held_out_ones(arena_dir):
    settings, store = arena_dir
    texts = [r["text"] for r in prompt_rows.list_prompts(store.db)]
    train_side, held_side = split_by_prompt([{"prompt": t} for t in texts], 0.2)
    sampled, held_out = prompt_split(store, "all", 1000)
    assert sampled == [r["prompt"] for r in train_side] and held_out
    assert not set(sampled) & {r["prompt"] for r in held_side}
    assert len(prompt_split(store, "all", 3)[0]) == 3


def _vote_on_pool(store) -> None:
    db = store.db
    rater = annotators.sign_in(db, "rater", "annotator")
    first, second = models.list_models(db)[:2]
    for i, prompt in enumerate(completions.prompts_with_completions(db, min_policies=2)):
        story = {c["model_id"]: c["id"] for c in completions.completions_for_prompt(db, prompt["id"])}
        pair = votes.ShownPair(prompt["id"], story[first.id], story[second.id], first.id, second.id, time.time())
        votes.record_vote(db, pair, annotator_id=rater["id"], choice="a" if i % 3 else "b", client_key=f"k{i}")


def test_raft_registers_a_child_that_meets_its_parent_in_the_arena(arena_dir):
    settings, store = arena_dir
    db = store.db
    base = models.list_models(db)[0]
    _vote_on_pool(store)
    reward_job = run_inline(settings, "reward", {
        "base": base.id, "max_steps": 2, "min_pairs": 4, "batch_size": 2, "max_length": 64,
    })
    assert reward_job["status"] == "succeeded", reward_job["error"]

    job = run_inline(settings, "raft", {
        "base": base.id, "reward_model": reward_job["result_model_id"], "prompts": 6, "k": 3,
        "max_new_tokens": 8, "epochs": 1.0, "batch_size": 2, "learning_rate": 1e-3,
    })
    assert job["status"] == "succeeded", job["error"]
    child = models.get_model(db, job["result_model_id"])
    assert child.kind == "raft" and child.parent_id == base.id and child.job_id == job["id"]
    assert child.active and child.decoding == base.decoding
    assert any(j["kind"] == "generate" and j["status"] == "queued" and j["params"]["model_ids"] == [child.id]
               for j in job_rows.list_jobs(db))
    metrics = child.metrics
    assert (metrics["prompts"], metrics["samples"]) == (6, 18) and 1 <= metrics["kept"] <= 6
    assert metrics["reward_mean_kept"] > metrics["reward_mean_samples"]
    assert metrics["steps"] == -(-metrics["kept"] // 2) and metrics["train_loss"] > 0
    assert metrics["kl"] > 0 and metrics["lora"] is False
    # The kept stories are the best-scored sample of their prompt.
    sampled = json.loads((output_dir(settings, "raft", job["id"]) / "samples-round-1.json").read_text())
    groups = [sampled["rewards"][i:i + 3] for i in range(0, 18, 3)]
    assert metrics["reward_mean_kept"] == pytest.approx(
        sum(max(g) for g in groups if max(g) > sum(g) / 3) / metrics["kept"])
    model, tokenizer = load_causal_lm(child.path, CPU)
    parent, _ = load_causal_lm(base.path, CPU)
    assert sampled_kl(parent, parent, tokenizer, ["A cat."], ["The cat sat."]) == 0.0
    assert sampled_kl(model, parent, tokenizer, ["A cat."], ["The cat sat."]) > 0.0


def test_the_dpo_objective_trains_on_each_prompts_best_story_against_its_worst(arena_dir, monkeypatch):
    """objective=dpo: DPOTrainer gets (best, worst) of every kept prompt's samples and the
    child, registered like any RAFT child, has moved from its parent."""
    from trl import DPOTrainer

    settings, store = arena_dir
    base = models.list_models(store.db)[0]
    reward_row = models.add_model(store.db, "length-reward", "reward", path=base.path, active=False)
    monkeypatch.setattr(scoring, "load_reward_scorer",
                        lambda record, device: lambda prompts, stories: [float(len(s)) for s in stories])
    seen = []
    real_init = DPOTrainer.__init__

    def recorded(self, *args, **kwargs):
        seen.append(kwargs["train_dataset"])
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "__init__", recorded)
    job = run_inline(settings, "raft", {"base": base.id, "reward_model": reward_row.id, "prompts": 4, "k": 3,
                                        "max_new_tokens": 12, "batch_size": 2, "objective": "dpo",
                                        "learning_rate": 1e-3})
    assert job["status"] == "succeeded", job["error"]
    child = models.get_model(store.db, job["result_model_id"])
    assert child.name == f"{base.name}-raft-dpo" and child.parent_id == base.id
    assert child.metrics["objective"] == "dpo" and child.metrics["beta"] == 0.1 and child.metrics["kl"] > 0
    [dataset] = seen
    sampled = json.loads((output_dir(settings, "raft", job["id"]) / "samples-round-1.json").read_text())
    groups = [sampled["stories"][start:start + 3] for start in range(0, len(sampled["stories"]), 3)]
    expected = [(max(g, key=len), min(g, key=len)) for g in groups if max(map(len, g)) > sum(map(len, g)) / 3]
    assert [(row["chosen"].strip(), row["rejected"].strip()) for row in dataset] == expected and expected


def test_a_flat_reward_keeps_nothing_and_fails_clearly(arena_dir, monkeypatch):
    settings, store = arena_dir
    base = models.list_models(store.db)[0]
    flat = models.add_model(store.db, "flat-reward", "reward", path=base.path, active=False)
    monkeypatch.setattr(scoring, "load_reward_scorer", lambda record, device: lambda p, s: [0.0] * len(s))
    job = run_inline(settings, "raft", {"base": base.id, "reward_model": flat.id, "prompts": 4, "max_new_tokens": 6})
    assert job["status"] == "failed"
    assert "RAFT kept no stories in round 1" in job["error"] and "scores them alike" in job["error"]
    assert [m.kind for m in models.list_models(store.db)] == ["starter", "starter", "reward"]


def test_a_requeued_job_resumes_and_registers_nothing_twice(arena_dir, monkeypatch):
    settings, store = arena_dir
    db = store.db
    base = models.list_models(db)[0]
    reward_row = models.add_model(db, "length-reward", "reward", path=base.path, active=False)
    length_scorer = lambda record, device: lambda prompts, stories: [float(len(s)) for s in stories]  # noqa: E731
    monkeypatch.setattr(scoring, "load_reward_scorer", length_scorer)
    params = {"base": base.id, "reward_model": reward_row.id, "prompts": 4, "k": 2, "max_new_tokens": 8,
              "batch_size": 2, "iterations": 2}
    job_id = job_rows.create_job(db, "raft", params)
    job_rows.update_job(db, job_id, status="running")

    def crash(*args, **kwargs):
        raise RuntimeError("the job process died")

    monkeypatch.setattr(training, "register_checkpoint", crash)
    with pytest.raises(RuntimeError):
        train(settings, "raft", params, JobProgress(settings, job_id))
    folder = output_dir(settings, "raft", job_id)
    assert sorted(p.name for p in folder.glob("round-*")) == ["round-1.json", "round-2", "round-2.json"]

    monkeypatch.undo()
    monkeypatch.setattr(scoring, "load_reward_scorer", length_scorer)
    messages = []

    record = train(settings, "raft", params, RecordingProgress(settings, job_id, messages))
    assert not any("sampling" in m or "fine-tuning" in m for m in messages)  # both rounds were recorded
    assert record.kind == "raft" and record.metrics["iterations"] == 2 and record.metrics["samples"] == 16
    assert train(settings, "raft", params, RecordingProgress(settings, job_id, messages)).id == record.id
    assert [m.kind for m in models.list_models(db)].count("raft") == 1


def test_stories_that_fill_the_context_still_fine_tune(arena_dir, monkeypatch, tmp_path):
    """A story generated up to the last position, re-tokenised and ended with end-of-sequence,
    is longer than the context: the fine-tuning records are cut to fit (the BabyStories
    models have short contexts)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    settings, store = arena_dir
    base = models.list_models(store.db)[0]
    short = tmp_path / "short-context"
    config = GPT2Config.from_pretrained(base.path)
    config.n_positions = 96
    GPT2LMHeadModel(config).save_pretrained(short)
    AutoTokenizer.from_pretrained(base.path).save_pretrained(short)
    policy = models.add_model(store.db, "short-context", "starter", path=str(short), decoding=base.decoding)
    reward_row = models.add_model(store.db, "length-reward", "reward", path=base.path, active=False)
    monkeypatch.setattr(scoring, "load_reward_scorer",
                        lambda record, device: lambda prompts, stories: [float(len(s)) for s in stories])
    job = run_inline(settings, "raft", {"base": policy.id, "reward_model": reward_row.id, "prompts": 4, "k": 2,
                                        "max_new_tokens": 64, "batch_size": 2, "max_steps": 2})
    assert job["status"] == "succeeded", job["error"]
