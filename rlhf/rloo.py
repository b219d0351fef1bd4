"""RLHF with RLOO: a policy learns to write stories that a learned reward model scores higher.

TRL 1.16's RLOOTrainer samples `num_generations` stories for each of `prompts_per_step`
prompts per step, scores them with the arena's reward model (rlhf.reward), subtracts a KL
penalty `beta` against the base policy, and uses the leave-one-out mean of the other
stories of the same prompt as the baseline. Prompts come from the prompts table and are
wrapped for the base model the way generation wraps them (chat messages with the
storyteller system prompt for chat-template models, the plain "Story:" cue otherwise).

Models above LORA_THRESHOLD_PARAMS train a LoRA adapter (merged into the weights at the
end), smaller ones train all weights. A fixed held-out set of seed prompts is never
trained on; the reward model's mean score there, for the base and for the new policy with
the same decoding and seed, is the job's headline metric. Checkpoints go to the job's
output folder every few steps, so a re-queued job resumes where it stopped.

Presets (explicit keys override them): "quick" = 32 steps of 2 prompts x 2 stories of 64
tokens, under 10 minutes in all with LoRA on the SmolLM2 starter on 2 CPU cores (measured:
about 16 s per step with a SmolLM2-backbone reward model, plus about 50 s for loading, the
before/after scoring and saving); "full" = 400 steps of 4 prompts x 2 stories, for a GPU.
"""

from __future__ import annotations

import gc
import hashlib
import math
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from rlhf.generate import SYSTEM_PROMPT, Decoding, format_prompt, generate_stories
from rlhf.models import save_atomically, resolve_device
from rlhf.progress import JobProgress
from rlhf.settings import Settings
from rlhf.training import (
    ProgressCallback,
    register_checkpoint,
    resume_checkpoint,
    trainer_device_args,
)
from storage import models
from storage import prompts as prompt_rows
from storage.db import Store
from storage.models import ModelRecord

LORA_THRESHOLD_PARAMS = 50_000_000
PRESETS: dict[str, dict] = {
    "quick": {"max_steps": 32, "prompts_per_step": 2},
    "full": {"max_steps": 400, "prompts_per_step": 4},
}
PROMPT_SOURCES = ("seed", "all")
# RL with a noisy learned reward needs small steps; LoRA's few weights take larger ones.
LORA_LEARNING_RATE = 5e-5
FULL_LEARNING_RATE = 5e-6
HELD_OUT_PROMPTS = 8
EVAL_SAMPLES_PER_PROMPT = 2
EVAL_SEED = 20240501
MAX_CHECKPOINTS = 5  # checkpoints written per run (at least every MAX_SAVE_STEPS steps)
MAX_SAVE_STEPS = 25
POLICY_DIR = "policy"

# Phases of the job's progress bar.
TRAIN_START, TRAIN_SHARE = 0.1, 0.8

# The reward model's interface (rlhf.reward.load_reward_scorer): (prompts, stories) -> scores.
Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}.")


def _check_float(name: str, value, low: float, high: float, low_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if (value <= low if low_open else value < low) or value > high:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}.")


@dataclass(frozen=True)
class RlooParams:
    """An RLOO job's parameters; every value is checked on construction.

    learning_rate, lora and temperature left as None are chosen per model: the learning
    rate by whether LoRA is used, LoRA by the base's size, the temperature (and top_p)
    from the base policy's decoding, which the new policy also inherits.
    """

    base: int
    reward_model: int
    preset: str = "quick"
    beta: float = 0.05
    max_steps: int = PRESETS["quick"]["max_steps"]
    learning_rate: float | None = None
    num_generations: int = 2
    prompts_per_step: int = PRESETS["quick"]["prompts_per_step"]
    max_new_tokens: int = 64
    lora: bool | None = None
    lora_r: int = 8
    prompt_source: str = "seed"
    temperature: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("base", self.base, 1, 2**62)
        _check_int("reward_model", self.reward_model, 1, 2**62)
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}.")
        _check_float("beta", self.beta, 0.0, 10.0, low_open=False)
        _check_int("max_steps", self.max_steps, 1, 1_000_000)
        if self.learning_rate is not None:
            _check_float("learning_rate", self.learning_rate, 0.0, 1.0, low_open=True)
        _check_int("num_generations", self.num_generations, 2, 64)
        _check_int("prompts_per_step", self.prompts_per_step, 1, 256)
        _check_int("max_new_tokens", self.max_new_tokens, 1, 1024)
        if self.lora is not None and not isinstance(self.lora, bool):
            raise ValueError(f"lora must be true or false, got {self.lora!r}.")
        _check_int("lora_r", self.lora_r, 1, 256)
        if self.prompt_source not in PROMPT_SOURCES:
            raise ValueError(f"prompt_source must be one of {', '.join(PROMPT_SOURCES)}, got {self.prompt_source!r}.")
        if self.temperature is not None:
            _check_float("temperature", self.temperature, 0.0, 2.0, low_open=True)
        _check_int("seed", self.seed, 0, 2**32 - 1)

    @classmethod
    def from_dict(cls, params: Mapping) -> RlooParams:
        """Preset budgets, then the explicit keys; unknown keys are an error, None means unset."""
        if not isinstance(params, Mapping):
            raise ValueError(f"RLOO parameters must be a JSON object, got {type(params).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"Unknown RLOO parameter(s): {', '.join(map(str, unknown))} (known: {', '.join(sorted(known))})."
            )
        given = {k: v for k, v in params.items() if v is not None}
        for key in ("base", "reward_model"):
            if key not in given:
                what = "base policy" if key == "base" else "reward model (a model of kind reward)"
                raise ValueError(f"RLOO needs {key}: the id of the {what}.")
        preset = given.get("preset", "quick")
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}.")
        return cls(**{**PRESETS[preset], **given})

    def to_dict(self) -> dict:
        return asdict(self)


def train_rloo(settings: Settings, params: dict, progress: JobProgress) -> ModelRecord:
    """Train the base policy with RLOO against the reward model; register the new policy."""
    p = RlooParams.from_dict(params)
    store = settings.store()
    base = _base_policy(store, p.base)
    reward_record = _reward_model(store, p.reward_model)
    done = _existing_result(store, progress.job_id)
    if done is not None:  # a re-run of a job that already registered its policy
        progress(1.0, f"{done.name} was already registered by this job")
        return done
    train_texts, eval_texts = _prompt_split(store, p.prompt_source)
    device = resolve_device(settings.device)
    decoding = Decoding.from_dict({
        **base.decoding, "max_new_tokens": p.max_new_tokens,
        **({"temperature": p.temperature} if p.temperature is not None else {}),
    })

    progress(0.0, f"loading {base.name} and the reward model {reward_record.name}")
    model, tokenizer = _load_policy(base.source, settings.hub_token)
    n_params = sum(t.numel() for t in model.parameters())
    use_lora = p.lora if p.lora is not None else n_params > LORA_THRESHOLD_PARAMS
    learning_rate = p.learning_rate or (LORA_LEARNING_RATE if use_lora else FULL_LEARNING_RATE)
    from rlhf.reward import load_reward_scorer

    scorer = load_reward_scorer(reward_record, device)

    progress(0.03, f"scoring {base.name} on {len(eval_texts)} held-out prompts")
    model.to(device)
    reward_before = _mean_reward(model, tokenizer, scorer, eval_texts, decoding, settings)

    output_dir = progress.output_dir("rloo")
    resume = resume_checkpoint(output_dir)
    trainer = _trainer(
        settings, p, model, tokenizer, scorer, train_texts, decoding, output_dir, learning_rate,
        use_lora, progress,
    )
    progress(TRAIN_START, f"training {p.max_steps} steps" + (f" (resuming {Path(resume).name})" if resume else ""))
    started = time.perf_counter()
    first_step = int(Path(resume).name.rsplit("-", 1)[-1]) if resume else 0
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - started
    steps = trainer.state.global_step
    steps_run = steps - first_step
    history = list(trainer.state.log_history)

    progress(TRAIN_START + TRAIN_SHARE, "saving the new policy")
    trained = trainer.model.merge_and_unload() if use_lora else trainer.model
    policy_dir = _save_policy(output_dir / POLICY_DIR, trained, tokenizer)
    del trainer, trained, model
    gc.collect()

    progress(0.93, f"scoring the new policy on {len(eval_texts)} held-out prompts")
    new_model, _ = _load_policy(str(policy_dir), settings.hub_token)
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
    progress(0.98, "registering the new policy")
    record = register_checkpoint(
        store, settings, name=f"{base.name}-rloo", kind="rloo", path=policy_dir, parent=base,
        job_id=progress.job_id, metrics=metrics,
    )
    # The policy is saved and registered: the resume checkpoints (optimizer state) can go.
    for checkpoint in output_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)
    progress(1.0, f"{record.name}: reward {reward_before:.3f} -> {reward_after:.3f}")
    return record


def _existing_result(store: Store, job_id: int | None) -> ModelRecord | None:
    if job_id is None:
        return None
    found = [m for m in models.list_models(store.db) if m.job_id == job_id and m.kind == "rloo"]
    return found[0] if found else None


def _base_policy(store: Store, model_id: int) -> ModelRecord:
    try:
        record = models.get_model(store.db, model_id)
    except LookupError:
        raise ValueError(f"No base policy with id {model_id}.") from None
    if record.kind == "reward":
        raise ValueError(
            f"Model {model_id} ({record.name}) is a reward model, not a policy; choose a policy as the base."
        )
    return record


def _reward_model(store: Store, model_id: int) -> ModelRecord:
    try:
        record = models.get_model(store.db, model_id)
    except LookupError:
        raise ValueError(f"No reward model with id {model_id}; train one with the reward job first.") from None
    if record.kind != "reward":
        raise ValueError(
            f"Model {model_id} ({record.name}) is a {record.kind} policy, not a reward model; "
            "set reward_model to the id of a model of kind reward (train one with the reward job)."
        )
    return record


def _prompt_split(store: Store, source: str) -> tuple[list[str], list[str]]:
    """Training prompts and the held-out evaluation prompts, which training never sees.

    The held-out set is the seed prompts with the smallest text hashes, so it stays the same
    as prompts are added and every RLOO job is scored on the same prompts.
    """
    rows = prompt_rows.list_prompts(store.db)
    seed = [r["text"] for r in rows if r["source"] == "seed"]
    pool = [r["text"] for r in rows if source == "all" or r["source"] == "seed"]
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


def _load_policy(source: str, token: str | None):
    """A fresh float32 copy of the model (never the shared generation cache) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, token=token, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, token=token)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f'"{source}" has a tokenizer with neither pad nor eos token.')
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


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


def lora_config(model, r: int):
    """LoRA on the attention's query/value projections (GPT-2's fused c_attn is a Conv1D)."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    leaves = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules()}
    if "q_proj" in leaves and "v_proj" in leaves:
        targets = ["q_proj", "v_proj"]
    elif "c_attn" in leaves:
        targets = ["c_attn"]
    else:
        targets = None  # peft's default for the architecture
    fan_in_fan_out = bool(targets) and any(isinstance(leaves[t], Conv1D) for t in targets)
    return LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
        bias="none", task_type="CAUSAL_LM",
    )


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


def _save_policy(target: Path, model, tokenizer) -> Path:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return save_atomically(target, write)


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
