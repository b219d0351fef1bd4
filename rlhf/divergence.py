"""How far a trained policy moved from its parent: the KL divergence on the child's own stories.

One estimate for every kind and bench: on stories the child wrote, the mean over story
tokens of (r - 1) - log r with r = p_parent / p_child (Schulman's "k3" estimator of
KL(child || parent), which TRL's GRPO uses: unbiased on the child's samples and never
negative, unlike the plain log-ratio, whose noise dominates when the policies barely differ).
Both models' logits are divided by the sampling temperature, so the distributions compared
are the ones the stories were drawn from (top_p aside).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf.generate import prompt_and_story
from rlhf.models import context_length

KL_BATCH = 8


def _story_ids(tokenizer, prompt: str, story: str) -> tuple[list[int], int]:
    """Token ids of the formatted prompt and the story, and where the story starts."""
    head, continuation = prompt_and_story(tokenizer, prompt, story)
    # Chat templates hold their own special tokens (as in generation); others get theirs.
    prompt_ids = tokenizer(head, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    story_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return prompt_ids + story_ids, len(prompt_ids)


def _story_logprobs(model, input_ids: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token | earlier tokens) of every position after the first, at the temperature."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def sampled_kl(child, parent, tokenizer, prompts: Sequence[str], stories: Sequence[str],
               temperature: float = 1.0, batch_size: int = KL_BATCH) -> float:
    """Mean per-token KL(child || parent) estimated on the child's stories for prompts,
    sampled at `temperature` (both models share the tokenizer; empty stories are left out).
    0.0 when no story has a token."""
    if len(prompts) != len(stories):
        raise ValueError(f"{len(prompts)} prompts but {len(stories)} stories.")
    limit = context_length(child)  # a decoded story can re-tokenise longer than it was written
    encoded = [(ids[:limit], start) for ids, start in
               (_story_ids(tokenizer, p, s) for p, s in zip(prompts, stories) if s.strip())]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            story = torch.zeros((len(chunk), width - 1), dtype=torch.bool)
            for row, (ids, story_start) in enumerate(chunk):  # right padding
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
                story[row, story_start - 1 : len(ids) - 1] = True  # positions predicting story tokens
            log_ratio = (_story_logprobs(parent, input_ids.to(parent.device), mask.to(parent.device), temperature)
                         - _story_logprobs(child, input_ids.to(child.device), mask.to(child.device), temperature)
                         ).cpu()[story]
            total += float((torch.expm1(log_ratio) - log_ratio).sum())
            tokens += int(story.sum())
    return total / tokens if tokens else 0.0
