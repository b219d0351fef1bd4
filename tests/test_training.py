"""The plumbing every training kind shares: parameter checks, model choice, LoRA."""

from __future__ import annotations

import time

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf.export import preference_records
from rlhf.params import check_choice, check_optional_bool, check_real, check_whole, given_params
from rlhf.training import (
    FULL_LEARNING_RATE,
    LORA_LEARNING_RATE,
    chosen_model,
    lora_and_rate,
    lora_config,
    preference_data,
)
from storage import annotators, completions, models, prompts, votes
from storage.votes import ShownPair


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    ))


@pytest.mark.parametrize("check, args, message", [
    (check_whole, ("steps", 2.5, 1, 9), "steps must be a whole number, got 2.5"),
    (check_whole, ("steps", True, 1, 9), "steps must be a whole number, got True"),
    (check_whole, ("steps", 0, 1, 9), "steps must be between 1 and 9, got 0"),
    (check_real, ("rate", float("nan"), 0, 1), "rate must be a number"),
    (check_real, ("rate", "fast", 0, 1), "rate must be a number"),
    (check_real, ("rate", 0, 0, 1), r"rate must be in \(0, 1\], got 0"),
    (check_real, ("share", 1.5, 0, 1, False), r"share must be in \[0, 1\], got 1.5"),
    (check_choice, ("loss", "kto", ["sigmoid", "ipo"]), "loss must be one of sigmoid, ipo, got 'kto'"),
    (check_optional_bool, ("lora", "yes"), "lora must be true or false"),
])
def test_checks_name_the_value_and_its_range(check, args, message):
    with pytest.raises(ValueError, match=message):
        check(*args)


def test_checks_pass_good_values_through():
    assert check_whole("n", 3, 1, 9) == 3
    assert check_real("r", 0, 0, 1, low_open=False) == 0.0
    assert check_choice("c", "a", ["a"]) == "a"
    assert check_optional_bool("b", None) is None


def test_given_params_drop_unset_keys_and_refuse_unknown_ones():
    assert given_params("DPO", {"beta": 0.1, "lora": None}, ["beta", "lora"]) == {"beta": 0.1}
    assert given_params("DPO", None, ["beta"]) == {}
    with pytest.raises(ValueError, match=r"Unknown DPO parameter\(s\): bta \(known: beta\)"):
        given_params("DPO", {"bta": 1}, ["beta"])
    with pytest.raises(ValueError, match="DPO parameters must be a JSON object, got list"):
        given_params("DPO", [1], ["beta"])


def test_chosen_model_explains_a_wrong_id(store):
    policy = models.add_model(store.db, "writer", "local", path="/nowhere")
    scorer = models.add_model(store.db, "judge", "reward", path="/nowhere", active=False)
    assert chosen_model(store, policy.id, "base policy").id == policy.id
    assert chosen_model(store, str(scorer.id), "reward model", reward=True).id == scorer.id
    with pytest.raises(ValueError, match="No base policy with id 999"):
        chosen_model(store, 999, "base policy")
    with pytest.raises(ValueError, match="is a reward model, not a story policy"):
        chosen_model(store, scorer.id, "base policy")
    with pytest.raises(ValueError, match="is a local policy, not a reward model"):
        chosen_model(store, policy.id, "reward model", reward=True)
    with pytest.raises(ValueError, match="Choose a base policy"):
        chosen_model(store, None, "base policy")


def test_lora_targets_the_attention_of_gpt2_and_llama():
    config = lora_config(tiny_gpt2(), 4)
    assert set(config.target_modules) == {"c_attn"} and config.fan_in_fan_out and config.r == 4
    config = lora_config(tiny_llama(), 8)
    assert set(config.target_modules) == {"q_proj", "v_proj"} and not config.fan_in_fan_out


def test_lora_is_the_default_only_for_large_models():
    assert lora_and_rate(tiny_gpt2(), None, None) == (False, FULL_LEARNING_RATE)
    assert lora_and_rate(tiny_gpt2(), True, None) == (True, LORA_LEARNING_RATE)
    assert lora_and_rate(tiny_gpt2(), None, 1e-3) == (False, 1e-3)


def test_min_annotators_keeps_only_pairs_judged_by_enough_people(store):
    db = store.db
    writer = models.add_model(db, "writer", "local", path="/a")
    rival = models.add_model(db, "rival", "local", path="/b")
    prompts.add_prompts(db, ["One.", "Two."], source="user")
    pair_ids = []
    for prompt_id in (1, 2):
        a = completions.add_completion(db, prompt_id, writer.id, f"good {prompt_id}")
        b = completions.add_completion(db, prompt_id, rival.id, f"bad {prompt_id}")
        pair_ids.append((prompt_id, a, b))
    people = [annotators.sign_in(db, f"person-{i}", "annotator")["id"] for i in range(3)]
    judged_by = {1: people, 2: people[:1]}  # prompt 1's pair: three people; prompt 2's: one
    for prompt_id, a, b in pair_ids:
        for n, person in enumerate(judged_by[prompt_id]):
            choice = "tie" if n == 2 else "a"  # a tie still counts as judging the pair
            votes.record_vote(db, ShownPair(prompt_id, a, b, writer.id, rival.id, time.time()),
                              annotator_id=person, choice=choice, client_key=f"{prompt_id}-{n}")
    everyone = list(preference_records(store))
    assert len(everyone) == 3
    kept = list(preference_records(store, min_annotators=3))
    assert [r["prompt"] for r in kept] == ["One.", "One."]
    train, held_out, snapshot = preference_data(store, min_pairs=2, min_annotators=3)
    assert snapshot["votes_used"] == 2 and len(train) + len(held_out) == 2
    with pytest.raises(ValueError, match="at least 2 decided votes; there are 0"):
        preference_data(store, min_pairs=2, min_annotators=4)
