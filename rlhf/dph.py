"""Direct Preference Heads (DPH): a scalar preference head on a causal LM, trained on the
arena's human preferences; the LM's own output distribution is left as it is.

The head reads h, the LM's final hidden state (after its final norm) at the last token of
the prompt (formatted as generation formats it, rlhf.generate.format_prompt) followed by
the story and the tokenizer's eos token, appended as the designated end token:
r = w . dropout(pool(h)), pool = identity or Linear + tanh ("bert"). The head sits beside
the LM head, never in its path, so with the LM frozen the model writes exactly what its
base writes.

One entry point, `train_dph(settings, params, progress) -> ModelRecord`:

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
  base's weights in head mode), the head (HEAD_FILE) and DPH_FILE with best_of (k). Pool
  generation for it (rlhf.pool) samples k stories per prompt and keeps the one the head
  scores highest, so its pool costs k times a plain policy's. With register_reward
  (default) the same folder is also registered as a reward model (backbone "dph" in
  reward_model.json, parent: the DPH policy): the head scores the story pool, predicts
  live votes and can be RLOO's reward model.
- metrics: train/eval_accuracy, the share of (held-out) pairs whose chosen story the head
  scores higher. Held-out votes beyond max_eval_pairs and training votes beyond
  max_train_pairs are left out.
- cost: quick (head mode) on the SmolLM2-135M starter is one forward pass per distinct
  story among the votes and the pool (features and pool scores share it), about 1.1
  CPU-seconds per 256-token story, then seconds of head training. Measured: 120 votes and
  a pool of 480 stories took about 560 CPU-seconds: about 5 minutes if both cores are
  free (from the CPU time), 16 minutes of wall time on 2 cores shared with two other jobs. The LM-training modes cost a forward
  and backward pass per pair and step on top (see bench/dph.py).
  There are no mid-run checkpoints: a re-queued job starts over unless its model was
  already registered, in which case it only finishes scoring the pool.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rlhf.generate import Decoding, Story, format_prompt, generate_stories
from rlhf.models import load_causal_lm, resolve_device
from rlhf.params import check_choice, check_optional_bool, check_real, check_whole, given_params
from rlhf.progress import JobProgress
from rlhf.settings import Settings
from storage import models, scores
from storage.models import ModelRecord

KIND = "dph"
HEAD_FILE = "preference_head.safetensors"
DPH_FILE = "dph.json"
MODES = ("head", "lora", "full")
OBJECTIVES = ("contrastive", "separable")
POOLERS = ("identity", "bert")
PRESETS = ("quick", "full")
FEATURE_BATCH = 16
NAME_LIMIT = 60
# Per preset and mode. quick/head fits the SmolLM2-135M starter on 2 CPU cores in well under
# 10 minutes (one forward per story); the LM-training modes cost a forward and backward pass
# per pair and step (tens of seconds on 2 cores), hence their few quick steps.
PRESET_VALUES: dict[str, dict[str, dict]] = {
    "quick": {
        "head": {"max_steps": 200, "learning_rate": 1e-3, "batch_size": 16, "max_length": 256,
                 "max_train_pairs": 256, "max_eval_pairs": 64},
        "lora": {"max_steps": 6, "learning_rate": 1e-3, "batch_size": 4, "max_length": 256,
                 "max_train_pairs": 256, "max_eval_pairs": 32},
        "full": {"max_steps": 6, "learning_rate": 1e-3, "batch_size": 4, "max_length": 256,
                 "max_train_pairs": 256, "max_eval_pairs": 32},
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


@dataclass(frozen=True)
class DPHParams:
    """A DPH job's parameters, validated; the preset (per mode) fills what was not given.

    learning_rate is the head's; lm_learning_rate (lora/full) defaults to the LoRA or
    full fine-tuning rate of rlhf.training.
    """

    base: int
    mode: str = "head"
    objective: str = "contrastive"
    label_smoothing: float = 0.0
    pooler: str = "identity"
    dropout: float = 0.1
    w_dph: float = 1.0
    w_dpo: float = 0.0
    beta: float = 0.1
    best_of: int = 4
    preset: str = "quick"
    max_steps: int = PRESET_VALUES["quick"]["head"]["max_steps"]
    learning_rate: float = PRESET_VALUES["quick"]["head"]["learning_rate"]
    lm_learning_rate: float | None = None
    batch_size: int = PRESET_VALUES["quick"]["head"]["batch_size"]
    max_length: int = PRESET_VALUES["quick"]["head"]["max_length"]
    max_train_pairs: int = PRESET_VALUES["quick"]["head"]["max_train_pairs"]
    max_eval_pairs: int = PRESET_VALUES["quick"]["head"]["max_eval_pairs"]
    lora_r: int = 8
    eval_fraction: float = 0.2
    min_pairs: int = 8
    min_annotators: int = 1
    register_reward: bool = True
    explicit: frozenset[str] = frozenset()  # the keys the job gave (not from the preset)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "explicit"]

    @classmethod
    def from_dict(cls, params) -> DPHParams:
        given = given_params("DPH", params, cls.keys())
        preset = check_choice("preset", given.get("preset", "quick"), PRESETS)
        mode = check_choice("mode", given.get("mode", "head"), MODES)
        if "base" not in given:
            raise ValueError("Choose a base policy for DPH (parameter base: a policy id).")
        return cls(**{**PRESET_VALUES[preset][mode], **given, "preset": preset}, explicit=frozenset(given))

    def __post_init__(self) -> None:
        check_whole("base", self.base, 1, 2**62)
        check_choice("objective", self.objective, OBJECTIVES)
        check_real("label_smoothing", self.label_smoothing, 0, 0.49, low_open=False)
        check_choice("pooler", self.pooler, POOLERS)
        check_real("dropout", self.dropout, 0, 0.9, low_open=False)
        check_real("w_dph", self.w_dph, 0, 100)
        check_real("w_dpo", self.w_dpo, 0, 100, low_open=False)
        if self.w_dpo and self.mode == "head":
            raise ValueError("w_dpo trains the LM with DPO: choose mode lora or full (mode head keeps the LM frozen).")
        check_real("beta", self.beta, 0, 10)
        check_whole("best_of", self.best_of, 1, 64)
        check_whole("max_steps", self.max_steps, 1, 1_000_000)
        check_real("learning_rate", self.learning_rate, 0, 0.1)
        if self.lm_learning_rate is not None:
            check_real("lm_learning_rate", self.lm_learning_rate, 0, 0.01)
        check_whole("batch_size", self.batch_size, 1, 1024)
        check_whole("max_length", self.max_length, 16, 32_768)
        check_whole("max_train_pairs", self.max_train_pairs, 1, 10_000_000)
        check_whole("max_eval_pairs", self.max_eval_pairs, 1, 10_000_000)
        check_whole("lora_r", self.lora_r, 1, 512)
        check_real("eval_fraction", self.eval_fraction, 0, 0.5, low_open=False)
        check_whole("min_pairs", self.min_pairs, 2, 10_000_000)
        check_whole("min_annotators", self.min_annotators, 1, 1000)
        check_optional_bool("register_reward", self.register_reward)


# --- the head and the wrapped model ---------------------------------------------------------

class PreferenceHead(nn.Module):
    """r = w . dropout(pool(h)) for final hidden states h; one scalar per row. By hand:
    transformers' sequence-classification heads replace the LM head instead of sitting beside it."""

    def __init__(self, hidden_size: int, pooler: str = "identity", dropout: float = 0.1):
        super().__init__()
        check_choice("pooler", pooler, POOLERS)
        self.pool = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh()) if pooler == "bert" else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / math.sqrt(hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(self.dropout(self.pool(hidden.to(self.score.weight.dtype)))).squeeze(-1)


@dataclass
class DPHOutput:
    logits: torch.Tensor
    rewards: torch.Tensor


def last_token_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's hidden state at its last attended position (rows are right-padded)."""
    last = attention_mask.sum(-1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


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


def save_head(head: PreferenceHead, folder: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(folder / HEAD_FILE))
    (folder / DPH_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def read_dph_meta(folder: str | Path) -> dict | None:
    """The DPH settings saved beside a DPH policy's weights; None for any other folder."""
    path = Path(folder) / DPH_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_head(folder: str | Path, device: torch.device | str = "cpu") -> PreferenceHead:
    from safetensors.torch import load_file

    meta = read_dph_meta(folder)
    if meta is None:
        raise ValueError(f"{folder} holds no preference head ({DPH_FILE} is missing).")
    head = PreferenceHead(meta["hidden_size"], meta["pooler"], meta["dropout"])
    head.load_state_dict(load_file(str(Path(folder) / HEAD_FILE)))
    return head.to(device).eval()


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


def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the completion tokens (story + end token) per row."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    return (logps * completion_mask[:, 1:]).sum(-1)


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

def encode_pair(tokenizer, prompt: str, story: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt (as generation formats it) + story + end token, and the prompt's
    length. Over max_length, the prompt keeps its last half of the room and the story its
    start; the end token always stays, since the head reads its hidden state."""
    head = format_prompt(tokenizer, prompt)
    lead = "" if head[-1:].isspace() else " "  # plain LMs write a space after the "Story:" cue
    # Chat templates hold their own special tokens (as in generation); others get theirs.
    prompt_ids = tokenizer(head, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    story_ids = tokenizer(lead + story, add_special_tokens=False)["input_ids"]
    room = max_length - 1
    if len(prompt_ids) + len(story_ids) > room:
        prompt_ids = prompt_ids[-max(1, room // 2):] if len(prompt_ids) > room // 2 else prompt_ids
        story_ids = story_ids[: room - len(prompt_ids)]
    return prompt_ids + story_ids + [tokenizer.eos_token_id], len(prompt_ids)


class HeadFeatures:
    """Final hidden states at the end token for (prompt, story) pairs, in length-sorted
    right-padded batches; with remember=True each pair is computed once per job."""

    def __init__(self, backbone, tokenizer, max_length: int, device: torch.device, remember: bool = False,
                 batch_size: int = FEATURE_BATCH):
        self.backbone, self.tokenizer, self.max_length = backbone, tokenizer, max_length
        self.device, self.remember, self.batch_size = device, remember, batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.cache: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, prompts: Sequence[str], stories: Sequence[str],
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        if len(prompts) != len(stories):
            raise ValueError(f"{len(prompts)} prompts but {len(stories)} stories.")
        keys = list(zip(prompts, stories))
        found = self.cache if self.remember else {}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        ids = [encode_pair(self.tokenizer, p, s, self.max_length)[0] for p, s in missing]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                width = max(len(ids[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                mask = mask.to(self.device)
                hidden = self.backbone(input_ids=input_ids.to(self.device), attention_mask=mask).last_hidden_state
                for i, state in zip(chunk, last_token_states(hidden, mask).float().cpu()):
                    found[missing[i]] = state
                if progress is not None:
                    progress(min(start + self.batch_size, len(order)), len(order))
        return torch.stack([found[k] for k in keys]) if keys else torch.zeros(0)


Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]
_head_scorers: dict[tuple[str, str], Scorer] = {}
_head_scorers_lock = threading.Lock()


def head_scorer(source: str, device: torch.device | str = "cpu", token: str | None = None) -> Scorer:
    """Scores (prompts, stories) with a DPH folder's head; higher is better. The LM is the
    shared generation copy (rlhf.models.load_causal_lm), so best-of-k sampling and scoring
    hold it once. Loaded once per (folder, device)."""
    device = torch.device(device)
    key = (str(source), str(device))
    with _head_scorers_lock:
        if key not in _head_scorers:
            meta = read_dph_meta(source)
            if meta is None:
                raise ValueError(f"{source} is not a DPH model folder ({DPH_FILE} is missing).")
            model, tokenizer = load_causal_lm(str(source), device, token)
            head = load_head(source, device)
            features = HeadFeatures(model.base_model, tokenizer, meta["max_length"], device)

            def score(prompts: Sequence[str], stories: Sequence[str]) -> list[float]:
                if not prompts and not stories:
                    return []
                with torch.inference_mode():
                    return head(features(prompts, stories).to(device)).float().tolist()

            _head_scorers[key] = score
        return _head_scorers[key]


# --- best-of-k sampling ---------------------------------------------------------------------

def best_of(source: str) -> int | None:
    """k for a DPH policy's folder (it samples k stories and keeps the best), else None."""
    meta = read_dph_meta(source) if source and Path(source).is_dir() else None
    return int(meta["best_of"]) if meta else None


def best_of_k(model, tokenizer, prompts: Sequence[str], decoding: Decoding, k: int, score: Scorer,
              batch_size: int = 8, seed: int | None = None) -> list[Story]:
    """Sample k stories per prompt and keep, per prompt, the one `score` rates highest;
    its ms is the whole cost per prompt (k samples and the scoring)."""
    started = time.perf_counter()
    repeated = [p for p in prompts for _ in range(k)]
    candidates = generate_stories(model, tokenizer, repeated, decoding, batch_size=batch_size, seed=seed)
    rewards = score(repeated, [c.text for c in candidates])
    ms = (time.perf_counter() - started) * 1000 / max(1, len(prompts))
    best = []
    for i in range(len(prompts)):
        winner = max(range(i * k, (i + 1) * k), key=lambda j: rewards[j])
        best.append(replace(candidates[winner], ms=ms))
    return best


# --- training ---------------------------------------------------------------------------------

def _policy_name(base: ModelRecord) -> str:
    suffix = "-dph"
    return re.sub(r"[^A-Za-z0-9._-]", "-", base.name)[: NAME_LIMIT - len(suffix) - 3] + suffix


def _context(lm) -> int | None:
    config = lm.config.get_text_config()
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def token_pairs(tokenizer, records: list[dict], max_length: int) -> list[dict]:
    """Each preference record as chosen and rejected token ids with their prompt lengths."""
    rows = []
    for r in records:
        chosen, chosen_prompt = encode_pair(tokenizer, r["prompt"], r["chosen"], max_length)
        rejected, rejected_prompt = encode_pair(tokenizer, r["prompt"], r["rejected"], max_length)
        rows.append({"chosen": chosen, "chosen_prompt": chosen_prompt,
                     "rejected": rejected, "rejected_prompt": rejected_prompt})
    return rows


def token_collator(pad_id: int) -> Callable[[list[dict]], dict]:
    """Right-padded chosen rows then rejected rows, with the completion (story + end) mask."""
    def collate(rows: list[dict]) -> dict:
        seqs = [(r["chosen"], r["chosen_prompt"]) for r in rows] + [(r["rejected"], r["rejected_prompt"]) for r in rows]
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        completion_mask = torch.zeros((len(seqs), width), dtype=torch.float32)
        for row, (ids, prompt_len) in enumerate(seqs):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            completion_mask[row, prompt_len: len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}

    return collate


def feature_collator(rows: list[dict]) -> dict:
    return {"chosen": torch.stack([r["chosen"] for r in rows]), "rejected": torch.stack([r["rejected"] for r in rows])}


def _run_trainer(settings: Settings, p: DPHParams, objective: DPHObjective, dataset: list[dict], collate,
                 lm_params: list, lm_rate: float | None, output_dir: Path, progress: JobProgress,
                 start: float, share: float, callbacks: Sequence = ()) -> dict:
    """transformers' Trainer on the objective: the head at learning_rate, the LM at lm_rate."""
    from transformers import Trainer, TrainingArguments

    from rlhf.training import ProgressCallback, trainer_device_args

    groups = [{"params": list(objective.head.parameters()), "lr": p.learning_rate}]
    if lm_params:
        groups.append({"params": lm_params, "lr": lm_rate})
    args = TrainingArguments(
        output_dir=str(output_dir),
        **{**trainer_device_args(settings), "save_strategy": "no", "logging_steps": max(1, p.max_steps // 50)},
        max_steps=p.max_steps,
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
        progress(0.5, f"training the head on {len(dataset)} pairs, {p.max_steps} steps")
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
        progress(0.02, f"training the head and the LM ({p.mode}) on {len(train_records)} pairs, {p.max_steps} steps")
        metrics.update(_run_trainer(
            settings, p, objective, token_pairs(tokenizer, train_records, max_length),
            token_collator(tokenizer.pad_token_id), lm_params, lm_rate, output_dir, progress, 0.02, 0.78, callbacks))
        if use_lora:
            lm = lm.merge_and_unload()
        lm.requires_grad_(False)
        lm.to(device).eval()
        features = HeadFeatures(lm.base_model, tokenizer, max_length, device, remember=True)
    return FittedHead(lm=lm, head=head.to(device).eval(), features=features, metrics=metrics)


def head_accuracy(head: PreferenceHead, features: HeadFeatures, records: list[dict]) -> float | None:
    """Share of preference records whose chosen story the head scores higher."""
    if not records:
        return None
    prompts = [r["prompt"] for r in records]
    device = head.score.weight.device
    with torch.inference_mode():
        chosen = head(features(prompts, [r["chosen"] for r in records]).to(device))
        rejected = head(features(prompts, [r["rejected"] for r in records]).to(device))
    return float((chosen > rejected).float().mean())


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


def _finish_requeued(settings: Settings, store, policy: ModelRecord, progress: JobProgress) -> ModelRecord:
    """A re-queued job whose policy is registered: only the pool scores may be missing."""
    from rlhf.reward import score_new_completions

    reward_id = policy.metrics.get("reward_model_id")
    if reward_id is not None:
        score_new_completions(store, settings, reward_model_id=reward_id,
                              progress=lambda f, m: progress(0.9 + 0.1 * f, m))
    progress(1.0, f"model already registered as #{policy.id} {policy.name}")
    return policy


def train_dph(settings: Settings, params: dict, progress: JobProgress) -> ModelRecord:
    """Train a preference head (and optionally the LM) on the human votes; register the
    best-of-k DPH policy and, with register_reward, the head as a reward model."""
    from rlhf.reward import META_FILE
    from rlhf.training import chosen_model, job_result, load_trainable_lm, preference_data, register_checkpoint

    p = DPHParams.from_dict(params)
    store = settings.store()
    done = job_result(store, progress.job_id, KIND)
    if done is not None:
        return _finish_requeued(settings, store, done, progress)
    base = chosen_model(store, p.base, "base policy")
    train_records, eval_records, snapshot = preference_data(
        store, min_pairs=p.min_pairs, eval_fraction=p.eval_fraction, min_annotators=p.min_annotators,
    )
    train_records, eval_records = train_records[: p.max_train_pairs], eval_records[: p.max_eval_pairs]

    progress(0.0, f"loading {base.name}")
    lm, tokenizer = load_trainable_lm(base.source, settings.hub_token)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"The tokenizer of {base.name} has no eos token to end each story with.")
    use_cache = getattr(lm.config, "use_cache", True)
    max_length = p.max_length
    context = _context(lm)
    if context and max_length > context:
        if "max_length" in p.explicit:
            raise ValueError(f"max_length {max_length} exceeds the context of {base.name} ({context} tokens).")
        max_length = context
    output_dir = progress.output_dir(KIND)
    fitted = fit_head(settings, p, lm, tokenizer, train_records, eval_records, max_length, base.source,
                      output_dir, progress)
    lm, head = fitted.lm, fitted.head

    progress(0.8, f"evaluating on {len(eval_records)} held-out pairs")
    train_accuracy = head_accuracy(head, fitted.features, train_records)
    eval_accuracy = head_accuracy(head, fitted.features, eval_records)

    progress(0.85, "saving the model")
    lm.config.use_cache = use_cache
    lm.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    save_head(head, output_dir, {"best_of": p.best_of, "pooler": p.pooler, "dropout": p.dropout,
                                 "hidden_size": lm.config.get_text_config().hidden_size, "max_length": max_length})
    if p.register_reward:
        (output_dir / META_FILE).write_text(json.dumps({"backbone": "dph", "max_length": max_length}), encoding="utf-8")

    metrics = {
        **snapshot, **fitted.metrics,
        "mode": p.mode, "objective": p.objective, "label_smoothing": p.label_smoothing, "pooler": p.pooler,
        "dropout": p.dropout, "w_dph": p.w_dph, "w_dpo": p.w_dpo, "beta": p.beta if p.w_dpo else None,
        "best_of": p.best_of, "preset": p.preset, "learning_rate": p.learning_rate,
        "lora_r": p.lora_r if p.mode == "lora" else None, "batch_size": p.batch_size, "max_length": max_length,
        "train_pairs": len(train_records), "eval_pairs": len(eval_records),
        "train_accuracy": train_accuracy, "eval_accuracy": eval_accuracy,
    }
    policy = register_checkpoint(
        store, settings, name=_policy_name(base), kind=KIND, path=output_dir, parent=base,
        job_id=progress.job_id, metrics=metrics,
    )
    if p.register_reward:
        reward = register_checkpoint(
            store, settings, name=f"reward-{policy.name}", kind="reward", path=output_dir, parent=policy,
            job_id=progress.job_id, metrics={**metrics, "backbone": "dph"}, policy=False,
        )
        policy = models.update_metrics(store.db, policy.id, {"reward_model_id": reward.id})
        progress(0.9, "scoring the story pool with the head")
        scored = _score_pool(store, reward, head, fitted.features, lambda f, m: progress(0.9 + 0.1 * f, m))
        models.update_metrics(store.db, reward.id, {"pool_scored": scored})
    eval_text = f"{eval_accuracy:.0%} of {len(eval_records)}" if eval_accuracy is not None else "no held-out pairs"
    progress(1.0, f"registered #{policy.id} {policy.name}: held-out accuracy {eval_text}")
    return policy
