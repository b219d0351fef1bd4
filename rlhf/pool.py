"""Fills the completion pool: every active policy gets a story for each prompt.

Prompts go in batches, and each batch is written for every policy before the next one,
so the first votable pair exists after one batch rather than after a whole pool. Policies
that share weights (the starter's two decodings) write a batch in one generate call. A policy
whose checkpoint no longer loads (deleted, corrupt) is skipped with a warning so the
others still get their stories; only when no policy loads does the job fail.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Sequence

from rlhf import safety
from rlhf.generate import Decoding, Story, generate_rows, generate_stories
from rlhf.models import ModelLoadError, generation_dtype, load_causal_lm, resolve_device
from rlhf.scoring import best_of_k, reranker, sampling_decoding
from rlhf.settings import Settings
from storage import completions, models
from storage.db import Store
from storage.models import ModelRecord

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
        batch_seed = None if seed is None else seed + start
        for group in _shared_weights(policies, settings):
            work = [(p, [pid for pid in batch if pid in todo[p.id]]) for p in group if p.name not in skipped]
            work = [(p, wanted) for p, wanted in work if wanted]
            if not work:
                continue
            try:
                model, tokenizer = load_causal_lm(work[0][0].source, device, settings.hub_token,
                                                  generation_dtype(device))
            except ModelLoadError as exc:
                for policy, _ in work:
                    skipped[policy.name] = str(exc)
                    print(f"warning: skipping policy {policy.name}: {exc}", file=sys.stderr, flush=True)
                if len(skipped) == len(policies):
                    raise ModelLoadError(f"No policy could be loaded: {'; '.join(skipped.values())}") from exc
                continue
            texts = {p.id: [todo[p.id][pid] for pid in wanted] for p, wanted in work}
            written = _write(db, model, tokenizer, [p for p, _ in work], texts, settings, batch_seed, device)
            for (policy, wanted), (stories, gen_params) in zip(work, written):
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


def _decoding(policy: ModelRecord, settings: Settings) -> Decoding:
    return Decoding.from_dict({"max_new_tokens": settings.max_new_tokens, **sampling_decoding(policy.decoding)})


def _shared_weights(policies: Sequence[ModelRecord], settings: Settings) -> list[list[ModelRecord]]:
    """Policies that can write in one generate call: the same weights and token budget, no
    best-of-k (its reranking is per policy). The starter's two policies are such a group."""
    groups: dict[tuple, list[ModelRecord]] = {}
    for policy in policies:
        shared = policy.decoding.get("best_of") is None
        key = (policy.source, _decoding(policy, settings).max_new_tokens) if shared else (policy.id,)
        groups.setdefault(key, []).append(policy)
    return list(groups.values())


def _write(db, model, tokenizer, group: list[ModelRecord], texts: dict[int, list[str]], settings: Settings,
           seed: int | None, device) -> list[tuple[list[Story], dict]]:
    """Each policy's stories for its texts and the generation parameters to store with them."""
    step = settings.generation_batch_size
    if len(group) > 1:  # one call, each row with its policy's decoding
        decodings = {p.id: _decoding(p, settings) for p in group}
        rows = [(p.id, text) for p in group for text in texts[p.id]]
        stories = generate_rows(model, tokenizer, [t for _, t in rows], [decodings[i] for i, _ in rows],
                                decodings[group[0].id].max_new_tokens, seed=seed)
        written, offset = [], 0
        for p in group:
            written.append((stories[offset:offset + len(texts[p.id])], decodings[p.id].to_dict()))
            offset += len(texts[p.id])
        return written
    policy = group[0]
    decoding = _decoding(policy, settings)
    k = policy.decoding.get("best_of")  # keep the best of k samples by the policy's reranker
    if k is None:
        return [(generate_stories(model, tokenizer, texts[policy.id], decoding, batch_size=step, seed=seed),
                 decoding.to_dict())]
    score = reranker(db, policy, device, settings.hub_token)
    return [(best_of_k(model, tokenizer, texts[policy.id], decoding, k, score, batch_size=step, seed=seed),
             {**decoding.to_dict(), "best_of": k})]
