"""The starter policies and whether a first start still has preparing to do.

Kept apart from rlhf.prepare (which needs torch and transformers) so the app can decide and
queue the prepare job within a second of starting, before its own UI imports (bench/first_start.py).
"""

from __future__ import annotations

from rlhf.settings import Settings
from storage import completions, models, prompts
from storage import jobs as job_rows
from storage.db import Store

# The same weights with two decoding settings are two policies: enough for a first arena.
# No token 6-gram twice in a story: a sentence cannot come back word for word, so SmolLM2 does
# not loop (bench/stories.py; README "Stories worth judging").
STARTER_POLICIES = {
    "smollm2": (("smollm2-t0.7", {"temperature": 0.7, "top_p": 0.9, "no_repeat_ngram_size": 6}),
                ("smollm2-t1.0", {"temperature": 1.0, "top_p": 0.95, "no_repeat_ngram_size": 6})),
    "tiny": (("tiny-t0.7", {"temperature": 0.7, "top_p": 0.9}),
             ("tiny-t1.0", {"temperature": 1.0, "top_p": 0.95})),
}


def needs_prepare(store: Store, settings: Settings) -> bool:
    """True unless the starter policies exist with a full pool, or preparation is under way."""
    db = store.db
    if any(j["status"] in job_rows.ACTIVE for j in job_rows.list_jobs(db, limit=5, kind="prepare")):
        return False
    if prompts.prompt_count(db) == 0:
        return True
    for name, _ in STARTER_POLICIES[settings.starter]:
        record = models.get_model_by_name(db, name)
        if record is None or completions.prompts_without_completion(db, record.id, settings.pool_prompts):
            return True
    return False
