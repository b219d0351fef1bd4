"""Scoring stories: reward models and Direct Preference Heads, the pool, best-of-k.

One place for everything that turns (prompt, story) into a number, used by training kinds
(reward, dph, rloo), the pool job and the metrics. A reward model folder keeps
META_FILE (backbone, max length) beside its weights; a DPH folder keeps its head
(HEAD_FILE) and DPH_FILE. Either loads as a Scorer: higher is better, and
P(A better than B) = sigmoid(score_A - score_B).
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf import metric_reward
from rlhf.generate import Decoding, Story, generate_stories, prompt_and_story
from rlhf.models import ModelLoadError, load_causal_lm, resolve_device
from rlhf.params import check_choice
from rlhf.settings import Settings
from storage import models, scores
from storage.db import Store
from storage.models import ModelRecord

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]
SCORE_BATCH = 16
META_FILE = "reward_model.json"


def reward_texts(tokenizer, backbone: str, prompts: Sequence[str], stories: Sequence[str]) -> list[str]:
    """What the reward model reads: the prompt as the policy saw it, then the story."""
    if backbone == "minilm":
        return [f"{p}\n\n{s}" for p, s in zip(prompts, stories)]
    return ["".join(prompt_and_story(tokenizer, p, s)) for p, s in zip(prompts, stories)]


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
                _scorers[key] = head_scorer(record.source, device)
            elif meta["backbone"] == "metrics":  # weights on the story metrics (rlhf.metric_reward)
                _scorers[key] = metric_reward.make_metric_scorer(metric_reward.load(Path(record.source)))
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


# --- Direct Preference Heads ----------------------------------------------------------


HEAD_FILE = "preference_head.safetensors"
DPH_FILE = "dph.json"
FEATURE_BATCH = 16
POOLERS = ("identity", "bert")  # identity, or Linear + tanh as BERT's pooler


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


def last_token_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's hidden state at its last attended position (rows are right-padded)."""
    last = attention_mask.sum(-1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


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


def encode_pair(tokenizer, prompt: str, story: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt (as generation formats it) + story + end token, and the prompt's
    length. Over max_length, the prompt keeps its last half of the room and the story its
    start; the end token always stays, since the head reads its hidden state."""
    head, continuation = prompt_and_story(tokenizer, prompt, story)
    # Chat templates hold their own special tokens (as in generation); others get theirs.
    prompt_ids = tokenizer(head, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    story_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
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


# A policy's decoding may add best-of-k: sample `best_of` stories per prompt and keep the one
# `reranker` scores highest ("head": the DPH head in the policy's own folder; or the id of a
# reward model). Generation itself never sees these keys.
RERANK_KEYS = ("best_of", "reranker")


def sampling_decoding(decoding: Mapping) -> dict:
    """The generation part of a policy's decoding (without its best-of-k keys)."""
    return {k: v for k, v in decoding.items() if k not in RERANK_KEYS}


def reranker(db, policy: ModelRecord, device: torch.device | str, token: str | None = None) -> Scorer:
    """The scorer that picks a best-of-k policy's story among its samples."""
    which = policy.decoding.get("reranker", "head")
    if which == "head":
        return head_scorer(policy.source, device, token)
    return load_reward_scorer(models.get_model(db, int(which)), device)


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


# --- preference pairs as tokens (DPH's LoRA/full modes and DPO's held-out margins) ----------

def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the completion tokens (story + end token) per row."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    return (logps * completion_mask[:, 1:]).sum(-1)


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
