"""Direct Preference Heads (DPH): a scalar preference head on a causal LM, trained on the
arena's human preferences; the LM's own output distribution is left as it is.

The head reads h, the LM's final hidden state (after its final norm) at the last token of
the prompt (formatted as generation formats it, rlhf.generate.format_prompt) followed by
the story and the tokenizer's eos token, appended as the designated end token:
r = w . dropout(pool(h)), pool = identity or Linear + tanh ("bert"). The head sits beside
the LM head, never in its path, so with the LM frozen the model writes exactly what its
base writes.

The `dph` training kind (rlhf.runner: `run(ctx) -> JobResult`):

- modes: "head" (default) trains the head alone on frozen LM features, computed once per
  (prompt, story) and cached, so a step costs almost nothing; "lora" and "full" train the
  head together with a LoRA adapter (merged afterwards) or all LM weights. Those modes can
  add a conservative DPO term on the LM (w_dpo > 0; the reference is the adapter-disabled
  model with LoRA, a frozen copy otherwise). The DPH losses never need a reference forward.
- objectives, with label smoothing e (the share of labels assumed flipped):
  separable   L = -(1-e) log s(r_w) - e log s(-r_w) - (1-e) log s(-r_l) - e log s(r_l)
  contrastive L = -(1-e) log s(r_w - r_l) - e log s(r_l - r_w)
  total = w_dph * L + w_dpo * cDPO, where cDPO is the contrastive form on
  beta * (log-ratio chosen - log-ratio rejected). Written by hand below: no library has
  the DPH losses or head, and TRL's sigmoid DPO loss ignores label smoothing.
- the result is a policy of kind "dph", a child of the base: its folder holds the LM (the
  base's weights in head mode) and the head (rlhf.scoring: HEAD_FILE, DPH_FILE). Its
  decoding says best_of k, reranked by its head: pool generation (rlhf.pool) samples k
  stories per prompt and keeps the one the head scores highest, so its pool costs k times
  a plain policy's. With register_reward
  (default) the same folder is also registered as a reward model (backbone "dph" in
  reward_model.json, parent: the DPH policy): the head scores the story pool, predicts
  live votes and can be RLOO's reward model.
- data: decided votes of the chosen `sources` (human, imported data sets, or both), held
  out by prompt. Without an explicit max_steps the preset's steps are sized by the data:
  at least one pass over the training pairs, at most STEP_CAPS.
- metrics: train_accuracy, the share of training pairs whose chosen story the head scores
  higher; `heldout`, rlhf.heldout.pairwise_report of head(chosen) - head(rejected) on the
  held-out pairs (accuracy, 95% interval, trivial baselines); `epochs`, the passes made.
  Held-out votes beyond max_eval_pairs and training votes beyond max_train_pairs are left out.
- pool: with register_reward and score_pool the head also scores the existing pool. Off by
  default, as for the reward kind (rlhf.reward: new stories are scored as they are written,
  the held-out report measures the head): a pool story costs one more LM forward, and the
  pool is larger than the votes' stories.
- cost: quick (head mode) is one forward pass per distinct story among the votes and the
  pool (features and pool scores share it), then seconds of head training; the LM-training
  modes cost a forward and backward pass per pair and step on top (figures: README, and
  bench/dph.py). There are no mid-run checkpoints: a re-queued job starts over unless its
  models were already registered, in which case it only finishes scoring the pool.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rlhf.heldout import pairwise_report
from rlhf.models import resolve_device
from rlhf.params import MODEL_ID_RANGE, JobParams, check_field, param
from rlhf.progress import JobProgress
from rlhf.runner import JobContext, JobResult, Kind, ModelSpec
from rlhf.scoring import (
    META_FILE,
    POOLERS,
    HeadFeatures,
    PreferenceHead,
    completion_logps,
    last_token_states,
    load_head,
    sampling_decoding,
    save_head,
    score_new_completions,
    token_collator,
    token_pairs,
)
from rlhf.settings import Settings
from rlhf.training import (
    dataset_names,
    datasets_param,
    epochs_made,
    job_preference_data,
    sources_param,
    steps_for_data,
)
from storage import models, scores
from storage.models import ModelRecord

MODEL_KIND = "dph"
MODES = ("head", "lora", "full")
OBJECTIVES = ("contrastive", "separable")
PRESETS = ("quick", "full")
NAME_LIMIT = 60
# Per preset and mode. quick/head fits the SmolLM2-135M starter on 2 CPU cores in well under
# 10 minutes (one forward per story); the LM-training modes cost a forward and backward pass
# per pair and step (tens of seconds on 2 cores), hence their few quick steps.
PRESET_VALUES: dict[str, dict[str, dict]] = {
    "quick": {
        "head": {"max_steps": 200, "learning_rate": 1e-3, "batch_size": 16, "max_length": 256,
                 "max_train_pairs": 256, "max_eval_pairs": 64},
        "lora": {"max_steps": 6, "learning_rate": 1e-3, "batch_size": 4, "max_length": 256,
                 "max_train_pairs": 128, "max_eval_pairs": 32},
        "full": {"max_steps": 6, "learning_rate": 1e-3, "batch_size": 4, "max_length": 256,
                 "max_train_pairs": 128, "max_eval_pairs": 32},
    },
    "full": {
        "head": {"max_steps": 2000, "learning_rate": 5e-4, "batch_size": 32, "max_length": 512,
                 "max_train_pairs": 100_000, "max_eval_pairs": 2000},
        "lora": {"max_steps": 500, "learning_rate": 5e-4, "batch_size": 8, "max_length": 512,
                 "max_train_pairs": 100_000, "max_eval_pairs": 1000},
        "full": {"max_steps": 500, "learning_rate": 5e-4, "batch_size": 8, "max_length": 512,
                 "max_train_pairs": 100_000, "max_eval_pairs": 1000},
    },
}
# The most steps a preset's data-sized budget may take, per mode (quick lora/full: tens of
# CPU-seconds a step, so one pass over their 128 pairs).
STEP_CAPS = {"quick": {"head": 400, "lora": 32, "full": 32}, "full": {"head": 20_000, "lora": 5000, "full": 5000}}


@dataclass(frozen=True)
class DPHParams(JobParams):
    """A DPH job's parameters, validated; the preset (per mode) fills what was not given.

    learning_rate is the head's; lm_learning_rate (lora/full) defaults to the LoRA or
    full fine-tuning rate of rlhf.training.
    """

    LABEL: ClassVar[str] = "DPH"
    REQUIRED: ClassVar[dict] = {"base": "Choose a base policy for DPH (parameter base: a policy id)."}

    base: int = param(help="the policy whose LM the head reads", low=1, high=MODEL_ID_RANGE[1])
    mode: str = param("head", "head: train the head on the frozen LM; lora / full: train the LM too", choices=MODES)
    objective: str = param("contrastive", "contrastive (Bradley-Terry on the margin) or separable (each reward "
                           "on its side of 0)", choices=OBJECTIVES)
    label_smoothing: float = param(0.0, "assumed share of flipped labels", low=0, high=0.49)
    pooler: str = param("identity", "identity, or bert (Linear + tanh) before the head", choices=POOLERS)
    dropout: float = param(0.1, "dropout before the head", low=0, high=0.9)
    w_dph: float = param(1.0, "weight of the DPH loss", low=0, high=100, low_open=True)
    w_dpo: float = param(0.0, "weight of a conservative DPO term on the LM (modes lora and full)", low=0, high=100)
    beta: float = param(0.1, "the DPO term's beta", low=0, high=10, low_open=True)
    best_of: int = param(4, "the policy samples this many stories per prompt and keeps the head's best",
                         low=1, high=64)
    preset: str = param("quick", "step budget: quick (minutes on CPU) or full (a GPU)", choices=PRESETS)
    max_steps: int = param(PRESET_VALUES["quick"]["head"]["max_steps"], "optimizer steps", low=1, high=1_000_000)
    learning_rate: float = param(PRESET_VALUES["quick"]["head"]["learning_rate"], "the head's learning rate", low=0,
                                 high=0.1, low_open=True)
    lm_learning_rate: float | None = param(None, "the LM's (lora/full; unset: the LoRA or full rate)", low=0,
                                           high=0.01, low_open=True)
    batch_size: int = param(PRESET_VALUES["quick"]["head"]["batch_size"], "preference pairs per step", low=1, high=1024)
    max_length: int = param(PRESET_VALUES["quick"]["head"]["max_length"], "tokens of prompt + story", low=16,
                            high=32_768)
    max_train_pairs: int = param(PRESET_VALUES["quick"]["head"]["max_train_pairs"], "training votes used at most",
                                 low=1, high=10_000_000)
    max_eval_pairs: int = param(PRESET_VALUES["quick"]["head"]["max_eval_pairs"], "held-out votes evaluated at most",
                                low=1, high=10_000_000)
    lora_r: int = param(8, "LoRA rank (mode lora)", low=1, high=512)
    eval_fraction: float = param(0.2, "share of votes held out for evaluation", low=0, high=0.5)
    min_pairs: int = param(8, "decided votes needed to train", low=2, high=10_000_000)
    min_annotators: int = param(1, "only story pairs judged by at least this many people", low=1, high=1000)
    register_reward: bool = param(True, "also register the head as a reward model (predicts votes)")
    score_pool: bool = param(False, "with register_reward: the head also scores the existing story pool (live "
                             "predictions for votes on older stories)")
    sources: str = sources_param()
    datasets: str | None = datasets_param()

    @classmethod
    def preset_values(cls, given: dict) -> dict:
        preset = check_field(cls, "preset", given.get("preset", "quick"))
        return {**PRESET_VALUES[preset][check_field(cls, "mode", given.get("mode", "head"))], "preset": preset}

    def __post_init__(self) -> None:
        super().__post_init__()
        dataset_names(self.sources, self.datasets)
        if self.w_dpo and self.mode == "head":
            raise ValueError("w_dpo trains the LM with DPO: choose mode lora or full (mode head keeps the LM frozen).")

    def steps_for(self, train_pairs: int) -> int:
        """An explicit max_steps as is; else the preset's, sized by the data (steps_for_data)."""
        if "max_steps" in self.explicit:
            return self.max_steps
        return steps_for_data(self.max_steps, STEP_CAPS[self.preset][self.mode], train_pairs, self.batch_size)


# --- the head and the wrapped model ---------------------------------------------------------


@dataclass
class DPHOutput:
    logits: torch.Tensor
    rewards: torch.Tensor


class DirectPreferenceHeadModel(nn.Module):
    """A causal LM plus a preference head reading its last hidden state. The logits are
    the LM's own: the head only adds `rewards`."""

    def __init__(self, lm, head: PreferenceHead):
        super().__init__()
        self.lm, self.head = lm, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> DPHOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                      logits_to_keep=logits_to_keep)
        rewards = self.head(last_token_states(out.hidden_states[-1], attention_mask))
        return DPHOutput(logits=out.logits, rewards=rewards)

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> DirectPreferenceHeadModel:
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        return cls(lm, load_head(folder)).eval()


# --- the losses (by hand: no library has them) ----------------------------------------------

def separable_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Each reward on its own side of 0: chosen positive, rejected negative (smoothed)."""
    e = smoothing
    per_pair = -((1 - e) * F.logsigmoid(r_chosen) + e * F.logsigmoid(-r_chosen)
                 + (1 - e) * F.logsigmoid(-r_rejected) + e * F.logsigmoid(r_rejected))
    return per_pair.mean()


def contrastive_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Bradley-Terry on the reward margin, with label smoothing."""
    margin = r_chosen - r_rejected
    return -((1 - smoothing) * F.logsigmoid(margin) + smoothing * F.logsigmoid(-margin)).mean()


def conservative_dpo_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float,
                          smoothing: float = 0.0) -> torch.Tensor:
    """cDPO: the smoothed sigmoid loss on beta * (log-ratio chosen - log-ratio rejected),
    log-ratios being log pi(y|x) - log pi_ref(y|x)."""
    return contrastive_loss(beta * chosen_logratio, beta * rejected_logratio, smoothing)


DPH_LOSSES = {"separable": separable_loss, "contrastive": contrastive_loss}


class DPHObjective(nn.Module):
    """What the Trainer minimises: w_dph * DPH loss on the head's rewards, plus w_dpo *
    cDPO on the LM. Batches hold the chosen rows, then the rejected rows: cached features
    (`chosen`, `rejected`) in head mode, token ids otherwise."""

    def __init__(self, head: PreferenceHead, p: DPHParams, model: DirectPreferenceHeadModel | None = None,
                 reference=None):
        super().__init__()
        self.head, self.model, self.reference = head, model, reference
        self.dph_loss = DPH_LOSSES[p.objective]
        self.smoothing, self.w_dph, self.w_dpo, self.beta = p.label_smoothing, p.w_dph, p.w_dpo, p.beta

    def forward(self, chosen=None, rejected=None, input_ids=None, attention_mask=None, completion_mask=None):
        if input_ids is None:
            rewards = self.head(torch.cat([chosen, rejected]))
        else:
            out = self.model(input_ids, attention_mask, logits_to_keep=0 if self.w_dpo else 1)
            rewards = out.rewards
        r_chosen, r_rejected = rewards.chunk(2)
        loss = self.w_dph * self.dph_loss(r_chosen, r_rejected, self.smoothing)
        if self.w_dpo:
            logratio = completion_logps(out.logits, input_ids, completion_mask) - self._reference_logps(
                input_ids, attention_mask, completion_mask)
            chosen_ratio, rejected_ratio = logratio.chunk(2)
            loss = loss + self.w_dpo * conservative_dpo_loss(chosen_ratio, rejected_ratio, self.beta, self.smoothing)
        return {"loss": loss, "rewards": rewards.detach()}

    @torch.no_grad()
    def _reference_logps(self, input_ids, attention_mask, completion_mask):
        if self.reference is None:  # LoRA: the base model is the adapter-disabled network
            with self.model.lm.disable_adapter():
                logits = self.model.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        else:
            logits = self.reference(input_ids=input_ids, attention_mask=attention_mask).logits
        return completion_logps(logits, input_ids, completion_mask)


# --- inputs and features ------------------------------------------------------------------


# --- best-of-k sampling ---------------------------------------------------------------------


# --- training ---------------------------------------------------------------------------------

def _policy_name(base: ModelRecord) -> str:
    suffix = "-dph"
    return re.sub(r"[^A-Za-z0-9._-]", "-", base.name)[: NAME_LIMIT - len(suffix) - 3] + suffix


def feature_collator(rows: list[dict]) -> dict:
    return {"chosen": torch.stack([r["chosen"] for r in rows]), "rejected": torch.stack([r["rejected"] for r in rows])}


def _run_trainer(settings: Settings, p: DPHParams, objective: DPHObjective, dataset: list[dict], collate,
                 lm_params: list, lm_rate: float | None, output_dir: Path, progress: JobProgress,
                 start: float, share: float, callbacks: Sequence = ()) -> dict:
    """transformers' Trainer on the objective: the head at learning_rate, the LM at lm_rate."""
    from transformers import Trainer, TrainingArguments

    from rlhf.training import ProgressCallback, trainer_device_args

    max_steps = p.steps_for(len(dataset))
    groups = [{"params": list(objective.head.parameters()), "lr": p.learning_rate}]
    if lm_params:
        groups.append({"params": lm_params, "lr": lm_rate})
    args = TrainingArguments(
        output_dir=str(output_dir),
        **{**trainer_device_args(settings), "save_strategy": "no", "logging_steps": max(1, max_steps // 50)},
        max_steps=max_steps,
        per_device_train_batch_size=p.batch_size,
        learning_rate=p.learning_rate,
        lr_scheduler_type="linear",
        remove_unused_columns=False,
        seed=0,
    )
    objective.to(resolve_device(settings.device))
    trainer = Trainer(
        model=objective, args=args, train_dataset=dataset, data_collator=collate,
        optimizers=(torch.optim.AdamW(groups, weight_decay=0.0), None),
        callbacks=[ProgressCallback(progress, start=start, share=share), *callbacks],
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = trainer.state.global_step
    return {
        "steps": steps, "train_seconds": round(seconds, 2),
        "seconds_per_step": seconds / steps if steps else None,
        "train_loss": result.training_loss if math.isfinite(result.training_loss) else None,
        "train_loss_last": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
    }


@dataclass
class FittedHead:
    """A trained head, the LM it reads (frozen, eval mode) and that LM's feature cache."""

    lm: nn.Module
    head: PreferenceHead
    features: HeadFeatures
    metrics: dict


def fit_head(settings: Settings, p: DPHParams, lm, tokenizer, train_records: list[dict], eval_records: list[dict],
             max_length: int, base_source: str, output_dir: Path, progress: JobProgress,
             callbacks: Sequence = ()) -> FittedHead:
    """Train the head (mode head: on cached features of the frozen LM, the held-out stories'
    features computed in the same pass) or the head and the LM (lora / full, with the cDPO
    term when w_dpo > 0); progress goes from 0.02 to 0.8. `callbacks` go to the Trainer."""
    from rlhf.training import lora_and_rate, lora_config

    device = resolve_device(settings.device)
    with torch.random.fork_rng(devices=[]):  # the same head for the same job, whatever ran before
        torch.manual_seed(0)
        head = PreferenceHead(lm.config.get_text_config().hidden_size, p.pooler, p.dropout)
    metrics: dict = {"lm_learning_rate": None, "feature_seconds": 0.0}
    if p.mode == "head":
        lm.requires_grad_(False)
        lm.to(device).eval()
        features = HeadFeatures(lm.base_model, tokenizer, max_length, device, remember=True)
        texts = [(r["prompt"], s) for r in train_records + eval_records for s in (r["chosen"], r["rejected"])]
        started = time.perf_counter()
        features([t[0] for t in texts], [t[1] for t in texts],
                 progress=lambda n, total: progress(0.02 + 0.48 * n / total, f"LM features {n}/{total} stories"))
        metrics["feature_seconds"] = round(time.perf_counter() - started, 2)
        prompts = [r["prompt"] for r in train_records]
        chosen = features(prompts, [r["chosen"] for r in train_records])
        rejected = features(prompts, [r["rejected"] for r in train_records])
        dataset = [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected)]
        progress(0.5, f"training the head on {len(dataset)} pairs, {p.steps_for(len(dataset))} steps")
        metrics.update(_run_trainer(settings, p, DPHObjective(head, p), dataset, feature_collator, [], None,
                                    output_dir, progress, 0.5, 0.3, callbacks))
    else:
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM
        from trl.trainer.utils import disable_dropout_in_model

        use_lora, lm_rate = lora_and_rate(lm, p.mode == "lora", p.lm_learning_rate)
        metrics["lm_learning_rate"] = lm_rate
        disable_dropout_in_model(lm)  # the head's dropout is the only noise; DPO log-ratios stay exact
        reference = None
        if use_lora:
            lm = get_peft_model(lm, lora_config(lm, p.lora_r))
        elif p.w_dpo:
            reference = AutoModelForCausalLM.from_pretrained(base_source, token=settings.hub_token, dtype=torch.float32)
            reference.requires_grad_(False).eval()
            disable_dropout_in_model(reference)
        objective = DPHObjective(head, p, DirectPreferenceHeadModel(lm, head), reference)
        lm_params = [q for q in lm.parameters() if q.requires_grad]
        progress(0.02, f"training the head and the LM ({p.mode}) on {len(train_records)} pairs, "
                       f"{p.steps_for(len(train_records))} steps")
        metrics.update(_run_trainer(
            settings, p, objective, token_pairs(tokenizer, train_records, max_length),
            token_collator(tokenizer.pad_token_id), lm_params, lm_rate, output_dir, progress, 0.02, 0.78, callbacks))
        if use_lora:
            lm = lm.merge_and_unload()
        lm.requires_grad_(False)
        lm.to(device).eval()
        features = HeadFeatures(lm.base_model, tokenizer, max_length, device, remember=True)
    return FittedHead(lm=lm, head=head.to(device).eval(), features=features, metrics=metrics)


def head_margins(head: PreferenceHead, features: HeadFeatures, records: list[dict]) -> list[float]:
    """head(chosen) - head(rejected) per preference record."""
    if not records:
        return []
    prompts = [r["prompt"] for r in records]
    device = head.score.weight.device
    with torch.inference_mode():
        chosen = head(features(prompts, [r["chosen"] for r in records]).to(device))
        rejected = head(features(prompts, [r["rejected"] for r in records]).to(device))
    return (chosen - rejected).tolist()


def head_accuracy(head: PreferenceHead, features: HeadFeatures, records: list[dict]) -> float | None:
    """Share of preference records whose chosen story the head scores higher."""
    margins = head_margins(head, features, records)
    return sum(m > 0 for m in margins) / len(margins) if margins else None


def _score_pool(store, reward: ModelRecord, head: PreferenceHead, features: HeadFeatures,
                progress: Callable[[float, str], None]) -> int:
    """Score every pool story the head's reward model has not scored, reusing features."""
    todo = scores.unscored_completions(store.db, reward.id)
    chunk = 64
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        with torch.inference_mode():
            values = head(features([r["prompt"] for r in part], [r["text"] for r in part]).to(head.score.weight.device))
        scores.save_scores(store.db, reward.id, {r["id"]: float(v) for r, v in zip(part, values)})
        progress((start + len(part)) / len(todo), f"scored {start + len(part)}/{len(todo)} pool stories")
    return len(todo)


def run(ctx: JobContext) -> JobResult:
    """Train a preference head (and optionally the LM) on the chosen votes: the best-of-k
    DPH policy and, with register_reward, the head as a reward model."""
    from rlhf.training import chosen_model, fitted_max_length, load_trainable_lm

    p, store, settings, progress, output_dir = ctx.params, ctx.store, ctx.settings, ctx.progress, ctx.output_dir
    base = chosen_model(store, p.base, "base policy")
    train_records, eval_records, snapshot = job_preference_data(store, p)
    train_records, eval_records = train_records[: p.max_train_pairs], eval_records[: p.max_eval_pairs]

    progress(0.0, f"loading {base.name}")
    lm, tokenizer = load_trainable_lm(base.source, settings.hub_token)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"The tokenizer of {base.name} has no eos token to end each story with.")
    use_cache = getattr(lm.config, "use_cache", True)
    max_length = fitted_max_length(lm, p, base.name)
    fitted = fit_head(settings, p, lm, tokenizer, train_records, eval_records, max_length, base.source,
                      output_dir, progress)
    lm, head = fitted.lm, fitted.head

    progress(0.8, f"evaluating on {len(eval_records)} held-out pairs")
    train_accuracy = head_accuracy(head, fitted.features, train_records)
    heldout = pairwise_report(eval_records, head_margins(head, fitted.features, eval_records))

    progress(0.85, "saving the model")
    lm.config.use_cache = use_cache

    def write(folder: Path) -> None:
        lm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        save_head(head, folder, {"pooler": p.pooler, "dropout": p.dropout,
                                 "hidden_size": lm.config.get_text_config().hidden_size, "max_length": max_length})
        if p.register_reward:
            (folder / META_FILE).write_text(json.dumps({"backbone": "dph", "max_length": max_length}), encoding="utf-8")

    folder = ctx.save_model(write)

    metrics = {
        **snapshot, **fitted.metrics,
        "mode": p.mode, "objective": p.objective, "label_smoothing": p.label_smoothing, "pooler": p.pooler,
        "dropout": p.dropout, "w_dph": p.w_dph, "w_dpo": p.w_dpo, "beta": p.beta if p.w_dpo else None,
        "best_of": p.best_of, "preset": p.preset, "learning_rate": p.learning_rate,
        "lora_r": p.lora_r if p.mode == "lora" else None, "batch_size": p.batch_size, "max_length": max_length,
        "train_pairs": len(train_records), "train_accuracy": train_accuracy, "heldout": heldout,
        "epochs": epochs_made(fitted.metrics["steps"], p.batch_size, len(train_records)),
    }
    decoding = {**sampling_decoding(base.decoding), "best_of": p.best_of, "reranker": "head"}
    policy = ModelSpec(name=_policy_name(base), kind=MODEL_KIND, path=folder, parent=base, metrics=metrics,
                       decoding=decoding)
    specs = [policy]
    if p.register_reward:
        specs.append(ModelSpec(name=f"reward-{policy.name}", kind="reward", path=folder, parent=policy,
                               metrics={**metrics, "backbone": "dph"}, policy=False))
        ctx.memo["score_pool"] = lambda reward, report: _score_pool(store, reward, head, fitted.features, report)
    return JobResult(models=specs, message=f"{policy.name}: {heldout['summary']}")


def evaluate(ctx: JobContext, records: list[ModelRecord]) -> dict:
    """With score_pool, score the pool with the head's reward model (if one was registered):
    with the features this run computed, or, on a re-run, with the head loaded from its folder."""
    reward = next((r for r in records if r.kind == "reward"), None)
    if reward is None:
        return {}
    if not ctx.params.score_pool:
        return {"reward_model_id": reward.id}
    progress = ctx.progress

    def report(fraction: float, message: str) -> None:
        progress(0.9 + 0.1 * fraction, message)

    progress(0.9, "scoring the story pool with the head")
    if "score_pool" in ctx.memo:
        scored = ctx.memo["score_pool"](reward, report)
    else:
        scored = score_new_completions(ctx.store, ctx.settings, reward_model_id=reward.id, progress=report)
    models.update_metrics(ctx.store.db, reward.id, {"pool_scored": scored})
    return {"reward_model_id": reward.id}


KIND = Kind(
    name="dph", params=DPHParams, run=run, evaluate=evaluate, needs_base_policy=True, learns_from_votes=True,
    model_params={"base": "base policy"},
    help="Direct Preference Head: a scalar head on the base policy's last hidden state (LM untouched in the "
         "default mode head). Registers a best-of-k policy and the head as a reward model.",
)
