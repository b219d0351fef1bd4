"""Batched story sampling: model and prompts in, texts out.

Batching matters on CPU too (batches of 8 wrote 4.3x the tokens/s of one prompt at a time
for the SmolLM2 starter on 2 free cores: bench/generation.py), so prompts are left-padded
into batches and sampled with transformers' generate. Nothing here knows about the
database; callers store the Story results.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from rlhf.models import context_length
from rlhf.params import check_real, check_whole, given_params
from rlhf.story_features import printable, trim_unfinished

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


def _generate_batch(model, tokenizer, texts: list[str], decoding: Decoding, eos_ids: list[int],
                    streamer: BaseStreamer | None = None, logits_processor: LogitsProcessorList | None = None):
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
    context = context_length(model)
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
        streamer=streamer,
        logits_processor=logits_processor,
    )
    ms = (time.perf_counter() - start) * 1000 / len(texts)
    stories = []
    for row in out[:, prompt_len:]:
        stories.append(_story(tokenizer, row, eos_ids, ms, finished=True))
    return stories


def _story(tokenizer, row: torch.Tensor, eos_ids: list[int], ms: float, finished: bool) -> Story:
    """The story in a row of new tokens; a finished row without end-of-sequence hit the budget."""
    n = _length_to_eos(row, eos_ids)
    truncated = finished and n == len(row)
    text = printable(tokenizer.decode(row[:n], skip_special_tokens=True)).strip()
    return Story(text=trim_unfinished(text) if truncated else text, tokens=n, ms=ms, truncated=truncated)


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


# --- Several policies' decodings in one batch (pools of shared weights; live battles) --------


def generate_rows(
    model, tokenizer, prompts: Sequence[str], decodings: Sequence[Decoding], max_new_tokens: int,
    seed: int | None = None,
) -> list[Story]:
    """One story per (prompt, decoding) row in ONE batched generate call, each row sampled
    with its own decoding (RowDecoding): policies that share weights write together (the
    starter's two: 1.13x the tokens/s of a batch of 8 each in turn on 2 CPU cores,
    bench/generation.py), and a first pair is one call instead of two."""
    texts = [format_prompt(tokenizer, p) for p in prompts]
    eos_ids = _eos_ids(model, tokenizer)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        return _generate_rows(model, tokenizer, texts, decodings, max_new_tokens, eos_ids)


def _generate_rows(model, tokenizer, texts: list[str], decodings: Sequence[Decoding], max_new_tokens: int,
                   eos_ids: list[int], streamer: BaseStreamer | None = None) -> list[Story]:
    # generate's own sampling settings are neutral; RowDecoding applies each row's.
    plain = Decoding(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens)
    return _generate_batch(model, tokenizer, texts, plain, eos_ids, streamer,
                           LogitsProcessorList([RowDecoding(decodings)]))


class RowDecoding(LogitsProcessor):
    """Each batch row sampled with its own Decoding, through transformers' own warpers: two
    policies that share weights but not sampling settings write in one generate call."""

    def __init__(self, decodings: Sequence[Decoding]):
        self.rows = [self._warpers(d) for d in decodings]

    @staticmethod
    def _warpers(decoding: Decoding) -> list[LogitsProcessor]:
        warpers: list[LogitsProcessor] = []
        if decoding.repetition_penalty != 1.0:
            warpers.append(RepetitionPenaltyLogitsProcessor(decoding.repetition_penalty))
        if decoding.no_repeat_ngram_size:
            warpers.append(NoRepeatNGramLogitsProcessor(decoding.no_repeat_ngram_size))
        warpers.append(TemperatureLogitsWarper(decoding.temperature))
        if decoding.top_p < 1.0:
            warpers.append(TopPLogitsWarper(decoding.top_p))
        return warpers

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = []
        for i, warpers in enumerate(self.rows):
            row = scores[i : i + 1]
            for warper in warpers:
                row = warper(input_ids[i : i + 1], row)
            rows.append(row)
        return torch.cat(rows)


class BatchStreamer(BaseStreamer):
    """Collects every row's new tokens as generate makes them (transformers' text streamers take
    one row only) and signals `updates` after each step."""

    def __init__(self, updates: queue.Queue):
        self.updates = updates
        self.rows: list[list[int]] | None = None

    def put(self, value: torch.Tensor) -> None:
        if self.rows is None:  # the first call hands over the prompts
            self.rows = [[] for _ in range(value.shape[0])]
            return
        for row, token in zip(self.rows, value.reshape(len(self.rows), -1).tolist()):
            row.extend(token)
        self.updates.put(self)

    def end(self) -> None:
        self.updates.put(self)


def _latest(updates: queue.Queue):
    """Wait for an update, then take every one already queued: a slow reader skips to the newest
    tokens. None once generation has ended."""
    item = updates.get()
    while item is not None and not updates.empty():
        item = updates.get_nowait()
    return item


def stream_stories(
    model, tokenizer, prompts: Sequence[str], decodings: Sequence[Decoding], max_new_tokens: int,
    seed: int | None = None,
) -> Iterator[list[Story]]:
    """Write one story per (prompt, decoding) in ONE batched generate call (rows sampled by
    RowDecoding) and yield every story so far after each generated token; the last yield holds
    the finished stories (truncation and ms as generate_stories reports them)."""
    texts = [format_prompt(tokenizer, p) for p in prompts]
    eos_ids = _eos_ids(model, tokenizer)
    updates: queue.Queue = queue.Queue()
    streamer = BatchStreamer(updates)
    result: dict = {}

    def run() -> None:
        devices = [model.device] if model.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.inference_mode():
                if seed is not None:
                    torch.manual_seed(seed)
                result["stories"] = _generate_rows(model, tokenizer, texts, decodings, max_new_tokens, eos_ids,
                                                   streamer)
        except Exception as exc:  # handed to the reading thread, which raises it
            result["error"] = exc
        finally:
            updates.put(None)

    start = time.perf_counter()
    worker = threading.Thread(target=run, name="stream-stories", daemon=True)
    worker.start()
    while _latest(updates) is not None:
        if streamer.rows is not None:
            ms = (time.perf_counter() - start) * 1000 / len(texts)
            yield [_story(tokenizer, torch.tensor(row, dtype=torch.long), eos_ids, ms, finished=False)
                   for row in streamer.rows]
    worker.join()
    if "error" in result:
        raise result["error"]
    yield result["stories"]
