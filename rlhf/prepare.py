"""First start: seed prompts, the starter model, two starter policies and their pool.

Idempotent, so a restart (or `python -m rlhf init` twice) only does what is missing.
"""

from __future__ import annotations

from rlhf import safety
from rlhf.models import build_tiny_starter, prepare_starter
from rlhf.pool import Progress, fill_pool
from rlhf.prompts import SEED_PROMPTS
from rlhf.settings import Settings
from rlhf.starters import STARTER_POLICIES
from storage import models, prompts
from storage.db import Store
from storage.models import ModelRecord

MODEL_SHARE = 0.1
# Stories of this many prompts for every policy come first, so the arena serves its first pair
# after one short batch instead of after a full one (bench/first_start.py).
FIRST_PAIR_PROMPTS = 1


def starter_policies(store: Store, settings: Settings, progress: Progress) -> list[ModelRecord]:
    """Build or convert the starter once and register its policies; returns them."""
    db = store.db
    prompts.add_prompts(db, SEED_PROMPTS, source="seed")
    screen_prompts(store)
    if settings.starter == "tiny":
        path = build_tiny_starter(settings.models_dir, SEED_PROMPTS)
    else:
        path = prepare_starter(settings.models_dir, lambda f, m: progress(f * MODEL_SHARE, m))
    records = []
    for name, decoding in STARTER_POLICIES[settings.starter]:
        record = models.get_model_by_name(db, name)
        if record is None:
            record = models.add_model(db, name, "starter", path=str(path), decoding=decoding)
        records.append(record)
    return records


def screen_prompts(store: Store) -> dict[int, str]:
    """Run the content check over the seed prompts not yet blocked (cheap: one classifier pass),
    blocking those unfit for children; returns {prompt id: reason} of the newly blocked."""
    unchecked = [p for p in prompts.list_prompts(store.db, sources=["seed"]) if p["blocked_reason"] is None]
    verdicts = safety.ContentCheck(store).many([p["text"] for p in unchecked])
    reasons = {p["id"]: reason for p, reason in zip(unchecked, verdicts) if reason}
    prompts.block_prompts(store.db, reasons)
    return reasons


def prepare(store: Store, settings: Settings, progress: Progress) -> list[ModelRecord]:
    progress(0.0, "preparing the starter model")
    policies = starter_policies(store, settings, progress)
    ids = [p.id for p in policies]
    progress(MODEL_SHARE, "writing the first pair of stories")
    fill_pool(store, settings, ids, min(FIRST_PAIR_PROMPTS, settings.pool_prompts or FIRST_PAIR_PROMPTS),
              lambda f, m: progress(MODEL_SHARE, "writing the first pair of stories"))
    fill_pool(
        store, settings, ids, settings.pool_prompts,
        lambda f, m: progress(MODEL_SHARE + (1 - MODEL_SHARE) * f, m),
    )
    return policies

