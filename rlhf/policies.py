"""Adding and switching policies; a new policy's story pool is queued at once."""

from __future__ import annotations

import re
from pathlib import Path

from rlhf.generate import Decoding
from rlhf.models import ModelLoadError, check_loadable
from rlhf.params import json_object
from rlhf.settings import Settings
from storage import jobs as job_rows
from storage import models
from storage.db import Store
from storage.models import ModelRecord

POLICY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,59}$")


def parse_decoding(text: str) -> dict:
    """Decoding settings from a JSON object typed into a form; validated by Decoding."""
    value = json_object(text, "Decoding settings", '{"temperature": 0.8}')
    Decoding.from_dict(value)
    return value


def add_policy(
    store: Store, settings: Settings, name: str, source: str, decoding: dict,
    created_by: int | None = None,
) -> ModelRecord:
    """Register a model by local folder or Hub id after checking it loads; queue its pool."""
    name, source = (name or "").strip(), (source or "").strip()
    if not POLICY_NAME.match(name):
        raise ValueError("Policy names: 1-60 letters, digits, '.', '_' or '-', starting with a letter or digit.")
    if not source:
        raise ValueError("Give a local model folder or a Hugging Face Hub id.")
    Decoding.from_dict(decoding)
    job_rows.check_queue_room(store.db, created_by, settings.max_queued_jobs)
    try:
        source = check_loadable(source, settings.hub_token, settings.protected_paths)
    except ModelLoadError as exc:
        raise ValueError(str(exc)) from exc
    local = Path(source).is_absolute()
    record = models.add_model(
        store.db, name, "local" if local else "hub",
        path=source if local else None, hub_id=None if local else source,
        decoding=decoding,
    )
    queue_pool(store, settings, record.id, created_by)
    return record


def queue_pool(store: Store, settings: Settings, model_id: int, created_by: int | None = None) -> int:
    """Queue a job writing this policy's stories for the pool's prompts."""
    return job_rows.create_job(
        store.db, "generate", {"model_ids": [model_id], "prompts": settings.pool_prompts}, created_by,
        max_queued=settings.max_queued_jobs,
    )


def set_active(store: Store, model_id: int, active: bool) -> ModelRecord:
    return models.set_active(store.db, model_id, active)
