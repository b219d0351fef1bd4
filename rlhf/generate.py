"""Batched story sampling: model and prompts in, texts out.

Batching matters on CPU too (batches of 8 wrote 4.3x the tokens/s of one prompt at a time
for the SmolLM2 starter on 2 free cores: bench/generation.py), so prompts are left-padded
into batches and sampled with transformers' generate. Nothing here knows about the
database; callers store the Story results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch

from rlhf.params import check_real, check_whole, given_params
from rlhf.story_features import trim_unfinished

# A length and a clear ending, asked for in words: without them most SmolLM2 pool stories ran
# past their 200-token budget mid-sentence (issue 13); bench/stories.py measures the result.
SYSTEM_PROMPT = (
    "You are a storyteller for young children. Write a short, simple story of about 100 words "
    "for the user's prompt, in plain words a five-year-old understands, and give it a clear ending."
)


@dataclass(frozen=True)
class Decoding:
    """Sampling settings of one policy; validated on construction."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 200
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # 0: off; n: no token n-gram appears twice in a story

    def __post_init__(self) -> None:
        check_real("temperature", self.temperature, 0, 2)
        check_real("top_p", self.top_p, 0, 1)
        check_real("repetition_penalty", self.repetition_penalty, 1, 2, low_open=False)
        check_whole("max_new_tokens", self.max_new_tokens, 1, 1024)
        check_whole("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, 32)

    @classmethod
    def from_dict(cls, d: Mapping) -> Decoding:
        return cls(**given_params("decoding", d, [f.name for f in fields(cls)]))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Story:
    """One sampled story; `truncated` when it hit the token budget before end-of-sequence
    (its trailing unfinished sentence is then trimmed from `text`)."""

    text: str
    tokens: int
    ms: float
    truncated: bool


def format_prompt(tokenizer, prompt: str) -> str:
    """Wrap a prompt in the chat template of instruct models, or add a cue for plain LMs."""
    if tokenizer.chat_template:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt},
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{prompt.strip()}\n\nStory:"


def prompt_and_story(tokenizer, prompt: str, story: str) -> tuple[str, str]:
    """What a policy saw and wrote, as every learner reads it: the formatted prompt, and the
    story as its continuation (plain LMs write a space after the "Story:" cue; chat models
    start right after the template's generation prompt)."""
    return format_prompt(tokenizer, prompt), story if tokenizer.chat_template else f" {story}"


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _length_to_eos(ids: torch.Tensor, eos_ids: list[int]) -> int:
    if not eos_ids:
        return len(ids)
    hits = torch.isin(ids, torch.tensor(eos_ids, device=ids.device)).nonzero()
    return int(hits[0]) if len(hits) else len(ids)


def _generate_batch(model, tokenizer, texts: list[str], decoding: Decoding, eos_ids: list[int]):
    start = time.perf_counter()
    # Chat templates already hold their special tokens; plain LMs get their usual ones.
    enc = tokenizer(
        texts,
        return_tensors="pt",
        padding=True,
        add_special_tokens=not tokenizer.chat_template,
    ).to(model.device)
    prompt_len = enc["input_ids"].shape[1]
    max_new = decoding.max_new_tokens
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        max_new = min(max_new, context - prompt_len)
        if max_new < 1:
            raise ValueError(f"prompt of {prompt_len} tokens leaves no room in a {context}-token context")
    out = model.generate(
        **enc,
        do_sample=True,
        temperature=decoding.temperature,
        top_p=decoding.top_p,
        top_k=0,
        repetition_penalty=decoding.repetition_penalty,
        no_repeat_ngram_size=decoding.no_repeat_ngram_size,
        max_new_tokens=max_new,
        eos_token_id=eos_ids or None,
        pad_token_id=tokenizer.pad_token_id,
    )
    ms = (time.perf_counter() - start) * 1000 / len(texts)
    stories = []
    for row in out[:, prompt_len:]:
        n = _length_to_eos(row, eos_ids)
        truncated = n == len(row)  # no end-of-sequence: the budget cut it
        text = tokenizer.decode(row[:n], skip_special_tokens=True).strip()
        stories.append(Story(text=trim_unfinished(text) if truncated else text, tokens=n, ms=ms, truncated=truncated))
    return stories


def generate_stories(
    model,
    tokenizer,
    prompts: Sequence[str],
    decoding: Decoding,
    batch_size: int = 8,
    seed: int | None = None,
    formatter: Callable[[object, str], str] = format_prompt,
) -> list[Story]:
    """Sample one story per prompt, in order; the same seed gives the same stories.

    The tokenizer must pad on the left (load_causal_lm sets this up). Seeding forks the
    RNG, so the caller's random state is left untouched. `formatter` wraps each prompt for
    the model; callers that ask for something other than a story (rlhf.teams) bring their own.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    texts = [formatter(tokenizer, p) for p in prompts]
    eos_ids = _eos_ids(model, tokenizer)
    devices = [model.device] if model.device.type == "cuda" else []
    stories: list[Story] = []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        for i in range(0, len(texts), batch_size):
            stories += _generate_batch(model, tokenizer, texts[i : i + batch_size], decoding, eos_ids)
    return stories
