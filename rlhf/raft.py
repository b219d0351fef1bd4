"""Rejection-sampling fine-tuning (RAFT, Dong et al. 2023; ReST, Gulcehre et al. 2023).

The `raft` training kind (rlhf.runner: `run(ctx) -> JobResult`): a policy writes k stories
per training prompt with its own decoding, the reward model (or a DPH head) scores them,
and the best story of each prompt is kept when it beats the mean of its k by more than
`margin` (a prompt whose stories all score alike teaches nothing). The policy is then
fine-tuned on the kept stories with TRL's SFTTrainer (token records in the generation
format, loss on the story only, end-of-sequence only after a story that ended by itself,
never after one the budget cut). `iterations` > 1 repeats this from the new
policy (ReST's "grow" rounds). Cheap on CPU: sampling and one supervised pass, no RL.

`objective` "dpo" trains on the same samples with TRL's DPOTrainer instead: each kept
prompt's best story against its worst (online / iterative DPO on reward-model-labelled
pairs of the policy's own stories, as in Xiong et al. 2024), with the policy the round
started from as the reference (the LoRA adapter disabled). Supervised fine-tuning on a
few hundred of its own stories sharpens a small policy (more repeated 4-grams on the SmolLM2
starter, README closed loop) and learns nothing about what made a story the best; the pair
says it.

- prompts: the training side of rlhf.heldout.split_by_prompt over the prompts of
  `prompt_source`, in id order; the held-out side is never sampled for training, and the
  job's evaluation (reward before / after, KL to the parent) runs there.
- model: LoRA above LORA_THRESHOLD_PARAMS (rlhf.training.lora_and_rate), merged after each round.
- resume: each round's samples and scores are written to the job folder before training,
  each finished round's model is saved, and trainer checkpoints go to the job folder; a
  re-queued job reuses them (the runner finds the last checkpoint).
- metrics: prompts, samples, kept, mean reward of all samples vs the kept ones, train loss,
  steps, epochs, seconds, the reward model's mean score on held-out prompts before and after,
  and the child's KL to its parent on its own held-out stories (rlhf.divergence.sampled_kl).
"""

from __future__ import annotations

import copy
import gc
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from typing import ClassVar

from rlhf import scoring
from rlhf.divergence import sampled_kl
from rlhf.generate import Decoding, Story, generate_stories, prompt_and_story
from rlhf.heldout import split_by_prompt
from rlhf.models import context_length, generation_dtype, resolve_device
from rlhf.params import MODEL_ID_RANGE, JobParams, param
from rlhf.runner import JobContext, JobResult, Kind, ModelSpec, model_writer
from rlhf.training import (
    ProgressCallback,
    chosen_model,
    load_trainable_lm,
    lora_and_rate,
    lora_config,
    preference_dataset,
    trainer_device_args,
)
from storage import prompts as prompt_rows
from storage.prompts import SOURCES

MODEL_KIND = "raft"
PROMPT_SOURCES = ("all", *SOURCES)
HELD_OUT_FRACTION = 0.2
EVAL_PROMPTS = 8
EVAL_SAMPLES_PER_PROMPT = 2
EVAL_SEED = 20240501
OBJECTIVES = ("sft", "dpo")


@dataclass(frozen=True)
class RaftParams(JobParams):
    """A RAFT job's parameters; every value is checked on construction."""

    LABEL: ClassVar[str] = "RAFT"
    REQUIRED: ClassVar[dict] = {"base": "RAFT needs base: the id of the base policy.",
                                "reward_model": "RAFT needs reward_model: the id of the reward model (or DPH head)."}

    base: int = param(help="the policy to improve (its decoding writes the samples)", low=1, high=MODEL_ID_RANGE[1])
    reward_model: int = param(help="the reward model (or DPH head) that picks the best of k", low=1,
                              high=MODEL_ID_RANGE[1])
    k: int = param(4, "stories sampled per prompt; the best one is the candidate", low=2, high=64)
    prompts: int = param(32, "training prompts sampled per round (never the held-out ones)", low=1, high=100_000)
    prompt_source: str = param("all", "which prompts to sample on: all, or one source", choices=PROMPT_SOURCES)
    margin: float = param(0.0, "keep the best story only when its reward beats the mean of the k by more than this",
                          low=0.0, high=1000.0)
    epochs: float = param(2.0, "passes over the kept stories per round", low=0.0, high=100.0, low_open=True)
    max_steps: int | None = param(None, "cap on optimizer steps per round (unset: epochs decide)", low=1,
                                  high=1_000_000)
    batch_size: int = param(4, "stories per optimizer step", low=1, high=256)
    learning_rate: float | None = param(None, "unset: 5e-5 with LoRA, 5e-6 for all weights", low=0.0, high=1.0,
                                        low_open=True)
    lora: bool | None = param(None, "train a LoRA adapter (unset: for models over 50 M parameters)")
    lora_r: int = param(8, "LoRA rank", low=1, high=256)
    max_new_tokens: int | None = param(None, "story length while sampling (unset: the base policy's decoding)",
                                       low=1, high=1024)
    iterations: int = param(1, "rounds of sample, keep, fine-tune (ReST's grow steps), each from the newest policy",
                            low=1, high=10)
    objective: str = param("sft", "sft: fine-tune on each prompt's best story (RAFT); dpo: DPO with the best story "
                           "against the worst (online DPO)", choices=OBJECTIVES)
    beta: float = param(0.1, "dpo only: strength of the pull towards the round's starting policy", low=0, high=10,
                        low_open=True)
    seed: int = param(0, "random seed", low=0, high=2**32 - 1)



def prompt_split(store, source: str, count: int) -> tuple[list[str], list[str]]:
    """The first `count` training-side prompts of `source` (id order) and up to EVAL_PROMPTS
    held-out ones, split by prompt so neither side's prompts reach the other."""
    rows = prompt_rows.list_prompts(store.db, sources=None if source == "all" else [source])
    train, held_out = split_by_prompt([{"prompt": r["text"]} for r in rows], HELD_OUT_FRACTION)
    if not train:
        raise ValueError(f"RAFT needs {source} prompts to sample on and there are none; add prompts first.")
    return [r["prompt"] for r in train[:count]], [r["prompt"] for r in held_out[:EVAL_PROMPTS]]


def winners(prompts: list[str], stories: list[str], rewards: list[float], k: int, margin: float,
            cut: list[bool] | None = None) -> list[dict]:
    """Per prompt (k consecutive samples each), its best story when that beats the mean
    reward of the k by more than margin, as {prompt, story, reward, cut, worst}; `cut` marks
    the stories the token budget ended (none when not given), `worst` is the lowest-scored
    story (the dpo objective's rejected one)."""
    cut = cut or [False] * len(stories)
    kept = []
    for i in range(0, len(stories), k):
        group = rewards[i:i + k]
        best = max(range(len(group)), key=group.__getitem__)
        worst = min(range(len(group)), key=group.__getitem__)
        if group[best] - statistics.fmean(group) > margin:
            kept.append({"prompt": prompts[i], "story": stories[i + best], "reward": group[best], "cut": cut[i + best],
                         "worst": stories[i + worst]})
    return kept


def sft_record(tokenizer, prompt: str, story: str, cut: bool) -> dict:
    """One fine-tuning example as token ids and loss mask: the prompt as generation formats it,
    the story, and end-of-sequence only when the story ended by itself. SFTTrainer would end
    every completion with EOS, and a story the budget cut (then trimmed to its last sentence)
    would teach the policy to stop there: a RAFT child on the SmolLM2 starter wrote 74 tokens
    a story against its parent's 95 (README, closed loop)."""
    prompt_text, completion = prompt_and_story(tokenizer, prompt, story)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    story_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not cut:
        story_ids = [*story_ids, tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + story_ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(story_ids)}


def run(ctx: JobContext) -> JobResult:
    """Sample, keep the best of k, fine-tune; `iterations` times; then measure on held-out prompts."""
    p, store, settings, progress = ctx.params, ctx.store, ctx.settings, ctx.progress
    base = chosen_model(store, p.base, "base policy")
    reward_record = chosen_model(store, p.reward_model, "reward model", reward=True)
    train_texts, eval_texts = prompt_split(store, p.prompt_source, p.prompts)
    device = resolve_device(settings.device)
    decoding = Decoding.from_dict({
        "max_new_tokens": settings.max_new_tokens, **scoring.sampling_decoding(base.decoding),
        **({"max_new_tokens": p.max_new_tokens} if p.max_new_tokens is not None else {}),
    })
    started = time.perf_counter()
    progress(0.0, f"loading {base.name} and the reward model {reward_record.name}")
    model, tokenizer = load_trainable_lm(base.source, settings.hub_token, padding_side="left")
    use_lora, learning_rate = lora_and_rate(model, p.lora, p.learning_rate)
    scorer = scoring.load_reward_scorer(reward_record, device)
    model.to(device)
    eval_prompts = [t for t in eval_texts for _ in range(EVAL_SAMPLES_PER_PROMPT)]
    before = _sample(model, tokenizer, eval_prompts, decoding, settings, EVAL_SEED)
    reward_before = statistics.fmean(scorer(eval_prompts, [s.text for s in before]))
    rounds, resume = [], ctx.resume_from  # a checkpoint belongs to the first round not yet recorded
    for number in range(1, p.iterations + 1):
        record_file = ctx.output_dir / f"round-{number}.json"
        if record_file.is_file():  # finished by an earlier run of this job
            rounds.append(json.loads(record_file.read_text(encoding="utf-8")))
            continue
        if rounds:
            model, _ = load_trainable_lm(str(ctx.output_dir / f"round-{number - 1}"), settings.hub_token)
            model.to(device)
        share = 0.85 / p.iterations
        start = 0.05 + share * (number - 1)
        kept, summary = _keep_winners(ctx, model, tokenizer, scorer, train_texts, decoding, number, start)
        progress(start + share * 0.3, f"round {number}: fine-tuning on {len(kept)} of {len(train_texts)} prompts")
        update = _preference_tune if p.objective == "dpo" else _fine_tune
        trained, training = update(ctx, model, tokenizer, kept, learning_rate, use_lora, start + share * 0.3,
                                   share * 0.7, resume)
        resume = None
        ctx.save_model(model_writer(trained, tokenizer), f"round-{number}")
        rounds.append({**summary, **training})
        record_file.write_text(json.dumps(rounds[-1]), encoding="utf-8")
        for old in [*ctx.output_dir.glob("checkpoint-*"), ctx.output_dir / f"round-{number - 1}"]:
            shutil.rmtree(old, ignore_errors=True)  # the saved round replaces them
        del model, trained
        gc.collect()

    policy_dir = ctx.output_dir / f"round-{p.iterations}"
    progress(0.92, f"measuring the new policy on {len(eval_texts)} held-out prompts")
    child, _ = load_trainable_lm(str(policy_dir), settings.hub_token)
    parent, _ = load_trainable_lm(base.source, settings.hub_token)
    child.to(device).eval()
    parent.to(device).eval()
    stories = [s.text for s in _sample(child, tokenizer, eval_prompts, decoding, settings, EVAL_SEED)]
    reward_after = statistics.fmean(scorer(eval_prompts, stories))
    kl = sampled_kl(child, parent, tokenizer, eval_prompts, stories, decoding.temperature)
    metrics = {
        "prompts": len(train_texts),
        "samples": sum(r["samples"] for r in rounds),
        "kept": sum(r["kept"] for r in rounds),
        "reward_mean_samples": statistics.fmean(r["reward_mean_samples"] for r in rounds),
        "reward_mean_kept": statistics.fmean(r["reward_mean_kept"] for r in rounds),
        "train_loss": rounds[-1]["train_loss"],
        "steps": sum(r["steps"] for r in rounds),
        "epochs": p.epochs,
        "iterations": p.iterations,
        "seconds": round(time.perf_counter() - started, 1),
        "eval_prompts": len(eval_texts),
        "reward_before": reward_before,
        "reward_after": reward_after,
        "reward_gain": reward_after - reward_before,
        "kl": kl,
        "k": p.k,
        "margin": p.margin,
        "objective": p.objective,
        **({"beta": p.beta} if p.objective == "dpo" else {}),
        "reward_model": reward_record.id,
        "reward_model_name": reward_record.name,
        "learning_rate": learning_rate,
        "lora": use_lora,
        **({"lora_r": p.lora_r} if use_lora else {}),
        "max_new_tokens": decoding.max_new_tokens,
    }
    progress(0.98, f"reward {reward_before:.3f} -> {reward_after:.3f}, KL {kl:.4f}")
    return JobResult(models=[ModelSpec(
        name=f"{base.name}-raft" + ("-dpo" if p.objective == "dpo" else ""), kind=MODEL_KIND, path=policy_dir,
        parent=base, metrics=metrics,
    )])


def _sample(model, tokenizer, prompts: list[str], decoding: Decoding, settings, seed: int) -> list[Story]:
    """Stories from a copy of the model in the arena's generation dtype (what the pool writes
    with, and faster); the float32 model itself is left for training and the KL measure."""
    dtype = generation_dtype(model.device)
    writer = model if model.dtype == dtype else copy.deepcopy(model).to(dtype)
    writer.eval()
    tokenizer.padding_side = "left"  # batched generation pads on the left
    stories = generate_stories(writer, tokenizer, prompts, decoding, batch_size=settings.generation_batch_size,
                               seed=seed)
    del writer
    return stories


def _keep_winners(ctx: JobContext, model, tokenizer, scorer, texts: list[str], decoding: Decoding, number: int,
                  start: float) -> tuple[list[dict], dict]:
    """A round's kept stories and their summary. The samples and scores are written to the
    job folder first, so a resumed job trains on the same data its checkpoint saw."""
    p = ctx.params
    samples_file = ctx.output_dir / f"samples-round-{number}.json"
    if samples_file.is_file():
        sampled = json.loads(samples_file.read_text(encoding="utf-8"))
    else:
        ctx.progress(start, f"round {number}: sampling {p.k} stories for each of {len(texts)} prompts")
        prompts = [t for t in texts for _ in range(p.k)]
        stories = _sample(model, tokenizer, prompts, decoding, ctx.settings, p.seed + number)
        texts = [s.text for s in stories]
        sampled = {"prompts": prompts, "stories": texts, "cut": [s.truncated for s in stories],
                   "rewards": [float(r) for r in scorer(prompts, texts)]}
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        samples_file.write_text(json.dumps(sampled), encoding="utf-8")
    kept = winners(sampled["prompts"], sampled["stories"], sampled["rewards"], p.k, p.margin, sampled.get("cut"))
    if not kept:
        raise ValueError(
            f"RAFT kept no stories in round {number}: for none of {len(texts)} prompts did the best of {p.k} "
            f"beat their mean reward by more than margin {p.margin:g} (the reward model scores them alike); "
            "train the reward model on more votes, raise k, or lower margin."
        )
    return kept, {
        "samples": len(sampled["stories"]), "kept": len(kept),
        "reward_mean_samples": statistics.fmean(sampled["rewards"]),
        "reward_mean_kept": statistics.fmean(w["reward"] for w in kept),
    }


def _fine_tune(ctx: JobContext, model, tokenizer, kept: list[dict], learning_rate: float, use_lora: bool,
               start: float, share: float, resume: str | None):
    """Supervised fine-tuning on the kept stories (loss on the story tokens only); returns
    the trained model (LoRA merged) and the round's training figures."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    p = ctx.params
    records = [sft_record(tokenizer, w["prompt"], w["story"], w["cut"]) for w in kept]
    tokenizer.padding_side = "right"
    config = SFTConfig(completion_only_loss=True, **_round_args(ctx, model, len(records), learning_rate))
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
        callbacks=[ProgressCallback(ctx.progress, start=start, share=share)],
        peft_config=lora_config(model, p.lora_r) if use_lora else None,
    )
    return _train_round(trainer, tokenizer, use_lora, resume)


def _round_args(ctx: JobContext, model, records: int, learning_rate: float) -> dict:
    """The trainer arguments both objectives share."""
    p = ctx.params
    return dict(
        output_dir=str(ctx.output_dir),
        num_train_epochs=p.epochs,
        max_steps=p.max_steps or -1,
        per_device_train_batch_size=p.batch_size,
        learning_rate=learning_rate,
        max_length=context_length(model),  # a re-tokenised story plus its end can pass the context
        seed=p.seed,
        save_steps=math.ceil(records / p.batch_size),  # about once per epoch
        **trainer_device_args(ctx.settings),
    )


def _train_round(trainer, tokenizer, use_lora: bool, resume: str | None):
    """Train, merge LoRA, and return the model with the round's training figures."""
    output = trainer.train(resume_from_checkpoint=resume)
    tokenizer.padding_side = "left"  # as generation (and the saved tokenizer) expects
    trained = trainer.model.merge_and_unload() if use_lora else trainer.model
    return trained, {"train_loss": float(output.training_loss), "steps": trainer.state.global_step}


def _preference_tune(ctx: JobContext, model, tokenizer, kept: list[dict], learning_rate: float, use_lora: bool,
                     start: float, share: float, resume: str | None):
    """The dpo objective: DPOTrainer on (best, worst) of each kept prompt; returns the trained
    model (LoRA merged) and the round's training figures, as _fine_tune does."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    p = ctx.params
    records = [{"prompt": w["prompt"], "chosen": w["story"], "rejected": w["worst"]} for w in kept]
    tokenizer.padding_side = "right"
    config = DPOConfig(beta=p.beta, precompute_ref_log_probs=False,
                       **_round_args(ctx, model, len(records), learning_rate))
    reference = None if use_lora else AutoModelForCausalLM.from_pretrained(
        str(model.name_or_path), dtype=torch.float32).to(model.device)
    trainer = DPOTrainer(
        model=model, ref_model=reference, args=config, train_dataset=preference_dataset(records, tokenizer),
        processing_class=tokenizer, callbacks=[ProgressCallback(ctx.progress, start=start, share=share)],
        peft_config=lora_config(model, p.lora_r) if use_lora else None,
    )
    return _train_round(trainer, tokenizer, use_lora, resume)


KIND = Kind(
    name="raft", params=RaftParams, run=run, needs_base_policy=True,
    model_params={"base": "base policy", "reward_model": "reward model"},
    help="Rejection-sampling fine-tuning (RAFT/ReST): best of k stories under the reward model, then SFT on them.",
)
