"""Fills the completion pool: every active policy gets a story for each prompt.

Prompts go in batches, and each batch is written for every policy before the next one,
so the first votable pair exists after one batch rather than after a whole pool. A policy
whose checkpoint no longer loads (deleted, corrupt) is skipped with a warning so the
others still get their stories; only when no policy loads does the job fail.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Sequence

from rlhf import safety
from rlhf.generate import Decoding, generate_stories
from rlhf.models import ModelLoadError, load_causal_lm, resolve_device
from rlhf.scoring import best_of_k, reranker, sampling_decoding
from rlhf.settings import Settings
from storage import completions, models
from storage.db import Store

Progress = Callable[[float, str], None]


def fill_pool(
    store: Store, settings: Settings, model_ids: Sequence[int], prompt_limit: int | None,
    progress: Progress, seed: int | None = None, after_batch: Callable[[int], object] | None = None,
    only: Collection[int] | None = None,
) -> int:
    """Generate the missing stories of `model_ids` among the first `prompt_limit` prompts
    (of those, only the ids in `only` when given); `after_batch(policy_id)` runs once each
    batch of a policy's stories is stored."""
    db = store.db
    policies = [models.get_model(db, i) for i in model_ids]
    todo = {
        p.id: {r["id"]: r["text"] for r in completions.prompts_without_completion(db, p.id, prompt_limit)
               if only is None or r["id"] in only}
        for p in policies
    }
    total = sum(len(t) for t in todo.values())
    if total == 0:
        progress(1.0, "pool complete")
        return 0
    prompt_ids = sorted(set().union(*todo.values()))
    device = resolve_device(settings.device)
    done = 0
    skipped: dict[str, str] = {}
    step = settings.generation_batch_size
    unsuitable = safety.ContentCheck(store)  # stories unfit for children are stored but never shown
    for start in range(0, len(prompt_ids), step):
        batch = prompt_ids[start:start + step]
        for policy in policies:
            wanted = [pid for pid in batch if pid in todo[policy.id]]
            if not wanted or policy.name in skipped:
                continue
            try:
                model, tokenizer = load_causal_lm(policy.source, device, settings.hub_token)
            except ModelLoadError as exc:
                skipped[policy.name] = str(exc)
                print(f"warning: skipping policy {policy.name}: {exc}", file=sys.stderr, flush=True)
                if len(skipped) == len(policies):
                    raise ModelLoadError(f"No policy could be loaded: {'; '.join(skipped.values())}") from exc
                continue
            decoding = Decoding.from_dict({"max_new_tokens": settings.max_new_tokens,
                                           **sampling_decoding(policy.decoding)})
            texts, batch_seed = [todo[policy.id][pid] for pid in wanted], None if seed is None else seed + start
            k = policy.decoding.get("best_of")  # keep the best of k samples by the policy's reranker
            if k is None:
                stories = generate_stories(model, tokenizer, texts, decoding, batch_size=step, seed=batch_seed)
            else:
                score = reranker(db, policy, device, settings.hub_token)
                stories = best_of_k(model, tokenizer, texts, decoding, k, score, batch_size=step, seed=batch_seed)
            gen_params = decoding.to_dict() if k is None else {**decoding.to_dict(), "best_of": k}
            for pid, story in zip(wanted, stories):
                completions.add_completion(
                    db, pid, policy.id, story.text[: settings.max_story_chars],
                    gen_params, story.tokens, story.ms, blocked_reason=unsuitable(story.text),
                    truncated=story.truncated,
                )
            if after_batch is not None:
                after_batch(policy.id)
            done += len(wanted)
            progress(done / total, f"{done}/{total} stories written ({policy.name})")
    if skipped:
        progress(1.0, f"{done} stories written; skipped {', '.join(skipped)} (checkpoint does not load)")
    return done
