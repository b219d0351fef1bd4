"""RLOO: parameters, the reward-function wrapper, and a tiny end-to-end run.

The end-to-end test runs the real path on the tiny starter: human votes -> a reward model
(a few steps) -> RLOO against it (a few steps, 8 new tokens) -> a registered rloo policy
whose folder loads and writes stories, with its story pool queued.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from rlhf.generate import Decoding, generate_stories
from rlhf.jobs import run_inline
from rlhf.models import load_causal_lm
from rlhf.rloo import PRESETS, RlooParams, reward_function
from storage import annotators, completions, models, votes
from storage import jobs as job_rows

CPU = torch.device("cpu")


# --- parameters -------------------------------------------------------------------------

def test_quick_preset_is_the_default_and_explicit_keys_override_it():
    params = RlooParams.from_dict({"base": 1, "reward_model": 2})
    assert params.preset == "quick"
    assert params.max_steps == PRESETS["quick"]["max_steps"]
    assert params.prompts_per_step == PRESETS["quick"]["prompts_per_step"]
    assert (params.beta, params.num_generations, params.max_new_tokens) == (0.05, 2, 64)
    assert params.lora is None and params.learning_rate is None and params.temperature is None

    full = RlooParams.from_dict({"base": 1, "reward_model": 2, "preset": "full"})
    assert full.max_steps == PRESETS["full"]["max_steps"] > params.max_steps

    custom = RlooParams.from_dict({
        "base": 1, "reward_model": 2, "preset": "full", "max_steps": 3, "lora": True,
        "learning_rate": 1e-4, "beta": 0.0, "prompt_source": "all", "temperature": None,
    })
    assert (custom.max_steps, custom.lora, custom.learning_rate, custom.beta) == (3, True, 1e-4, 0.0)
    assert custom.prompts_per_step == PRESETS["full"]["prompts_per_step"]
    assert custom.temperature is None  # None means "not given"


@pytest.mark.parametrize(("params", "message"), [
    ({"base": 1, "reward_model": 2, "learning_rte": 1e-5}, "Unknown RLOO parameter(s): learning_rte"),
    ({"base": 1}, "reward_model"),
    ({"reward_model": 2}, "base"),
    ({"base": 1, "reward_model": 2, "preset": "huge"}, "preset must be one of quick, full"),
    ({"base": 1, "reward_model": 2, "beta": -0.1}, "beta must be in [0.0, 10.0]"),
    ({"base": 1, "reward_model": 2, "num_generations": 1}, "num_generations must be between 2 and 64"),
    ({"base": 1, "reward_model": 2, "max_steps": 0}, "max_steps must be between 1 and 1000000"),
    ({"base": 1, "reward_model": 2, "max_steps": 2.5}, "max_steps must be a whole number"),
    ({"base": 1, "reward_model": 2, "temperature": 0}, "temperature must be in (0.0, 2.0]"),
    ({"base": 1, "reward_model": 2, "lora": "yes"}, "lora must be true or false"),
    ({"base": 1, "reward_model": 2, "prompt_source": "user"}, "prompt_source must be one of seed, all"),
    ({"base": True, "reward_model": 2}, "base must be a whole number"),
])
def test_bad_parameters_are_rejected_clearly(params, message):
    with pytest.raises(ValueError) as excinfo:
        RlooParams.from_dict(params)
    assert message in str(excinfo.value)


def test_params_are_frozen():
    params = RlooParams.from_dict({"base": 1, "reward_model": 2})
    with pytest.raises(AttributeError):
        params.beta = 1.0  # type: ignore[misc]


# --- pieces -----------------------------------------------------------------------------

def test_reward_function_scores_plain_and_conversational_completions():
    seen = []

    def scorer(prompts, stories):
        seen.append((list(prompts), list(stories)))
        return [len(s) for s in stories]

    reward = reward_function(scorer)
    plain = reward(prompts=["A cat.\n\nStory:"], completions=[" Once upon a time. "], prompt_text=["A cat."])
    chat = reward(
        prompts=[[{"role": "user", "content": "A dog."}]],
        completions=[[{"role": "assistant", "content": " Woof. "}]],
        prompt_text=["A dog."], trainer_state=None,
    )
    assert plain == [len("Once upon a time.")] and chat == [len("Woof.")]
    assert seen == [(["A cat."], ["Once upon a time."]), (["A dog."], ["Woof."])]
    assert all(isinstance(x, float) for x in plain + chat)


# --- end to end -------------------------------------------------------------------------

def _vote_on_pool(store) -> int:
    """One human vote per prompt that both starter policies wrote a story for."""
    db = store.db
    rater = annotators.sign_in(db, "rater", "annotator")
    first, second = models.list_models(db)[:2]
    n = 0
    for i, prompt in enumerate(completions.prompts_with_completions(db, min_policies=2)):
        story = {c["model_id"]: c["id"] for c in completions.completions_for_prompt(db, prompt["id"])}
        pair = votes.ShownPair(prompt["id"], story[first.id], story[second.id], first.id, second.id, time.time())
        votes.record_vote(db, pair, annotator_id=rater["id"], choice="a" if i % 3 else "b", client_key=f"k{i}")
        n += 1
    return n


def _pool_job_queued(store, model_id: int) -> bool:
    return any(
        job["kind"] == "generate" and job["status"] == "queued" and job["params"]["model_ids"] == [model_id]
        for job in job_rows.list_jobs(store.db)
    )


def test_rloo_end_to_end_on_the_tiny_starter(arena_dir):
    settings, store = arena_dir
    db = store.db
    base = models.list_models(db)[0]
    assert _vote_on_pool(store) >= 4

    reward_job = run_inline(settings, "reward", {
        "base": base.id, "max_steps": 2, "min_pairs": 4, "batch_size": 2, "max_length": 64,
    })
    assert reward_job["status"] == "succeeded", reward_job["error"]
    reward_model = models.get_model(db, reward_job["result_model_id"])
    assert reward_model.kind == "reward"

    job = run_inline(settings, "rloo", {
        "base": base.id, "reward_model": reward_model.id, "max_steps": 2, "max_new_tokens": 8,
    })
    assert job["status"] == "succeeded", job["error"]
    policy = models.get_model(db, job["result_model_id"])
    assert policy.kind == "rloo" and policy.parent_id == base.id and policy.job_id == job["id"]
    assert policy.active and policy.decoding == base.decoding
    metrics = policy.metrics
    assert metrics["steps"] == 2 and metrics["beta"] == 0.05 and metrics["reward_model"] == reward_model.id
    assert metrics["lora"] is False  # the tiny starter is far below the LoRA threshold
    for key in ("reward_before", "reward_after", "reward_gain", "kl"):
        assert isinstance(metrics[key], float), key
    assert metrics["reward_gain"] == pytest.approx(metrics["reward_after"] - metrics["reward_before"])
    assert job["metrics"] == metrics

    # A plain folder the arena loads and generates with; the resume checkpoints are gone.
    folder = Path(policy.path)
    assert not list(folder.parent.glob("checkpoint-*"))
    model, tokenizer = load_causal_lm(policy.path, CPU)
    stories = generate_stories(model, tokenizer, ["A cat finds a hat."], Decoding(max_new_tokens=6), seed=0)
    assert stories[0].tokens > 0
    assert _pool_job_queued(store, policy.id)

    # LoRA (the path the real starter takes) merges the adapter into a plain model.
    lora_job = run_inline(settings, "rloo", {
        "base": base.id, "reward_model": reward_model.id, "max_steps": 1, "max_new_tokens": 8,
        "lora": True, "lora_r": 4,
    })
    assert lora_job["status"] == "succeeded", lora_job["error"]
    lora_policy = models.get_model(db, lora_job["result_model_id"])
    assert lora_policy.metrics["lora"] is True and lora_policy.parent_id == base.id
    folder = Path(lora_policy.path)
    assert not (folder / "adapter_config.json").exists() and (folder / "config.json").is_file()
    model, tokenizer = load_causal_lm(lora_policy.path, CPU)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_reward_model_must_be_a_reward_model(arena_dir):
    settings, store = arena_dir
    base, other = models.list_models(store.db)[:2]
    job = run_inline(settings, "rloo", {"base": base.id, "reward_model": other.id, "max_steps": 1})
    assert job["status"] == "failed"
    assert "not a reward model" in job["error"] and other.name in job["error"]
    job = run_inline(settings, "rloo", {"base": base.id, "reward_model": 999, "max_steps": 1})
    assert job["status"] == "failed" and "No reward model with id 999" in job["error"]
    assert [m.kind for m in models.list_models(store.db)] == ["starter", "starter"]


def test_unknown_key_fails_the_job_clearly(arena_dir):
    settings, store = arena_dir
    base = models.list_models(store.db)[0]
    job = run_inline(settings, "rloo", {"base": base.id, "reward_model": base.id, "betta": 0.1})
    assert job["status"] == "failed"
    assert "Unknown RLOO parameter(s): betta" in job["error"]


def test_a_requeued_job_resumes_from_its_checkpoint(arena_dir, monkeypatch):
    """A job that died after training resumes from its last checkpoint instead of restarting,
    and running a finished job again returns the policy it registered."""
    from rlhf import scoring, training
    from rlhf.progress import JobProgress
    from rlhf.runner import output_dir, train
    from tests.conftest import RecordingProgress

    settings, store = arena_dir
    db = store.db
    base = models.list_models(db)[0]
    # Any reward model row will do here: the scorer is replaced by a cheap one.
    reward_row = models.add_model(db, "length-reward", "reward", path=base.path, active=False)

    def length_scorer(record, device):
        return lambda prompts, stories: [len(x) for x in stories]

    monkeypatch.setattr(scoring, "load_reward_scorer", length_scorer)
    params = {"base": base.id, "reward_model": reward_row.id, "max_steps": 2, "max_new_tokens": 8}
    job_id = job_rows.create_job(db, "rloo", params)
    job_rows.update_job(db, job_id, status="running")
    progress = JobProgress(settings, job_id)

    def crash(*args, **kwargs):
        raise RuntimeError("the job process died")

    monkeypatch.setattr(training, "register_checkpoint", crash)
    with pytest.raises(RuntimeError):
        train(settings, "rloo", params, progress)
    assert [p.name for p in output_dir(settings, "rloo", job_id).glob("checkpoint-*")] == ["checkpoint-2"]

    monkeypatch.undo()
    monkeypatch.setattr(scoring, "load_reward_scorer", length_scorer)
    messages = []

    resumed = {**params, "max_steps": 3}
    record = train(settings, "rloo", resumed, RecordingProgress(settings, job_id, messages))
    assert any("resuming checkpoint-2" in m for m in messages)
    assert record.metrics["steps"] == 3 and record.job_id == job_id
    assert train(settings, "rloo", resumed, RecordingProgress(settings, job_id, messages)).id == record.id
