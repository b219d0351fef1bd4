"""What every training kind shares: job progress, device flags, preference data, lineage.

Each kind (reward, dpo, rloo, pretrain, ...) is one module with `run(ctx) -> JobResult`
(rlhf.runner); this module keeps them from repeating the plumbing around the TRL /
transformers trainer they use.
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

from transformers import TrainerCallback
from transformers.utils import is_torch_bf16_gpu_available

from rlhf.export import preference_records
from rlhf.heldout import split_by_prompt
from rlhf.models import context_length, resolve_device
from rlhf.params import param
from rlhf.policies import queue_pool
from rlhf.progress import JobProgress
from rlhf.scoring import sampling_decoding
from rlhf.settings import Settings
from storage import models, weak
from storage.db import Store
from storage.models import ModelRecord

LORA_THRESHOLD_PARAMS = 50_000_000
# Policy learning rates when a job gives none: small steps for all weights (RL on a noisy
# learned reward needs them too); LoRA's few weights take larger ones.
LORA_LEARNING_RATE = 5e-5
FULL_LEARNING_RATE = 5e-6


class ProgressCallback(TrainerCallback):
    """Reports trainer steps and logged losses to the job (and stops on cancel)."""

    def __init__(self, progress: JobProgress, start: float = 0.0, share: float = 1.0):
        self.progress, self.start, self.share = progress, start, share

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items() if isinstance(v, int | float) and math.isfinite(v)}
        if logs:
            self.progress.log_metrics(state.global_step, logs)
        fraction = state.global_step / max(1, state.max_steps)
        loss = logs.get("loss")
        text = f"step {state.global_step}/{state.max_steps}" + (f" · loss {loss:.4f}" if loss is not None else "")
        self.progress(self.start + self.share * fraction, text)


def trainer_device_args(settings: Settings) -> dict:
    """TrainingArguments that fit the device: TRL defaults to bf16, which CPUs lack."""
    device = resolve_device(settings.device)
    cuda = device.type == "cuda"
    return {
        "use_cpu": not cuda,
        "bf16": cuda and is_torch_bf16_gpu_available(),
        "fp16": False,
        "activation_checkpointing": False,
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_total_limit": 1,
        "dataloader_num_workers": 0,
    }




# The `sources` parameter of the kinds that learn from votes: people's votes in the arena,
# imported preference data sets (rlhf.preferences), or both.
VOTE_SOURCES = {"human": ("human",), "import": ("import",), "both": ("human", "import")}


def sources_param():
    return param("human", "which votes to train on: human (the arena's), import (imported data sets) or both",
                 choices=VOTE_SOURCES)


def datasets_param():
    return param(None, "comma-separated names of imported data sets to use (unset: all); needs sources import "
                 "or both")


def dataset_names(sources: str, datasets: str | None) -> tuple[str, ...] | None:
    """The imported data sets a job selects (None: all), checked like an import's name."""
    from rlhf.preferences import check_name

    if datasets is None:
        return None
    if not isinstance(datasets, str):
        raise ValueError(f"datasets must be comma-separated data set names, got {datasets!r}.")
    if "import" not in VOTE_SOURCES[sources]:
        raise ValueError("datasets selects imported data sets: set sources to import or both.")
    names = [n.strip() for n in datasets.split(",") if n.strip()]
    if not names:
        raise ValueError("datasets: name at least one imported data set, or leave it unset for all.")
    for name in names:
        try:
            check_name(name)
        except ValueError as exc:
            raise ValueError(f"datasets: {name!r}: {exc}") from None
    return tuple(names)


def preference_data(
    store: Store, min_pairs: int = 2, eval_fraction: float = 0.2, sources: tuple[str, ...] = ("human",),
    min_annotators: int = 1, datasets: tuple[str, ...] | None = None,
) -> tuple[list[dict], list[dict], dict]:
    """Train and held-out preference records (held out by prompt) plus a snapshot (hash,
    count) for lineage."""
    records = list(preference_records(store, sources=sources, min_annotators=min_annotators, datasets=datasets))
    if len(records) < min_pairs:
        which = "" if sources == ("human",) else f" Sources: {' and '.join(sources)}" + (
            f" ({', '.join(datasets)})." if datasets else ".")
        raise ValueError(f"Training needs at least {min_pairs} decided votes; there are {len(records)}.{which}")
    train, evaluation = split_by_prompt(records, eval_fraction)
    return train, evaluation, data_snapshot(records)


def job_preference_data(store: Store, p) -> tuple[list[dict], list[dict], dict]:
    """preference_data as a job's Params ask for it (min_pairs, eval_fraction, sources,
    datasets, min_annotators)."""
    return preference_data(store, min_pairs=p.min_pairs, eval_fraction=p.eval_fraction,
                           sources=VOTE_SOURCES[p.sources], min_annotators=p.min_annotators,
                           datasets=dataset_names(p.sources, p.datasets))


def steps_for_data(preset_steps: int, cap: int, train_pairs: int, batch_size: int,
                   max_epochs: float | None = None) -> int:
    """A preset's step budget sized by the data: at least one pass over the training pairs
    (a preset that stops short of it has not seen every vote), at most `cap` steps (the
    preset's time on its device) and, when given, at most max_epochs passes."""
    per_epoch = math.ceil(train_pairs / batch_size)
    steps = max(preset_steps, per_epoch)
    if max_epochs is not None:
        steps = min(steps, math.ceil(max_epochs * per_epoch))
    return max(1, min(cap, steps))


def epochs_made(steps: int, batch_size: int, train_pairs: int) -> float | None:
    """Passes over the training pairs that `steps` steps of `batch_size` pairs made."""
    return round(steps * batch_size / train_pairs, 2) if train_pairs else None


def weak_training_pairs(store: Store, threshold: float, weight: float, seed: int = 0) -> list[dict]:
    """Stored weak preferences at or above `threshold` on pairs people have not voted on,
    as training records (prompt, chosen, rejected), each kept with probability `weight`.

    RewardTrainer has no per-example weight; keeping each weak pair with probability w
    makes its expected share of the loss exactly w times a human pair's (an unbiased
    weighted loss, paid for with sampling noise). The draw is seeded: the same data give
    the same training set.
    """
    allowed = weak.weak_votes_clear_of_humans(store.db, threshold)
    rng = random.Random(seed)
    return [r for r in preference_records(store, sources=("weak",))
            if r["vote_id"] in allowed and rng.random() < weight]


def data_snapshot(records: list[dict]) -> dict:
    ids = ",".join(str(r.get("vote_id", i)) for i, r in enumerate(records))
    return {"data_hash": hashlib.sha256(ids.encode()).hexdigest()[:16], "votes_used": len(records)}


def register_checkpoint(
    store: Store, settings: Settings, *, name: str, kind: str, path: Path, parent: ModelRecord | None,
    job_id: int | None, metrics: dict, policy: bool = True, decoding: dict | None = None,
) -> ModelRecord:
    """Add a trained model with its lineage; a policy also gets its story pool queued,
    and pair selection then favours it against its parent. Decoding defaults to the parent's
    sampling settings (not its best-of-k: that reranker belongs to the parent)."""
    record = models.add_model(
        store.db, unique_name(store, name), kind, path=str(path), parent_id=parent.id if parent else None,
        decoding=(decoding if decoding is not None
                  else (sampling_decoding(parent.decoding) if (parent and policy) else {})),
        job_id=job_id, metrics=metrics,
        active=policy,
    )
    if policy:
        queue_pool(store, settings, record.id)
    return record


def unique_name(store: Store, base: str) -> str:
    name, n = base, 2
    while models.get_model_by_name(store.db, name) is not None:
        name, n = f"{base}-{n}", n + 1
    return name


def chosen_model(store: Store, model_id, what: str, reward: bool = False) -> ModelRecord:
    """The model a job parameter names: a story policy, or a reward model with reward=True.
    The error says which id is wrong and why, since it ends up in the Jobs table."""
    if model_id is None:
        raise ValueError(f"Choose a {what}.")
    try:
        record = models.get_model(store.db, int(model_id))
    except LookupError:
        raise ValueError(f"No {what} with id {model_id}.") from None
    if reward and record.kind != "reward":
        raise ValueError(
            f"Model {model_id} ({record.name}) is a {record.kind} policy, not a reward model; "
            "train one with the reward job."
        )
    if not reward and record.kind == "reward":
        raise ValueError(f"Model {model_id} ({record.name}) is a reward model, not a story policy; choose a policy.")
    return record


def load_trainable_lm(source: str, token: str | None, padding_side: str | None = None):
    """A fresh float32 copy of a causal LM to train (never the shared generation cache of
    rlhf.models.load_causal_lm) and its tokenizer, with a pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, token=token, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, token=token)
    if padding_side:
        tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f'The tokenizer of "{source}" has neither a pad nor an eos token.')
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def fitted_max_length(model, params, model_name: str) -> int:
    """The job's max_length, lowered to the model's context; an explicit value that does not fit is an error."""
    context = context_length(model)
    if context and params.max_length > context:
        if "max_length" in params.explicit:
            raise ValueError(f"max_length {params.max_length} exceeds the context of {model_name} ({context} tokens).")
        return context
    return params.max_length


def preference_dataset(records: list[dict], tokenizer):
    """TRL's prompt/chosen/rejected (a datasets.Dataset) in the generation prompt format:
    DPO trains on votes, RAFT's dpo objective on its own best and worst stories."""
    from datasets import Dataset

    from rlhf.generate import prompt_and_story

    rows = []
    for r in records:
        prompt, chosen = prompt_and_story(tokenizer, r["prompt"], r["chosen"])
        rows.append({"prompt": prompt, "chosen": chosen,
                     "rejected": prompt_and_story(tokenizer, r["prompt"], r["rejected"])[1]})
    return Dataset.from_list(rows)


def lora_and_rate(model, lora: bool | None, learning_rate: float | None) -> tuple[bool, float]:
    """Whether to train a LoRA adapter (by default for models over LORA_THRESHOLD_PARAMS)
    and the learning rate that goes with that choice unless the job set one."""
    use_lora = lora if lora is not None else sum(p.numel() for p in model.parameters()) > LORA_THRESHOLD_PARAMS
    return use_lora, learning_rate or (LORA_LEARNING_RATE if use_lora else FULL_LEARNING_RATE)


def lora_config(model, r: int):
    """LoRA on the attention's query/value projections: GPT-2's fused c_attn (a Conv1D,
    weights stored as in x out) or Llama-style q_proj/v_proj; else peft's default targets."""
    import torch
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
    from transformers.pytorch_utils import Conv1D

    leaves = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules()}
    if isinstance(leaves.get("c_attn"), Conv1D):
        targets = ["c_attn"]
    elif isinstance(leaves.get("q_proj"), torch.nn.Linear) and isinstance(leaves.get("v_proj"), torch.nn.Linear):
        targets = ["q_proj", "v_proj"]
    elif model.config.model_type in DEFAULTS:
        targets = list(DEFAULTS[model.config.model_type])
    else:
        raise ValueError(
            f"No known LoRA target modules for model type {model.config.model_type!r}; "
            "train it with lora set to false (full fine-tuning)."
        )
    fan_in_fan_out = any(isinstance(leaves.get(t), Conv1D) for t in targets)
    return LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets,
        fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM",
    )
