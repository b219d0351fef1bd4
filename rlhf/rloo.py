"""RLHF with RLOO: a policy learns to write stories that a learned reward model scores higher.

TRL 1.16's RLOOTrainer samples `num_generations` stories for each of `prompts_per_step`
prompts per step, scores them with the arena's reward model (rlhf.reward), subtracts a KL
penalty `beta` against the base policy, and uses the leave-one-out mean of the other
stories of the same prompt as the baseline. Prompts come from the prompts table
(`prompt_source`: the seed prompts, all, or only those evolved by the teams job) and are
wrapped for the base model the way generation wraps them (chat messages with the
storyteller system prompt for chat-template models, the plain "Story:" cue otherwise).

Models above LORA_THRESHOLD_PARAMS train a LoRA adapter (merged into the weights at the
end), smaller ones train all weights. A fixed held-out set of seed prompts is never
trained on; the reward model's mean score there, for the base and for the new policy with
the same decoding and seed, is the job's headline metric. Checkpoints go to the job's
output folder every few steps, so a re-queued job resumes where it stopped.

Presets (explicit keys override them): "quick" = 24 steps of 2 prompts x 2 stories of 64
tokens with LoRA, sized for the SmolLM2 starter on 2 CPU cores (measured in the README's
figures); "full" = 400 steps of 4 prompts x 2 stories, for a GPU.
"""

from __future__ import annotations

import gc
import hashlib
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from rlhf import scoring
from rlhf.generate import SYSTEM_PROMPT, Decoding, format_prompt, generate_stories
from rlhf.models import resolve_device
from rlhf.params import MODEL_ID_RANGE, JobParams, check_field, param
from rlhf.runner import JobContext, JobResult, Kind, ModelSpec, model_writer
from rlhf.scoring import Scorer
from rlhf.settings import Settings
from rlhf.training import (
    ProgressCallback,
    chosen_model,
    load_trainable_lm,
    lora_and_rate,
    lora_config,
    trainer_device_args,
)
from storage import prompts as prompt_rows
from storage.db import Store

PRESETS: dict[str, dict] = {
    "quick": {"max_steps": 24, "prompts_per_step": 2},
    "full": {"max_steps": 400, "prompts_per_step": 4},
}
PROMPT_SOURCES = ("seed", "all", "teams")  # teams: the prompts evolved by rlhf.teams
HELD_OUT_PROMPTS = 8
EVAL_SAMPLES_PER_PROMPT = 2
EVAL_SEED = 20240501
MAX_CHECKPOINTS = 5  # checkpoints written per run (at least every MAX_SAVE_STEPS steps)
MAX_SAVE_STEPS = 25
POLICY_DIR = "policy"

# Phases of the job's progress bar.
TRAIN_START, TRAIN_SHARE = 0.1, 0.8

@dataclass(frozen=True)
class RlooParams(JobParams):
    """An RLOO job's parameters; every value is checked on construction.

    learning_rate, lora and temperature left as None are chosen per model: the learning
    rate by whether LoRA is used, LoRA by the base's size, the temperature (and top_p)
    from the base policy's decoding, which the new policy also inherits.
    """

    LABEL: ClassVar[str] = "RLOO"
    REQUIRED: ClassVar[dict] = {
        "base": "RLOO needs base: the id of the base policy.",
        "reward_model": "RLOO needs reward_model: the id of the reward model (a model of kind reward).",
    }

    base: int = param(help="the policy to train (and the KL reference)", low=1, high=MODEL_ID_RANGE[1])
    reward_model: int = param(help="the reward model (or DPH head) that scores its stories", low=1,
                              high=MODEL_ID_RANGE[1])
    preset: str = param("quick", "step budget: quick (minutes on CPU) or full (a GPU)", choices=PRESETS)
    beta: float = param(0.05, "KL penalty against the base policy", low=0.0, high=10.0)
    max_steps: int = param(PRESETS["quick"]["max_steps"], "optimizer steps", low=1, high=1_000_000)
    learning_rate: float | None = param(None, "unset: 5e-5 with LoRA, 5e-6 for all weights", low=0.0, high=1.0,
                                        low_open=True)
    num_generations: int = param(2, "stories per prompt (the leave-one-out baseline needs 2)", low=2, high=64)
    prompts_per_step: int = param(PRESETS["quick"]["prompts_per_step"], "prompts per step", low=1, high=256)
    max_new_tokens: int = param(64, "story length in tokens while training", low=1, high=1024)
    lora: bool | None = param(None, "train a LoRA adapter (unset: for models over 50 M parameters)")
    lora_r: int = param(8, "LoRA rank", low=1, high=256)
    prompt_source: str = param("seed", "training prompts: the seed prompts, all, or those the teams job evolved",
                               choices=PROMPT_SOURCES)
    temperature: float | None = param(None, "sampling temperature (unset: the base policy's)", low=0.0, high=2.0,
                                      low_open=True)
    seed: int = param(0, "random seed", low=0, high=2**32 - 1)

    @classmethod
    def preset_values(cls, given: dict) -> dict:
        return PRESETS[check_field(cls, "preset", given.get("preset", "quick"))]


def run(ctx: JobContext) -> JobResult:
    """Train the base policy with RLOO against the reward model."""
    p, store, settings, progress = ctx.params, ctx.store, ctx.settings, ctx.progress
    base = chosen_model(store, p.base, "base policy")
    reward_record = chosen_model(store, p.reward_model, "reward model", reward=True)
    train_texts, eval_texts = _prompt_split(store, p.prompt_source)
    device = resolve_device(settings.device)
    decoding = Decoding.from_dict({
        **scoring.sampling_decoding(base.decoding), "max_new_tokens": p.max_new_tokens,
        **({"temperature": p.temperature} if p.temperature is not None else {}),
    })

    progress(0.0, f"loading {base.name} and the reward model {reward_record.name}")
    model, tokenizer = load_trainable_lm(base.source, settings.hub_token, padding_side="left")
    use_lora, learning_rate = lora_and_rate(model, p.lora, p.learning_rate)

    scorer = scoring.load_reward_scorer(reward_record, device)

    progress(0.03, f"scoring {base.name} on {len(eval_texts)} held-out prompts")
    model.to(device)
    reward_before = _mean_reward(model, tokenizer, scorer, eval_texts, decoding, settings)

    trainer = _trainer(
        settings, p, model, tokenizer, scorer, train_texts, decoding, ctx.output_dir, learning_rate,
        use_lora, progress,
    )
    resume = ctx.resume_from
    progress(TRAIN_START, f"training {p.max_steps} steps" + (f" (resuming {Path(resume).name})" if resume else ""))
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - started
    steps = trainer.state.global_step
    steps_run = steps - ctx.resumed_step
    history = list(trainer.state.log_history)

    progress(TRAIN_START + TRAIN_SHARE, "saving the new policy")
    trained = trainer.model.merge_and_unload() if use_lora else trainer.model
    policy_dir = ctx.save_model(model_writer(trained, tokenizer), POLICY_DIR)
    del trainer, trained, model
    gc.collect()

    progress(0.93, f"scoring the new policy on {len(eval_texts)} held-out prompts")
    new_model, _ = load_trainable_lm(str(policy_dir), settings.hub_token, padding_side="left")
    new_model.to(device)
    reward_after = _mean_reward(new_model, tokenizer, scorer, eval_texts, decoding, settings)
    del new_model

    metrics = {
        "reward_before": reward_before,
        "reward_after": reward_after,
        "reward_gain": reward_after - reward_before,
        **_training_metrics(history),
        "steps": steps,
        "beta": p.beta,
        "reward_model": reward_record.id,
        "reward_model_name": reward_record.name,
        "learning_rate": learning_rate,
        "lora": use_lora,
        **({"lora_r": p.lora_r} if use_lora else {}),
        "num_generations": p.num_generations,
        "prompts_per_step": p.prompts_per_step,
        "max_new_tokens": p.max_new_tokens,
        "temperature": decoding.temperature,
        "top_p": decoding.top_p,
        "preset": p.preset,
        "prompt_source": p.prompt_source,
        "train_prompts": len(train_texts),
        "eval_prompts": len(eval_texts),
        "eval_stories": len(eval_texts) * EVAL_SAMPLES_PER_PROMPT,
        "seconds_per_step": train_seconds / steps_run if steps_run else None,
    }
    progress(0.98, f"reward {reward_before:.3f} -> {reward_after:.3f}")
    return JobResult(models=[ModelSpec(
        name=f"{base.name}-rloo", kind="rloo", path=policy_dir, parent=base, metrics=metrics,
    )])


def _prompt_split(store: Store, source: str) -> tuple[list[str], list[str]]:
    """Training prompts and the held-out evaluation prompts, which training never sees.

    The held-out set is the seed prompts with the smallest text hashes, so it stays the same
    as prompts are added and every RLOO job is scored on the same prompts.
    """
    rows = prompt_rows.list_prompts(store.db)
    seed = [r["text"] for r in rows if r["source"] == "seed"]
    pool = [r["text"] for r in rows if source in ("all", r["source"])]
    candidates = seed or pool
    n_eval = min(HELD_OUT_PROMPTS, len(candidates) // 4)
    held_out = sorted(candidates, key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:n_eval] if n_eval else []
    held_out_set = set(held_out)
    train = [t for t in pool if t not in held_out_set]
    if not held_out:  # too few prompts for a separate held-out set: score on training prompts
        held_out = pool[:HELD_OUT_PROMPTS]
    if not train:
        raise ValueError(
            f"RLOO needs {source} prompts to train on and there are none; add prompts first."
        )
    return train, held_out


def _mean_reward(model, tokenizer, scorer: Scorer, texts: list[str], decoding: Decoding, settings: Settings) -> float:
    """Mean reward-model score of the model's stories for `texts` (fixed seed, same decoding)."""
    prompts = [t for t in texts for _ in range(EVAL_SAMPLES_PER_PROMPT)]
    model.eval()
    stories = generate_stories(
        model, tokenizer, prompts, decoding, batch_size=settings.generation_batch_size, seed=EVAL_SEED,
    )
    with torch.no_grad():
        scores = [float(s) for s in scorer(prompts, [s.text for s in stories])]
    return statistics.fmean(scores)


def _completion_text(completion) -> str:
    """A TRL completion as plain text: a string, or a list of chat messages."""
    if isinstance(completion, str):
        return completion.strip()
    return "".join(m.get("content") or "" for m in completion if isinstance(m, Mapping)).strip()


def reward_function(scorer: Scorer) -> Callable[..., list[float]]:
    """Wrap a (prompts, stories) scorer as a TRL reward function.

    The reward model sees the prompt as the annotator saw it (the dataset's `prompt_text`
    column, not the chat-formatted prompt) and the story as plain text.
    """

    def reward_model(prompts, completions, prompt_text=None, **kwargs) -> list[float]:
        texts = list(prompt_text) if prompt_text is not None else [_completion_text(p) for p in prompts]
        stories = [_completion_text(c) for c in completions]
        with torch.no_grad():
            return [float(s) for s in scorer(texts, stories)]

    return reward_model


def _trainer_prompt(tokenizer, text: str):
    """The dataset's prompt: chat messages for chat-template models (TRL applies the template
    the way rlhf.generate does), else the plain prompt with its story cue."""
    if tokenizer.chat_template:
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
    return format_prompt(tokenizer, text)


def _trainer(settings, p: RlooParams, model, tokenizer, scorer, train_texts, decoding, output_dir,
             learning_rate, use_lora, progress):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    dataset = Dataset.from_list(
        [{"prompt": _trainer_prompt(tokenizer, t), "prompt_text": t} for t in train_texts]
    )
    save_steps = max(1, min(MAX_SAVE_STEPS, math.ceil(p.max_steps / MAX_CHECKPOINTS)))
    config = RLOOConfig(
        output_dir=str(output_dir),
        max_steps=p.max_steps,
        per_device_train_batch_size=p.prompts_per_step * p.num_generations,
        gradient_accumulation_steps=1,
        num_generations=p.num_generations,
        max_completion_length=p.max_new_tokens,
        beta=p.beta,
        learning_rate=learning_rate,
        temperature=decoding.temperature,
        top_p=decoding.top_p,
        repetition_penalty=decoding.repetition_penalty,
        disable_dropout=True,
        seed=p.seed,
        save_steps=save_steps,
        **trainer_device_args(settings),
    )
    return RLOOTrainer(
        model=model,
        reward_funcs=reward_function(scorer),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[ProgressCallback(progress, start=TRAIN_START, share=TRAIN_SHARE)],
        peft_config=lora_config(model, p.lora_r) if use_lora else None,
    )


def _training_metrics(history: list[dict]) -> dict:
    """Mean KL and the reward model's mean score on training stories, early vs late."""
    def values(key: str) -> list[float]:
        return [float(h[key]) for h in history if isinstance(h.get(key), int | float) and math.isfinite(h[key])]

    out: dict = {}
    kl = values("kl")
    if kl:
        out["kl"] = statistics.fmean(kl)
        out["kl_last"] = kl[-1]
    reward = values("reward")
    if reward:
        window = max(1, len(reward) // 5)
        out["train_reward_first"] = statistics.fmean(reward[:window])
        out["train_reward_last"] = statistics.fmean(reward[-window:])
    return out


KIND = Kind(
    name="rloo", params=RlooParams, run=run, needs_base_policy=True,
    model_params={"base": "base policy", "reward_model": "reward model"},
    help="RLHF with RLOO and a reward model (set reward_model). Quick: 24 steps, sized for the starter on 2 CPU cores.",
)
