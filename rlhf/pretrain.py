"""BabyLM / BabyStories pretraining: a GPT-2 trained from scratch on a small story corpus.

The `pretrain` training kind (rlhf.runner: `run(ctx) -> JobResult`). A byte-level
BPE (rlhf.models.train_bpe_tokenizer) is trained on the corpus, stories are joined with
<|endoftext|> and packed into blocks of `block_size` tokens, and transformers' Trainer fits
a causal LM on them. The result is a plain LM (no chat template), so the arena prompts it
with rlhf.generate.format_prompt's "prompt + Story:" cue; its policy samples with
temperature 0.8, top-p 0.95.

Sizes (GPT2Config; parameter counts include the tied embedding at the default vocabulary):

    size   layers  width  heads  context  vocab   parameters
    small     4     256     4      256     8000    5.3 M   a 2-core CPU trains it in minutes
    base      8     512     8      512    16000   33.7 M   for a GPU (TinyStories-33M scale)

(context is the default block_size of the full preset; vocab is an upper bound: on a small
corpus the BPE runs out of merges earlier, e.g. 10.3k on 2 MB of TinyStories -> base 30.6 M.)
The quick presets are sized to finish in minutes on 2 CPU cores (throughput: the README's
figures).

The BabyStories study used GPT-2 125M and 345M on the 10M/100M-word BabyLM corpora; these
are the same recipe scaled to what the arena's machines train in one sitting. `block_size`
is also the model's context (n_positions), so a policy never generates past positions it
was trained on. Dropout is off: quick runs see each token about once.

Corpus (`corpus` parameter, exactly one source):
  {"file": path}       .txt with stories separated by blank lines, or .jsonl with one
                       {"text": ...} object a line; UTF-8, at most 200 MB.
  {"hub": id, "split": "train", "text_field": "text"}
                       streamed with datasets.load_dataset, only as far as the run can
                       use (at most 200 M characters); needs the Hub to be reachable.
  {"distill": policy_id}
                       that policy's stories from the completion pool, each written as
                       "<prompt>\\n\\nStory: <story>" -- the very cue format_prompt gives a
                       plain LM -- so the student learns to answer the arena's prompts.

Presets: "quick" (default) fits 2 CPU cores in under 10 minutes, "full" is a GPU budget;
explicit keys override the preset. Held-out stories (eval_fraction, chosen by a hash of
each story, so a resumed job keeps the same split) give the perplexity metric; it is also
measured on the freshly initialised model (init_eval_perplexity) for comparison.

Lineage: the distill source is the parent, else none. With `arena_every` = N, every N
steps a checkpoint also joins the arena as its own policy "<name>-stepN"; the checkpoints
then form a chain (each one's parent is the previous; the final model's parent is the
last intermediate one) so pair selection compares consecutive checkpoints.

Checkpoints go to the job's output folder; a re-queued job resumes from the last one with
the same tokenizer (saved beside them) and the same data split.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from rlhf.generate import format_prompt
from rlhf.models import resolve_device, train_bpe_tokenizer
from rlhf.params import MODEL_ID_RANGE, JobParams, check_field, check_whole, param
from rlhf.policies import POLICY_NAME
from rlhf.runner import JobContext, JobResult, Kind, ModelSpec, model_writer
from rlhf.settings import Settings
from rlhf.training import ProgressCallback, chosen_model, trainer_device_args
from storage import completions, models
from storage.db import Store
from storage.models import ModelRecord

MODEL_KIND = "pretrain"
SEED = 0

# Architecture per size; context and vocabulary come from block_size / vocab_size.
SIZES: dict[str, dict] = {
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "base": {"n_layer": 8, "n_embd": 512, "n_head": 8},
}
# Budgets per (size, preset). Quick: under 10 minutes on 2 CPU cores, tokenizer and
# evaluation included; full: a GPU run. tokenizer_chars / eval_tokens are internal caps.
PRESETS: dict[str, dict[str, dict]] = {
    "small": {
        "quick": {"max_steps": 200, "batch_size": 8, "block_size": 256, "learning_rate": 2e-3,
                  "vocab_size": 8000, "tokenizer_chars": 20_000_000, "eval_tokens": 16_384},
        "full": {"max_steps": 6000, "batch_size": 32, "block_size": 256, "learning_rate": 1e-3,
                 "vocab_size": 8000, "tokenizer_chars": 100_000_000, "eval_tokens": 262_144},
    },
    "base": {
        "quick": {"max_steps": 40, "batch_size": 4, "block_size": 256, "learning_rate": 1e-3,
                  "vocab_size": 16000, "tokenizer_chars": 20_000_000, "eval_tokens": 8_192},
        "full": {"max_steps": 20000, "batch_size": 32, "block_size": 512, "learning_rate": 6e-4,
                 "vocab_size": 16000, "tokenizer_chars": 100_000_000, "eval_tokens": 262_144},
    },
}
INTERNAL_BUDGETS = ("tokenizer_chars", "eval_tokens")
PRETRAIN_DECODING = {"temperature": 0.8, "top_p": 0.95}
MAX_CORPUS_BYTES = 200 * 1024 * 1024
MAX_CORPUS_CHARS = 200_000_000  # the same budget for Hub datasets, read as a stream
MIN_CORPUS_CHARS = 1000
MIN_STORIES = 2
CORPUS_SUFFIXES = (".txt", ".jsonl")
CORPUS_KEYS = {"file": set(), "hub": {"split", "text_field"}, "distill": set()}
NAME_LIMIT = 60
TOKENIZER_SHARE, DATA_SHARE, TRAIN_SHARE = 0.05, 0.10, 0.80  # the rest is evaluation and saving
TRAIN_LOSS_WINDOW = 10
TRAINER_EVAL_BLOCKS = 16  # the eval-loss curve during training; the metric uses all eval_tokens


# --------------------------------------------------------------------------- parameters


def _check_corpus(corpus) -> dict:
    """The corpus parameter's shape; a file is also checked to exist and fit the limit."""
    example = '{"file": "stories.txt"}, {"hub": "roneneldan/TinyStories"} or {"distill": 3}'
    if not isinstance(corpus, Mapping):
        raise ValueError(f"corpus must be an object like {example}, got {corpus!r}.")
    sources = [k for k in CORPUS_KEYS if k in corpus]
    if len(sources) != 1:
        raise ValueError(f"corpus needs exactly one of file, hub or distill, e.g. {example}.")
    source = sources[0]
    unknown = sorted(set(corpus) - {source} - CORPUS_KEYS[source])
    if unknown:
        allowed = ", ".join(sorted({source} | CORPUS_KEYS[source]))
        raise ValueError(f"Unknown corpus key(s) for a {source} corpus: {', '.join(map(str, unknown))} (known: "
                         f"{allowed}).")
    value = corpus[source]
    if source == "file":
        if not isinstance(value, str | Path) or not str(value).strip():
            raise ValueError(f"corpus file must be a path, got {value!r}.")
        _file_corpus(Path(value).expanduser())  # parsed now, so a malformed upload is never queued
    elif source == "hub":
        for key in ("hub", "split", "text_field"):
            text = corpus.get(key, "x")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"corpus {key} must be a non-empty string, got {text!r}.")
    else:
        check_whole("corpus distill (a policy id)", value, *MODEL_ID_RANGE)
    return dict(corpus)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ValueError(f'Corpus file "{path}" does not exist.')
    if not path.is_file():
        raise ValueError(f'Corpus file "{path}" is not a file.')
    if path.suffix.lower() not in CORPUS_SUFFIXES:
        raise ValueError(
            f'Corpus file "{path.name}" must be .txt (stories separated by blank lines) '
            'or .jsonl (one {"text": ...} object a line).'
        )
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f'Corpus file "{path.name}" is empty.')
    if size > MAX_CORPUS_BYTES:
        raise ValueError(
            f'Corpus file "{path.name}" is {size / 2**20:.0f} MB; the limit is {MAX_CORPUS_BYTES // 2**20} MB.'
        )


@dataclass(frozen=True)
class PretrainParams(JobParams):
    """A pretraining job's parameters, validated; the size's preset fills what was not given."""

    corpus: dict = param(help='{"file": path}, {"hub": dataset id, "split", "text_field"} or {"distill": policy id}')
    size: str = param("small", "model size (GPT-2 shape)", choices=SIZES)
    preset: str = param("quick", "step budget: quick (minutes on CPU) or full (a GPU)", choices=("quick", "full"))
    max_steps: int = param(PRESETS["small"]["quick"]["max_steps"], "optimizer steps", low=1, high=1_000_000)
    learning_rate: float = param(PRESETS["small"]["quick"]["learning_rate"], "peak learning rate (cosine schedule)",
                                 low=0, high=0.1, low_open=True)
    batch_size: int = param(PRESETS["small"]["quick"]["batch_size"], "blocks per step", low=1, high=1024)
    block_size: int = param(PRESETS["small"]["quick"]["block_size"], "tokens per block (the model's context)",
                            low=32, high=2048)
    vocab_size: int = param(PRESETS["small"]["quick"]["vocab_size"], "BPE vocabulary trained on the corpus",
                            low=300, high=65536)
    eval_fraction: float = param(0.05, "share of stories held out for perplexity", low=0, high=0.5, low_open=True)
    arena_every: int | None = param(None, "every N steps a checkpoint also joins the arena", low=1, high=1_000_000)
    name: str | None = param(None, "the policy's name (1-60 letters, digits, '.', '_', '-')")

    LABEL: ClassVar[str] = "pretrain"
    REQUIRED: ClassVar[dict] = {"corpus": 'Choose a corpus, e.g. {"file": "stories.txt"}, '
                                          '{"hub": "roneneldan/TinyStories"} or {"distill": <policy id>}.'}

    @classmethod
    def preset_values(cls, given: dict) -> dict:
        size = check_field(cls, "size", given.get("size", "small"))
        preset = check_field(cls, "preset", given.get("preset", "quick"))
        budget = {k: v for k, v in PRESETS[size][preset].items() if k not in INTERNAL_BUDGETS}
        return {**budget, "size": size, "preset": preset}

    def __post_init__(self) -> None:
        object.__setattr__(self, "corpus", _check_corpus(self.corpus))
        super().__post_init__()
        if self.name is not None and (not isinstance(self.name, str) or not POLICY_NAME.match(self.name)):
            raise ValueError("name: 1-60 letters, digits, '.', '_' or '-', starting with a letter or digit.")

    @property
    def budget(self) -> dict:
        return PRESETS[self.size][self.preset]


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    texts: list[str]
    description: str
    parent: ModelRecord | None = None

    @property
    def chars(self) -> int:
        return sum(len(t) for t in self.texts)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f'Corpus file "{path.name}" looks binary (it contains NUL bytes); upload UTF-8 text.')
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f'Corpus file "{path.name}" is not UTF-8 text (undecodable byte at offset {exc.start}); '
            "is it a binary file?"
        ) from exc


def _parse_txt(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [s.strip() for s in re.split(r"\n[ \t]*\n", text) if s.strip()]


def _parse_jsonl(text: str, name: str) -> list[str]:
    stories = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f'Corpus file "{name}" line {number} is not valid JSON: {exc.msg}.') from exc
        if not isinstance(row, dict) or "text" not in row:
            raise ValueError(
                f'Corpus file "{name}" line {number} has no "text" field; '
                'each line must be a JSON object like {"text": "Once upon a time..."}.'
            )
        if not isinstance(row["text"], str):
            raise ValueError(f'Corpus file "{name}" line {number}: "text" must be a string.')
        if row["text"].strip():
            stories.append(row["text"].strip())
    return stories


def _file_corpus(path: Path) -> Corpus:
    _check_file(path)
    text = _read_text(path)
    texts = _parse_jsonl(text, path.name) if path.suffix.lower() == ".jsonl" else _parse_txt(text)
    return Corpus(texts, f"file {path.name}")


def _hub_corpus(corpus: dict, settings: Settings, max_chars: int) -> Corpus:
    import datasets

    dataset_id = corpus["hub"]
    split = corpus.get("split", "train")
    field = corpus.get("text_field", "text")
    try:
        stream = datasets.load_dataset(dataset_id, split=split, streaming=True, token=settings.hub_token)
        texts, chars = [], 0
        for row in stream:
            if field not in row:
                raise ValueError(
                    f'Hub dataset "{dataset_id}" has no "{field}" field; its fields are '
                    f'{", ".join(sorted(row))}. Set text_field.'
                )
            text = row[field]
            if isinstance(text, str) and text.strip():
                texts.append(text.strip())
                chars += len(text)
                if chars >= max_chars:
                    break
    except ValueError:
        raise
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f'The Hub dataset "{dataset_id}" (split {split}) could not be loaded: {detail}. '
            "Is the Hub reachable (offline?), the id right, and a token set for a private dataset?"
        ) from exc
    return Corpus(texts, f"hub {dataset_id}:{split}")


def _plain_cue(prompt: str) -> str:
    return format_prompt(SimpleNamespace(chat_template=None), prompt)


def _distill_corpus(store: Store, policy_id: int) -> Corpus:
    source = chosen_model(store, policy_id, "policy to distill")
    texts = []
    for prompt in completions.prompts_with_completions(store.db):
        for story in completions.completions_for_prompt(store.db, prompt["id"]):
            if story["model_id"] == source.id and story["text"].strip():
                texts.append(f"{_plain_cue(prompt['text'])} {story['text'].strip()}")
    if len(texts) < MIN_STORIES:
        raise ValueError(
            f'Policy "{source.name}" has {len(texts)} stories in the pool; distilling needs at least '
            f"{MIN_STORIES}. Generate its pool first."
        )
    return Corpus(texts, f"distill {source.name}", parent=source)


def load_corpus(settings: Settings, store: Store, corpus: dict, hub_chars: int = MAX_CORPUS_CHARS) -> Corpus:
    """Read and validate the corpus; every problem is a ValueError a researcher can act on.

    A Hub dataset is streamed only up to hub_chars characters (what the run can use).
    """
    if "file" in corpus:
        result = _file_corpus(Path(corpus["file"]).expanduser())
    elif "hub" in corpus:
        result = _hub_corpus(corpus, settings, min(hub_chars, MAX_CORPUS_CHARS))
    else:
        result = _distill_corpus(store, corpus["distill"])
    if not result.texts:
        raise ValueError(f"The corpus ({result.description}) has no stories.")
    if len(result.texts) < MIN_STORIES:
        raise ValueError(f"The corpus ({result.description}) has {len(result.texts)} story; "
                         f"pretraining needs at least {MIN_STORIES} (one is held out).")
    if result.chars < MIN_CORPUS_CHARS:
        raise ValueError(f"The corpus ({result.description}) has only {result.chars} characters of text; "
                         f"pretraining needs at least {MIN_CORPUS_CHARS}.")
    return result


def split_stories(texts: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Held-out stories by a hash of their text (stable across runs), at least one each side."""
    def held_out(text: str) -> bool:
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        return int.from_bytes(digest[:4], "big") / 2**32 < eval_fraction

    train = [t for t in texts if not held_out(t)]
    evaluation = [t for t in texts if held_out(t)]
    if not evaluation:
        evaluation = [train.pop()]
    elif not train:
        train = [evaluation.pop()]
    return train, evaluation


# --------------------------------------------------------------------------- data


def _token_stream(tokenizer, texts: Iterable[str], chunk: int = 1000) -> Iterator[list[int]]:
    """Token ids of each story followed by <|endoftext|>, encoded in batches."""
    eos = tokenizer.eos_token_id
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == chunk:
            yield from (ids + [eos] for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
            batch = []
    if batch:
        yield from (ids + [eos] for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])


def pack(tokenizer, texts: Iterable[str], block_size: int, max_tokens: int | None,
         keep_partial: bool) -> torch.Tensor | list[torch.Tensor]:
    """Concatenate stories and cut them into blocks; stops after max_tokens.

    Training blocks drop the remainder (one int32 tensor [n, block_size]: 4 bytes a token,
    so a 200 MB corpus stays a few hundred MB); evaluation keeps a last shorter block so a
    tiny held-out set still counts (a list of 1-D tensors).
    """
    pieces: list[np.ndarray] = []
    total = 0
    for story in _token_stream(tokenizer, texts):
        pieces.append(np.asarray(story, dtype=np.int32))
        total += len(story)
        if max_tokens is not None and total >= max_tokens:
            break
    ids = torch.from_numpy(np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    full = len(ids) // block_size * block_size
    blocks = ids[:full].view(-1, block_size)
    if not keep_partial:
        return blocks
    out = list(blocks)
    if len(ids) - full >= 2:
        out.append(ids[full:])
    return out


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i]}


def collate(features: list[dict], pad_id: int) -> dict:
    """Blocks to a batch; shorter blocks are right-padded and their padding is not scored.

    (DataCollatorForLanguageModeling would also blank out every <|endoftext|> label, as it
    is the pad token too, and the model would never learn where a story ends.)
    """
    longest = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(features), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = f["input_ids"].long()
        labels[row, :n] = f["input_ids"].long()
        mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


# --------------------------------------------------------------------------- model


def build_model(size: str, vocab: int, block_size: int, eos_id: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab, n_positions=block_size, **SIZES[size],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    set_seed(SEED)
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(
        do_sample=True, top_k=0, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        **PRETRAIN_DECODING,
    )
    return model


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def eval_loss(model, blocks: list[torch.Tensor], batch_size: int, pad_id: int) -> float:
    """Mean next-token loss per predicted token over the held-out blocks."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in range(0, len(blocks), batch_size):
            batch = collate([{"input_ids": b} for b in blocks[i:i + batch_size]], pad_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            nll += float(model(**batch).loss) * n
            count += n
    finally:
        model.train(was_training)
    return nll / max(1, count)


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def _load_or_train_tokenizer(folder: Path, texts: list[str], vocab_size: int, max_chars: int,
                             block_size: int) -> PreTrainedTokenizerFast:
    """The job's BPE: trained once on (at most max_chars of) the training stories, then reused."""
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder)

    def sample() -> Iterator[str]:
        chars = 0
        for text in texts:
            yield text
            chars += len(text)
            if chars >= max_chars:
                return

    tokenizer = train_bpe_tokenizer(sample(), vocab_size)
    tokenizer.model_max_length = block_size
    tokenizer.chat_template = None  # a plain LM: format_prompt gives it the "Story:" cue
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return tokenizer


def _recent_train_loss(log_history: list[dict]) -> float | None:
    losses = [e["loss"] for e in log_history if "loss" in e and math.isfinite(e["loss"])]
    tail = losses[-TRAIN_LOSS_WINDOW:]
    return sum(tail) / len(tail) if tail else None


class ArenaCheckpoints(TrainerCallback):
    """Every N steps: save the model, register it as a policy (pool queued), chain lineage."""

    def __init__(self, every: int, save, register):
        self.every, self.save, self.register = every, save, register
        self.last: ModelRecord | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every == 0 and step < state.max_steps:
            self.last = self.register(model, step, self.save(model, step), state.log_history)


# --------------------------------------------------------------------------- entry point


def run(ctx: JobContext) -> JobResult:
    """Pretrain a small GPT-2 on a story corpus and enter it into the arena."""
    p, store, settings, progress, output_dir = ctx.params, ctx.store, ctx.settings, ctx.progress, ctx.output_dir
    budget = p.budget
    output_dir.mkdir(parents=True, exist_ok=True)

    needed = p.max_steps * p.batch_size * p.block_size  # tokens training will see
    progress(0.0, "reading the corpus")
    corpus = load_corpus(settings, store, p.corpus, hub_chars=max(budget["tokenizer_chars"], 5 * needed))
    stories = list(corpus.texts)
    random.Random(SEED).shuffle(stories)  # uploads sorted by topic would bias a short run
    train_texts, eval_texts = split_stories(stories, p.eval_fraction)

    progress(TOKENIZER_SHARE * 0.1, f"training a {p.vocab_size}-token BPE on {corpus.description}")
    tokenizer = _load_or_train_tokenizer(output_dir / "tokenizer", train_texts, p.vocab_size,
                                         budget["tokenizer_chars"], p.block_size)
    pad_id = tokenizer.pad_token_id

    progress(TOKENIZER_SHARE, "tokenizing")
    train_blocks = pack(tokenizer, train_texts, p.block_size, needed + p.block_size, keep_partial=False)
    eval_blocks = pack(tokenizer, eval_texts, p.block_size, budget["eval_tokens"], keep_partial=True)
    if len(train_blocks) == 0:
        raise ValueError(f"The corpus ({corpus.description}) gives fewer training tokens than one "
                         f"block of {p.block_size}; add text or lower block_size.")
    if not eval_blocks:
        raise ValueError("The held-out stories are too short to measure perplexity; add text.")

    device = resolve_device(settings.device)
    model = build_model(p.size, len(tokenizer), p.block_size, tokenizer.eos_token_id).to(device)
    n_params = parameter_count(model)
    progress(DATA_SHARE * 0.7, f"measuring the untrained model ({n_params / 1e6:.1f} M parameters)")
    init_loss = eval_loss(model, eval_blocks, p.batch_size, pad_id)

    name = p.name or f"babylm-{p.size}" + (f"-{corpus.parent.name}" if corpus.parent else "")
    name = name[:NAME_LIMIT]
    base_metrics = {
        "size": p.size, "corpus": corpus.description, "corpus_chars": corpus.chars,
        "corpus_stories": len(corpus.texts), "eval_stories": len(eval_texts),
        "parameters": n_params, "vocab_size": len(tokenizer), "block_size": p.block_size,
        "init_eval_loss": init_loss, "init_eval_perplexity": _perplexity(init_loss),
    }

    def save_intermediate(live_model, step: int) -> Path:
        return ctx.save_model(model_writer(live_model, tokenizer), f"step-{step}")

    def register_intermediate(live_model, step: int, folder: Path, log_history: list[dict]) -> ModelRecord | None:
        loss = eval_loss(live_model, eval_blocks, p.batch_size, pad_id)
        metrics = {**base_metrics, "step": step, "eval_loss": loss, "eval_perplexity": _perplexity(loss),
                   "train_loss": _recent_train_loss(log_history), "train_tokens": step * p.batch_size * p.block_size}
        return ctx.register_now(ModelSpec(name=f"{name}-step{step}", kind=MODEL_KIND, path=folder,
                                          parent=chain.last or corpus.parent, metrics=metrics,
                                          decoding=dict(PRETRAIN_DECODING)))

    chain = ArenaCheckpoints(p.arena_every or 0, save_intermediate, register_intermediate)
    eval_every = max(1, math.ceil(p.max_steps / 5))
    args = TrainingArguments(
        output_dir=str(output_dir),
        **{**trainer_device_args(settings),
           "save_steps": max(1, min(500, math.ceil(p.max_steps / 10))),
           "logging_steps": max(1, p.max_steps // 500)},  # a long GPU run logs every few steps
        max_steps=p.max_steps,
        per_device_train_batch_size=p.batch_size,
        per_device_eval_batch_size=p.batch_size,
        learning_rate=p.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=eval_every,
        prediction_loss_only=True,
        remove_unused_columns=False,
        seed=SEED,
    )
    callbacks = [ProgressCallback(progress, start=DATA_SHARE, share=TRAIN_SHARE)]
    if p.arena_every:
        callbacks.append(chain)
    trainer = Trainer(
        model=model, args=args, data_collator=lambda f: collate(f, pad_id),
        train_dataset=Blocks(train_blocks), eval_dataset=Blocks(eval_blocks[:TRAINER_EVAL_BLOCKS]),
        processing_class=tokenizer, callbacks=callbacks,
    )
    resume = ctx.resume_from
    if p.arena_every and resume:  # keep the lineage chain across a re-queue
        done = [m for m in models.list_models(store.db) if m.job_id == ctx.job_id and m.kind == MODEL_KIND]
        chain.last = done[-1] if done else None
    progress(DATA_SHARE, f"training {p.max_steps} steps" + (f" (resuming {Path(resume).name})" if resume else ""))
    start_step = ctx.resumed_step
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    steps = trainer.state.global_step

    progress(DATA_SHARE + TRAIN_SHARE, "measuring held-out perplexity")
    final_loss = eval_loss(model, eval_blocks, p.batch_size, pad_id)
    folder = ctx.save_model(model_writer(model, tokenizer))
    metrics = {
        **base_metrics, "steps": steps, "train_loss": _recent_train_loss(trainer.state.log_history),
        "eval_loss": final_loss, "eval_perplexity": _perplexity(final_loss),
        "train_tokens": steps * p.batch_size * p.block_size,
        "train_tokens_available": int(train_blocks.numel()),
        "train_tokens_per_s": (steps - start_step) * p.batch_size * p.block_size / seconds
        if steps > start_step else None,
        "train_seconds": seconds, "resumed_from_step": start_step,
    }
    return JobResult(
        models=[ModelSpec(name=name, kind=MODEL_KIND, path=folder, parent=chain.last or corpus.parent,
                          metrics=metrics, decoding=dict(PRETRAIN_DECODING))],
        message=f"{name}: held-out perplexity {metrics['eval_perplexity']:.1f} "
                f"(untrained {metrics['init_eval_perplexity']:.0f})",
    )



KIND = Kind(
    name="pretrain", params=PretrainParams, run=run,
    help="BabyLM-style GPT-2 from scratch on an uploaded corpus (.txt or .jsonl) or distilled from a policy.",
)
