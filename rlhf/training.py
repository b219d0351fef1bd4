"""What every training kind shares: job progress, device flags, preference data, lineage.

Each kind (reward, dpo, rloo, pretrain, ...) is one module with one entry point
`train_<kind>(settings, params, progress) -> ModelRecord`; this module keeps them from
repeating the plumbing around the TRL / transformers trainer they use.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_torch_bf16_gpu_available

from rlhf.export import preference_records
from rlhf.models import resolve_device
from rlhf.policies import queue_pool
from rlhf.progress import JobProgress
from rlhf.settings import Settings
from storage import models
from storage.db import Store
from storage.models import ModelRecord


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


def resume_checkpoint(output_dir: Path) -> str | None:
    """The last checkpoint a previous run of this job left, to resume from."""
    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def split_by_hash(records: list[dict], eval_fraction: float, key: str = "vote_id") -> tuple[list[dict], list[dict]]:
    """A held-out split that stays put as votes arrive (by hash of each record's id)."""
    def held_out(record: dict) -> bool:
        digest = hashlib.sha256(str(record[key]).encode()).digest()
        return digest[0] / 256 < eval_fraction

    train = [r for r in records if not held_out(r)]
    evaluation = [r for r in records if held_out(r)]
    return train, evaluation


def preference_data(
    store: Store, min_pairs: int = 2, eval_fraction: float = 0.2, sources: tuple[str, ...] = ("human",)
) -> tuple[list[dict], list[dict], dict]:
    """Train and held-out preference records plus a snapshot (hash, count) for lineage."""
    records = list(preference_records(store, sources=sources))
    if len(records) < min_pairs:
        raise ValueError(f"Training needs at least {min_pairs} decided votes; there are {len(records)}.")
    train, evaluation = split_by_hash(records, eval_fraction)
    if not train:
        train, evaluation = evaluation, []
    return train, evaluation, data_snapshot(records)


def data_snapshot(records: list[dict]) -> dict:
    ids = ",".join(str(r.get("vote_id", i)) for i, r in enumerate(records))
    return {"data_hash": hashlib.sha256(ids.encode()).hexdigest()[:16], "votes_used": len(records)}


def register_checkpoint(
    store: Store, settings: Settings, *, name: str, kind: str, path: Path, parent: ModelRecord | None,
    job_id: int | None, metrics: dict, policy: bool = True, decoding: dict | None = None,
) -> ModelRecord:
    """Add a trained model with its lineage; a policy also gets its story pool queued,
    and pair selection then favours it against its parent. Decoding defaults to the parent's."""
    record = models.add_model(
        store.db, unique_name(store, name), kind, path=str(path), parent_id=parent.id if parent else None,
        decoding=decoding if decoding is not None else (parent.decoding if (parent and policy) else {}),
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


def require_model(store: Store, model_id: int | None, what: str) -> ModelRecord:
    if model_id is None:
        raise ValueError(f"Choose a {what}.")
    return models.get_model(store.db, int(model_id))
