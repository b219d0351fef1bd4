"""Direct Preference Heads (rlhf.dph): the losses against their formulas, the head, the
parameters, training end to end on the tiny starter (head mode leaves the LM's logits as
they were), best-of-k pool generation, the head as a reward model (scores, RLOO), the CLI."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf import arena
from rlhf.dph import (
    PRESET_VALUES,
    STEP_CAPS,
    DirectPreferenceHeadModel,
    DPHParams,
    conservative_dpo_loss,
    contrastive_loss,
    separable_loss,
)
from rlhf.generate import Decoding, generate_stories
from rlhf.jobs import run_inline
from rlhf.models import load_causal_lm
from rlhf.pool import fill_pool
from rlhf.progress import JobProgress
from rlhf.rloo import reward_function
from rlhf.runner import check_params, train
from rlhf.scoring import PreferenceHead, best_of_k, head_scorer, load_reward_scorer, sampling_decoding
from rlhf.training import preference_data
from storage import completions, jobs, models, prompts, scores, votes
from storage.votes import ShownPair
from tests.conftest import run_cli

CPU = torch.device("cpu")
KIND_WORDS = "happy sun friend smiled played sang home warm hug cake laughed kind".split()
GRIM_WORDS = "dark cold alone cried lost broke storm angry fell hurt rain scared".split()
R_CHOSEN = torch.tensor([1.5, -0.3, 0.0, 2.0, -4.0])
R_REJECTED = torch.tensor([0.2, 0.7, -1.0, 2.0, 3.0])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def story(rng: random.Random, words: list[str]) -> str:
    return "The " + " ".join(rng.choice(words) for _ in range(rng.randint(8, 20))) + "."


def vote_kind(store, n: int = 48, seed: int = 0) -> tuple[int, int]:
    """n new prompts, a kind and a grim story for each (one per starter policy, sides at
    random), and a human vote for the kind one: a preference that a head can learn from
    the frozen features of the tiny random GPT-2, which carry the words' average."""
    db = store.db
    rng = random.Random(seed)
    x, y = [m.id for m in models.list_models(db)][:2]
    for i in range(n):
        text = f"Tell a story about friend number {i}."
        prompts.add_prompts(db, [text], source="user")
        prompt_id = db.execute("SELECT id FROM prompts WHERE text = ?", [text]).fetchone()[0]
        kind_on_x = rng.random() < 0.5
        story_x = story(rng, KIND_WORDS if kind_on_x else GRIM_WORDS)
        story_y = story(rng, GRIM_WORDS if kind_on_x else KIND_WORDS)
        cx = completions.add_completion(db, prompt_id, x, story_x)
        cy = completions.add_completion(db, prompt_id, y, story_y)
        votes.record_vote(db, ShownPair(prompt_id, cx, cy, x, y, time.time()), annotator_id=None,
                          choice="a" if kind_on_x else "b", client_key=f"dph-{i}")
    return x, y


# --- the losses, computed independently ---------------------------------------------------

@pytest.mark.parametrize("e", [0.0, 0.1, 0.3])
def test_separable_loss_is_the_formula(e):
    expected = sum(
        -(1 - e) * log_sigmoid(r_w) - e * log_sigmoid(-r_w) - (1 - e) * log_sigmoid(-r_l) - e * log_sigmoid(r_l)
        for r_w, r_l in zip(R_CHOSEN.tolist(), R_REJECTED.tolist())
    ) / len(R_CHOSEN)
    assert separable_loss(R_CHOSEN, R_REJECTED, e).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("e", [0.0, 0.1, 0.3])
def test_contrastive_loss_is_the_formula(e):
    expected = sum(
        -(1 - e) * log_sigmoid(r_w - r_l) - e * log_sigmoid(r_l - r_w)
        for r_w, r_l in zip(R_CHOSEN.tolist(), R_REJECTED.tolist())
    ) / len(R_CHOSEN)
    assert contrastive_loss(R_CHOSEN, R_REJECTED, e).item() == pytest.approx(expected, rel=1e-6)


def test_conservative_dpo_loss_smooths_the_dpo_margin():
    beta, e = 0.5, 0.2
    chosen_ratio, rejected_ratio = torch.tensor([3.0, -1.0, 0.5]), torch.tensor([1.0, 2.0, 0.5])
    expected = sum(
        -(1 - e) * log_sigmoid(beta * (c - r)) - e * log_sigmoid(-beta * (c - r))
        for c, r in zip(chosen_ratio.tolist(), rejected_ratio.tolist())
    ) / 3
    assert conservative_dpo_loss(chosen_ratio, rejected_ratio, beta, e).item() == pytest.approx(expected, rel=1e-6)
    plain = conservative_dpo_loss(chosen_ratio, rejected_ratio, beta, 0.0).item()
    assert plain == pytest.approx(-sum(log_sigmoid(beta * (c - r)) for c, r in zip([3.0, -1.0, 0.5],
                                                                                   [1.0, 2.0, 0.5])) / 3)


# --- the head ------------------------------------------------------------------------------

def test_head_is_a_dot_product_with_the_pooled_state():
    torch.manual_seed(0)
    hidden = torch.randn(3, 8)
    identity = PreferenceHead(8, "identity", dropout=0.5).eval()
    w = identity.score.weight[0]
    assert torch.allclose(identity(hidden), hidden @ w)
    bert = PreferenceHead(8, "bert", dropout=0.5).eval()
    dense = bert.pool[0]
    assert torch.allclose(bert(hidden), torch.tanh(hidden @ dense.weight.T + dense.bias) @ bert.score.weight[0])
    assert identity.train()(hidden).shape == (3,)  # dropout only while training
    assert not torch.allclose(identity(hidden), identity.eval()(hidden))


def test_wrapped_model_keeps_the_lm_logits(prepared_dir):
    folder = prepared_dir / "models" / "tiny-gpt2"
    lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model = DirectPreferenceHeadModel(lm, PreferenceHead(lm.config.hidden_size)).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = model(ids, mask)
    with torch.no_grad():
        assert torch.equal(out.logits, lm(input_ids=ids, attention_mask=mask).logits)
        last = lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[[0, 1], [3, 1]]
    assert torch.allclose(out.rewards, model.head(last))


# --- parameters ----------------------------------------------------------------------------

def test_params_follow_the_preset_of_the_mode_and_explicit_keys_win():
    p = DPHParams.from_dict({"base": 3})
    quick = PRESET_VALUES["quick"]["head"]
    assert (p.mode, p.objective, p.pooler, p.best_of, p.w_dpo, p.register_reward) == (
        "head", "contrastive", "identity", 4, 0.0, True)
    assert (p.max_steps, p.batch_size, p.max_length) == (quick["max_steps"], quick["batch_size"], quick["max_length"])
    lora = DPHParams.from_dict({"base": 3, "mode": "lora", "preset": "full", "w_dpo": 0.5, "max_steps": 7})
    assert lora.max_steps == 7 and lora.batch_size == PRESET_VALUES["full"]["lora"]["batch_size"]
    assert DPHParams.from_dict({"base": 3, "best_of": None}).best_of == 4  # an unset form field


def test_quick_steps_make_at_least_one_pass_up_to_the_cap():
    head = DPHParams.from_dict({"base": 3})  # batch 16, 200 steps
    assert head.steps_for(256) == head.max_steps  # 12.5 passes already
    lora = DPHParams.from_dict({"base": 3, "mode": "lora"})  # batch 4, 6 steps, cap 32
    assert lora.steps_for(100) == 25 > lora.max_steps  # one pass
    assert lora.steps_for(PRESET_VALUES["quick"]["lora"]["max_train_pairs"]) == STEP_CAPS["quick"]["lora"]
    assert DPHParams.from_dict({"base": 3, "mode": "lora", "max_steps": 2}).steps_for(100) == 2
    assert DPHParams.from_dict({"base": 3, "sources": "both", "datasets": "a,b"}).datasets == "a,b"


@pytest.mark.parametrize("params, message", [
    ({}, "Choose a base policy for DPH"),
    ({"base": 1, "k": 4}, "Unknown DPH parameter(s): k"),
    ({"base": 1, "mode": "adapter"}, "mode must be one of head, lora, full"),
    ({"base": 1, "objective": "hinge"}, "objective must be one of contrastive, separable"),
    ({"base": 1, "pooler": "mean"}, "pooler must be one of identity, bert"),
    ({"base": 1, "label_smoothing": 0.5}, "label_smoothing must be in [0, 0.49]"),
    ({"base": 1, "w_dpo": 0.5}, "choose mode lora or full"),
    ({"base": 1, "w_dph": 0}, "w_dph must be in (0, 100]"),
    ({"base": 1, "best_of": 0}, "best_of must be between 1 and 64"),
    ({"base": 1, "best_of": 2.5}, "best_of must be a whole number"),
    ({"base": 1, "dropout": 1.0}, "dropout must be in [0, 0.9]"),
    ({"base": 1, "register_reward": "yes"}, "register_reward must be true or false"),
    ({"base": 1, "sources": "all"}, "sources must be one of human, import, both"),
    ({"base": 1, "datasets": "foxes"}, "datasets selects imported data sets"),
    ({"base": 1, "score_pool": 1}, "score_pool must be true or false"),
    ({"base": "one"}, "base must be a whole number"),
])
def test_bad_params_are_refused_clearly(params, message):
    with pytest.raises(ValueError) as info:
        DPHParams.from_dict(params)
    assert message in str(info.value)


# --- best of k -----------------------------------------------------------------------------

def test_best_of_k_keeps_the_candidate_the_score_rates_highest(prepared_dir):
    model, tokenizer = load_causal_lm(str(prepared_dir / "models" / "tiny-gpt2"), CPU)
    texts = ["A cat finds a hat.", "A dog at sea.", "The moon sings."]
    decoding = Decoding(max_new_tokens=12)
    candidates = generate_stories(model, tokenizer, [t for t in texts for _ in range(4)], decoding, batch_size=6,
                                  seed=3)
    for sign in (1, -1):  # longest, then shortest
        picked = best_of_k(model, tokenizer, texts, decoding, 4, lambda ps, ss, sign=sign: [sign * len(s) for s in ss],
                           batch_size=6, seed=3)
        assert [s.text for s in picked] == [
            max(candidates[4 * i: 4 * i + 4], key=lambda c: sign * len(c.text)).text for i in range(3)]
    assert len({c.text for c in candidates[:4]}) > 1  # the samples differ, so the choice matters


# --- end to end ----------------------------------------------------------------------------

def test_head_training_end_to_end(arena_dir):
    settings, store = arena_dir
    db = store.db
    base_id, _ = vote_kind(store, n=128)
    base = models.get_model(db, base_id)
    params = {"base": base_id, "max_steps": 300, "learning_rate": 1e-2, "eval_fraction": 0.3, "best_of": 3,
              "score_pool": True}
    job = run_inline(settings, "dph", params)
    assert job["status"] == "succeeded", job["error"]

    policy = models.get_model(db, job["result_model_id"])
    assert (policy.kind, policy.parent_id, policy.active, policy.job_id) == ("dph", base_id, True, job["id"])
    assert policy.name == f"{base.name}-dph" and policy.decoding == {**base.decoding, "best_of": 3, "reranker": "head"}
    m = policy.metrics
    assert ((m["mode"], m["objective"], m["best_of"], m["steps"], m["votes_used"])
            == ("head", "contrastive", 3, 300, 128))
    assert m["train_pairs"] + m["heldout"]["pairs"] == 128 and m["heldout"]["pairs"] >= 24
    assert m["train_accuracy"] >= 0.85 and m["heldout"]["accuracy"] >= 0.65, m
    assert job["metrics"]["heldout"] == m["heldout"] and m["epochs"] == round(300 * 16 / m["train_pairs"], 2)

    # The folder: the LM, the head and k; the LM is the base's, so its logits are too.
    folder = Path(policy.path)
    assert policy.decoding["best_of"] == 3 and policy.decoding["reranker"] == "head"
    assert "best_of" not in base.decoding
    wrapped = DirectPreferenceHeadModel.from_folder(folder)
    original = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        assert torch.equal(wrapped(ids).logits, original(input_ids=ids).logits)

    # The head as a reward model: pool scored, scorer agrees, kind stories score higher.
    reward = models.get_model(db, m["reward_model_id"])
    assert (reward.kind, reward.parent_id, reward.active, reward.path) == ("reward", policy.id, False, policy.path)
    assert json.loads((folder / "reward_model.json").read_text())["backbone"] == "dph"
    stored = scores.scores_for(db, reward.id)
    assert reward.metrics["pool_scored"] == len(stored) == db["completions"].count
    scorer = load_reward_scorer(reward, "cpu")
    row = db.execute("SELECT c.id, p.text, c.text FROM completions c JOIN prompts p ON p.id = c.prompt_id"
                     " ORDER BY c.id DESC LIMIT 1").fetchone()
    assert scorer([row[1]], [row[2]])[0] == pytest.approx(stored[row[0]], abs=1e-4)
    rng = random.Random(7)
    kind = scorer(["A story about a cat."] * 10, [story(rng, KIND_WORDS) for _ in range(10)])
    grim = scorer(["A story about a cat."] * 10, [story(rng, GRIM_WORDS) for _ in range(10)])
    assert sum(kind) > sum(grim)
    # The reported held-out accuracy is the share of held-out votes the head gets right.
    _, held_out, _ = preference_data(store, min_pairs=8, eval_fraction=0.3)
    chosen = scorer([r["prompt"] for r in held_out], [r["chosen"] for r in held_out])
    rejected = scorer([r["prompt"] for r in held_out], [r["rejected"] for r in held_out])
    assert m["heldout"]["accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / len(held_out),
                                                      abs=1e-3)
    # A live vote stores the head's prediction.
    voter = arena.sign_in(store, settings, "newcomer")["id"]
    view = arena.next_pair(store, voter, random.Random(0))
    vote_id, _ = arena.submit_vote(store, settings, voter, view, "a")
    vote = db["votes"].get(vote_id)
    assert vote["predicted_by"] == reward.id and 0.0 < vote["predicted"] < 1.0

    # Its pool job writes the best of k stories by the head.
    queued = [j for j in jobs.list_jobs(db, kind="generate") if j["params"]["model_ids"] == [policy.id]]
    assert queued and queued[0]["status"] == "queued"
    missing = completions.prompts_without_completion(db, policy.id, 2)  # 2 seed prompts and every user prompt
    generated = run_inline(settings, "generate", {"model_ids": [policy.id], "prompts": 2})
    assert generated["status"] == "succeeded", generated["error"]
    rows = list(db.query("SELECT gen_params FROM completions WHERE model_id = ?", [policy.id]))
    assert len(rows) == len(missing) > 2 and all(json.loads(r["gen_params"])["best_of"] == 3 for r in rows)

    # RLOO takes the head as its reward model: its parameters pass, and the TRL reward
    # function it builds from load_reward_scorer returns the head's scores.
    check_params(store, "rloo", {"base": base_id, "reward_model": reward.id})
    assert reward_function(scorer)(prompts=["x"], completions=[f" {row[2]} "], prompt_text=[row[1]]) == \
        pytest.approx([stored[row[0]]], abs=1e-4)

    # A re-queued run of the finished job returns the registered policy.
    jobs.update_job(db, job["id"], status="running")
    again = train(settings, "dph", {"base": base_id}, JobProgress(settings, job["id"]))
    assert again.id == policy.id and len([x for x in models.list_models(db) if x.kind == "dph"]) == 1


def test_pool_of_a_dph_policy_is_the_best_of_k_by_its_head(arena_dir):
    settings, store = arena_dir
    db = store.db
    base_id, _ = vote_kind(store, n=16)
    job = run_inline(settings, "dph", {"base": base_id, "max_steps": 20, "register_reward": False})
    assert job["status"] == "succeeded", job["error"]
    policy = models.get_model(db, job["result_model_id"])
    assert "reward_model_id" not in policy.metrics and not (Path(policy.path) / "reward_model.json").exists()
    assert [x.kind for x in models.list_models(db)].count("reward") == 0

    # What the pool should hold: of 4 samples (same seed and batches as fill_pool), the one
    # the head scores highest. The voted prompts leave the arena, so the pool is 2 seed prompts.
    for row in list(db.query("SELECT id FROM prompts WHERE source = 'user'")):
        prompts.retire_prompt(db, row["id"])
    model, tokenizer = load_causal_lm(policy.path, CPU)
    score = head_scorer(policy.path, CPU)
    decoding = Decoding.from_dict({"max_new_tokens": settings.max_new_tokens, **sampling_decoding(policy.decoding)})
    texts = [r["text"] for r in completions.prompts_without_completion(db, policy.id, 2)]
    repeated = [t for t in texts for _ in range(4)]
    candidates = generate_stories(model, tokenizer, repeated, decoding, batch_size=settings.generation_batch_size,
                                  seed=5)
    rewards = score(repeated, [c.text for c in candidates])
    expected = [candidates[max(range(4 * i, 4 * i + 4), key=lambda j: rewards[j])].text for i in range(len(texts))]

    assert fill_pool(store, settings, [policy.id], 2, lambda f, m: None, seed=5) == len(texts) == 2
    written = list(db.query("SELECT text, gen_params FROM completions WHERE model_id = ? ORDER BY prompt_id",
                            [policy.id]))
    assert [r["text"] for r in written] == expected
    assert all(json.loads(r["gen_params"])["best_of"] == 4 for r in written)


def test_lora_and_full_modes_train_the_lm_with_the_dpo_term(arena_dir):
    settings, store = arena_dir
    base_id, _ = vote_kind(store, n=16)
    base = models.get_model(store.db, base_id)
    before = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).state_dict()
    for params in (
        {"mode": "lora", "lora_r": 4, "w_dpo": 0.5, "lm_learning_rate": 1e-3, "label_smoothing": 0.1},
        {"mode": "full", "w_dpo": 0.5, "lm_learning_rate": 1e-3, "objective": "separable", "pooler": "bert"},
    ):
        job = run_inline(settings, "dph", {"base": base_id, "max_steps": 2, "batch_size": 2, **params})
        assert job["status"] == "succeeded", job["error"]
        policy = models.get_model(store.db, job["result_model_id"])
        assert (policy.metrics["mode"], policy.metrics["w_dpo"]) == (params["mode"], 0.5)
        assert policy.metrics["lm_learning_rate"] == 1e-3 and policy.metrics["steps"] == 2
        after = AutoModelForCausalLM.from_pretrained(policy.path, dtype=torch.float32).state_dict()
        assert set(after) == set(before)  # a plain model: the adapter is merged
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        if params["mode"] == "lora":
            assert changed and all("attn.c_attn.weight" in k for k in changed)
        else:
            assert any(".mlp." in k for k in changed)
        head = DirectPreferenceHeadModel.from_folder(policy.path).head
        assert isinstance(head.pool, torch.nn.Sequential) == (params.get("pooler") == "bert")


def test_bad_jobs_fail_clearly(arena_dir):
    settings, store = arena_dir
    base_id, _ = vote_kind(store, n=3)
    job = run_inline(settings, "dph", {"base": base_id})
    assert job["status"] == "failed" and "Training needs at least 8 decided votes; there are 3." in job["error"]
    job = run_inline(settings, "dph", {"base": base_id, "mode": "head", "w_dpo": 1.0})
    assert job["status"] == "failed" and "choose mode lora or full" in job["error"]
    assert not [x for x in models.list_models(store.db) if x.kind == "dph"]


def test_cli_trains_and_registers_a_head(arena_dir):
    settings, store = arena_dir
    base_id, _ = vote_kind(store, n=16)
    proc = run_cli("train", "dph", "--data-dir", str(settings.data_dir), "--base", str(base_id), "--max-steps", "30",
                   "--set", "best_of=2", "--set", "eval_fraction=0.5", "--json", "--starter", "tiny", "--device", "cpu",
                   timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "succeeded", result["error"]
    policy = models.get_model(store.db, result["model_id"])
    assert policy.kind == "dph" and policy.parent_id == base_id and policy.decoding["best_of"] == 2
    assert result["metrics"]["steps"] == 30 and 0.0 <= result["metrics"]["heldout"]["accuracy"] <= 1.0
    assert models.get_model(store.db, policy.metrics["reward_model_id"]).kind == "reward"
