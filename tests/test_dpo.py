"""DPO on the tiny arena: parameters, both fine-tuning paths, the loss types, metrics, resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.dpo import (
    MIN_EVAL_PAIRS,
    PRESETS,
    STEP_CAPS,
    DPOParams,
    TimeBudget,
)
from rlhf.generate import Decoding, format_prompt, generate_stories
from rlhf.heldout import pairwise_report
from rlhf.jobs import run_inline
from rlhf.models import load_causal_lm
from rlhf.progress import JobCancelled, JobProgress
from rlhf.runner import train
from rlhf.training import preference_data, preference_dataset
from storage import completions, models, prompts, votes
from storage import jobs as job_rows
from tests.test_generate import CHAT_TEMPLATE

CPU = torch.device("cpu")
VOTES_PER_PROMPT = 4
METRIC_KEYS = {
    "data_hash", "votes_used", "train_pairs", "heldout", "loss_type", "beta", "lora", "steps", "epochs",
    "train_loss", "learning_rate", "max_length",
}


def add_votes(store, per_prompt: int = VOTES_PER_PROMPT, limit: int | None = None) -> int:
    """Votes preferring the first policy's story on every prompt, plus one tie (never trained on)."""
    db = store.db
    n = 0
    for prompt in prompts.list_prompts(db):
        stories = completions.completions_for_prompt(db, prompt["id"])
        if len(stories) < 2:
            continue
        a, b = sorted(stories, key=lambda c: c["model_id"])[:2]
        pair = votes.ShownPair(prompt["id"], a["id"], b["id"], a["model_id"], b["model_id"], time.time())
        for _ in range(per_prompt):
            if limit is not None and n >= limit:
                return n
            votes.record_vote(db, pair, annotator_id=None, choice="a", client_key=f"dpo-{n}")
            n += 1
    votes.record_vote(db, pair, annotator_id=None, choice="tie", client_key="dpo-tie")
    return n


@pytest.fixture
def voted(arena_dir):
    settings, store = arena_dir
    assert add_votes(store) >= 20
    base = models.get_model_by_name(store.db, "tiny-t0.7")
    return settings, store, base


def state(path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- parameters ---------------------------------------------------------------------------


def test_params_default_to_the_quick_preset():
    p = DPOParams.from_dict({"base": 3})
    quick = PRESETS["quick"]
    assert (p.loss_type, p.beta, p.preset, p.lora) == ("sigmoid", 0.1, "quick", None)
    assert (p.max_steps, p.batch_size, p.max_length) == (quick["max_steps"], quick["batch_size"], quick["max_length"])
    assert p.smoothing == 0.0 and p.max_minutes == quick["max_minutes"] < 10


def test_explicit_keys_override_the_preset():
    p = DPOParams.from_dict({"base": 3, "preset": "full", "batch_size": 2, "loss_type": "robust"})
    assert p.preset == "full" and p.batch_size == 2
    assert p.max_steps == PRESETS["full"]["max_steps"] and p.max_length == PRESETS["full"]["max_length"]
    assert p.smoothing == 0.1  # robust's default share of flipped labels


def test_steps_are_sized_by_the_data_unless_given():
    p = DPOParams.from_dict({"base": 1, "batch_size": 4, "max_epochs": 2})
    assert p.steps_for(10) == 6  # 2 epochs of ceil(10 / 4) batches
    assert p.steps_for(400) == 100 > PRESETS["quick"]["max_steps"]  # one pass, more than the preset's steps
    assert p.steps_for(10_000) == STEP_CAPS["quick"]  # at most the cap
    assert DPOParams.from_dict({"base": 1, "max_steps": 50}).steps_for(10) == 50


@pytest.mark.parametrize("params, message", [
    ({"base": 1, "learning_rte": 1e-5}, "Unknown DPO parameter(s): learning_rte"),
    ({"base": 1, "loss_type": "hinge"}, "loss_type must be one of sigmoid, ipo, robust, got 'hinge'"),
    ({"loss_type": "ipo"}, "Choose a base policy"),
    ({"base": True}, "base must be a whole number"),
    ({"base": 1, "preset": "huge"}, "preset must be one of quick, full, got 'huge'"),
    ({"base": 1, "beta": 0}, "beta must be in (0, 10]"),
    ({"base": 1, "beta": "0.1"}, "beta must be a number"),
    ({"base": 1, "label_smoothing": 0.1}, "label_smoothing applies to loss_type robust only"),
    ({"base": 1, "loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing must be in (0, 0.49]"),
    ({"base": 1, "lora": "yes"}, "lora must be true or false"),
    ({"base": 1, "batch_size": 0}, "batch_size must be between 1 and 256"),
    ({"base": 1, "eval_fraction": 0.9}, "eval_fraction must be in [0, 0.5]"),
    ({"base": 1, "min_pairs": 1}, "min_pairs must be between 2"),
    ({"base": 1, "max_steps": 2.5}, "max_steps must be a whole number"),
    ({"base": 1, "learning_rate": 1.0}, "learning_rate must be in (0, 0.01]"),
    ({"base": 1, "sources": "weak"}, "sources must be one of human, import, both"),
    ({"base": 1, "datasets": "foxes"}, "datasets selects imported data sets"),
])
def test_bad_params_are_refused_clearly(params, message):
    with pytest.raises(ValueError) as info:
        DPOParams.from_dict(params)
    assert message in str(info.value)


def test_robust_params_validate():
    p = DPOParams.from_dict({"base": 1, "loss_type": "robust", "label_smoothing": 0.2})
    assert p.loss_type == "robust" and p.smoothing == 0.2


# --- data and architecture ----------------------------------------------------------------


def test_training_text_is_the_generation_prompt(arena_dir):
    settings, store = arena_dir
    base = models.get_model_by_name(store.db, "tiny-t0.7")
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    records = [{"prompt": "A cat finds a hat.", "chosen": "Once a cat.", "rejected": "No."}]
    row = preference_dataset(records, tokenizer)[0]
    assert row["prompt"] == format_prompt(tokenizer, "A cat finds a hat.") == "A cat finds a hat.\n\nStory:"
    assert (row["chosen"], row["rejected"]) == (" Once a cat.", " No.")  # plain LMs write a space after the cue
    tokenizer.chat_template = CHAT_TEMPLATE
    row = preference_dataset(records, tokenizer)[0]
    assert row["prompt"] == format_prompt(tokenizer, "A cat finds a hat.")
    assert row["prompt"].endswith("<assistant>") and row["chosen"] == "Once a cat."


# --- end to end through the job runner ------------------------------------------------------


def check_trained_policy(settings, store, base, job, loss_type: str, lora: bool) -> models.ModelRecord:
    assert job["status"] == "succeeded", job["error"]
    record = models.get_model(store.db, job["result_model_id"])
    assert record.kind == "dpo" and record.parent_id == base.id and record.job_id == job["id"]
    assert record.active and record.decoding == base.decoding
    assert METRIC_KEYS <= set(record.metrics)
    m = record.metrics
    assert (m["loss_type"], m["lora"], m["votes_used"]) == (loss_type, lora, 24)
    assert m["train_pairs"] + m["heldout"]["pairs"] == 24 and m["heldout"]["pairs"] > 0
    assert 0.0 <= m["heldout"]["accuracy"] <= 1.0 and m["heldout"]["best_baseline"]
    assert m["epochs"] == round(m["steps"] * m["batch_size"] / m["train_pairs"], 2)
    assert m["train_loss"] > 0
    assert job["metrics"] == m
    # A plain folder, checkpoints gone, loads and writes stories like any policy.
    path = Path(record.path)
    assert path == settings.models_dir / f"dpo-job{job['id']}" / "model"
    assert not list(path.parent.glob("checkpoint-*")) and not (path / "adapter_config.json").exists()
    assert json.loads((path / "config.json").read_text())["use_cache"] is True
    model, tokenizer = load_causal_lm(record.path, CPU)
    stories = generate_stories(model, tokenizer, ["A cat finds a hat."], Decoding(max_new_tokens=8), seed=0)
    assert stories[0].tokens > 0
    # Its story pool is queued, so it joins the arena by itself.
    queued = [j for j in job_rows.list_jobs(store.db, kind="generate") if j["params"]["model_ids"] == [record.id]]
    assert queued and queued[0]["status"] == "queued"
    return record


def test_sigmoid_full_fine_tuning_end_to_end(voted):
    settings, store, base = voted
    before = state(base.path)
    job = run_inline(settings, "dpo", {"base": base.id, "max_steps": 3, "eval_fraction": 0.3})
    record = check_trained_policy(settings, store, base, job, "sigmoid", lora=False)
    assert record.name == "tiny-t0.7-dpo" and record.metrics["steps"] == 3
    after = state(record.path)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(".mlp." in k for k in changed)  # every weight trains, not just attention


def test_ipo_with_lora_merges_the_adapter(voted):
    settings, store, base = voted
    before = state(base.path)
    job = run_inline(settings, "dpo", {"base": base.id, "loss_type": "ipo", "lora": True, "lora_r": 4,
                                       "max_steps": 3, "learning_rate": 1e-3, "eval_fraction": 0.3})
    record = check_trained_policy(settings, store, base, job, "ipo", lora=True)
    assert record.name == "tiny-t0.7-dpo-ipo" and record.metrics["lora_r"] == 4
    after = state(record.path)
    assert set(after) == set(before)  # merged: no lora_A / base_layer keys left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("attn.c_attn.weight" in k for k in changed)


def test_robust_loss_runs(voted):
    settings, store, base = voted
    job = run_inline(settings, "dpo", {"base": base.id, "loss_type": "robust", "label_smoothing": 0.2,
                                       "max_steps": 1, "eval_fraction": 0.3})
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["loss_type"] == "robust" and job["metrics"]["label_smoothing"] == 0.2


def implicit_reward_accuracy(policy_path, ref_path, records, beta: float) -> tuple[float, int]:
    """Share of pairs with beta * (logratio chosen - logratio rejected) > 0, computed by hand,
    and how many pairs sit so close to 0 that float noise could flip them."""
    tokenizer = AutoTokenizer.from_pretrained(str(ref_path))
    policy = AutoModelForCausalLM.from_pretrained(str(policy_path), dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(ref_path), dtype=torch.float32).eval()

    def logp(model, prompt: str, completion: str) -> float:
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        token_logps = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        return float(token_logps[len(prompt_ids) - 1:].sum())

    margins = []
    for row in preference_dataset(records, tokenizer):
        ratio = {k: logp(policy, row["prompt"], row[k]) - logp(ref, row["prompt"], row[k])
                 for k in ("chosen", "rejected")}
        margins.append(beta * (ratio["chosen"] - ratio["rejected"]))
    accuracy = sum(m > 0 for m in margins) / len(margins)
    return accuracy, sum(abs(m) < 1e-4 for m in margins)


def test_heldout_report_is_the_implicit_reward_margin_of_each_held_out_pair(voted):
    settings, store, base = voted
    params = {"base": base.id, "max_steps": 4, "learning_rate": 1e-3, "eval_fraction": 0.5, "batch_size": 4,
              "max_eval_pairs": 100}
    job = run_inline(settings, "dpo", params)
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    _, held_out, _ = preference_data(store, min_pairs=8, eval_fraction=0.5)
    assert m["heldout"]["pairs"] == len(held_out)
    policy = models.get_model(store.db, job["result_model_id"])
    expected, close_calls = implicit_reward_accuracy(policy.path, base.path, held_out, beta=m["beta"])
    # Equal up to float noise, unless a margin sits at 0.
    assert abs(m["heldout"]["accuracy"] - expected) * len(held_out) <= close_calls + 1e-4
    assert m["heldout"]["baselines"] == pairwise_report(held_out, [1.0] * len(held_out))["baselines"]


def test_too_few_votes_fail_the_job_clearly(arena_dir):
    settings, store = arena_dir
    add_votes(store, per_prompt=1, limit=3)
    base = models.get_model_by_name(store.db, "tiny-t0.7")
    job = run_inline(settings, "dpo", {"base": base.id})
    assert job["status"] == "failed"
    assert "Training needs at least 8 decided votes; there are 3." in job["error"]
    assert models.get_model_by_name(store.db, "tiny-t0.7-dpo") is None


@pytest.mark.parametrize("params, message", [
    ({"base": 999}, "No base policy with id 999"),
    ({"loss_type": "kto"}, "loss_type must be one of sigmoid, ipo, robust, got 'kto'"),
    ({"beta": -1}, "beta must be in (0, 10]"),
])
def test_bad_jobs_fail_with_a_clear_error(voted, params, message):
    settings, store, base = voted
    job = run_inline(settings, "dpo", {"base": base.id, **params})
    assert job["status"] == "failed" and message in job["error"]
    assert job["error"].startswith("ValueError: ")


class Control:
    should_training_stop = False


class State:
    def __init__(self, step, max_steps):
        self.global_step, self.max_steps = step, max_steps


def test_time_budget_stops_training_when_eval_and_save_would_not_fit(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("rlhf.dpo.time.monotonic", lambda: clock[0])
    budget = TimeBudget(deadline=1000.0 + 540, budget_s=540, batch_size=4)
    budget.eval_pairs = 16
    budget.on_train_begin(None, None, None)
    control, step = Control(), 0
    while not control.should_training_stop:
        clock[0] += 60 if step == 0 else 40  # a warm-up step, then 10 s per pair
        step += 1
        budget.on_step_end(None, State(step, 40), control)
    # 540 s: steps until one more (40 s) + eval (16 pairs = 160 s, capped at a quarter: 135 s) + 30 s save overrun
    assert step == 8 and budget.stopped_early and clock[0] == 1340
    assert budget.eval_pairs_that_fit() == 16
    clock[0] += 110  # a slow end of training: only some eval pairs fit now, never fewer than the minimum
    assert budget.eval_pairs_that_fit() == 6
    clock[0] += 100
    assert budget.eval_pairs_that_fit() == MIN_EVAL_PAIRS
    unlimited = TimeBudget(deadline=None, budget_s=0, batch_size=4)
    unlimited.eval_pairs = 16
    unlimited.on_step_end(None, State(1, 40), control := Control())
    assert not control.should_training_stop and unlimited.eval_pairs_that_fit() == 16


def test_quick_time_budget_cuts_steps_and_eval_pairs(voted):
    settings, store, base = voted
    # A budget shorter than the save reserve: one step, then the smallest evaluation.
    job = run_inline(settings, "dpo", {"base": base.id, "max_steps": 20, "max_minutes": 0.2, "eval_fraction": 0.5})
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert m["steps"] == 1 and m["stopped_for_time"] is True and m["max_minutes"] == 0.2
    assert m["heldout"]["pairs"] == MIN_EVAL_PAIRS


class StopAfter(JobProgress):
    """Cancels the job once a trainer step past `step` is reported, like a researcher would."""

    def __init__(self, settings, job_id, step: int):
        super().__init__(settings, job_id)
        self.step = step

    def __call__(self, fraction, message):
        super().__call__(fraction, message)
        if message.startswith(f"step {self.step}/"):
            raise JobCancelled()


def test_a_requeued_job_resumes_from_its_checkpoint(voted):
    settings, store, base = voted
    params = {"base": base.id, "max_steps": 4, "eval_fraction": 0.3}
    job_id = job_rows.create_job(store.db, "dpo", params)
    job_rows.update_job(store.db, job_id, status="running")
    with pytest.raises(JobCancelled):
        train(settings, "dpo", params, StopAfter(settings, job_id, step=3))
    output_dir = settings.models_dir / f"dpo-job{job_id}"
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-2"]
    record = train(settings, "dpo", params, JobProgress(settings, job_id))
    assert record.metrics["resumed_from_step"] == 2 and record.metrics["steps"] == 4
    assert not list(output_dir.glob("checkpoint-*"))
    # Run once more (a crash after registering): the same model comes back, no duplicate.
    assert train(settings, "dpo", params, JobProgress(settings, job_id)).id == record.id
    assert len([m for m in models.list_models(store.db) if m.kind == "dpo"]) == 1
