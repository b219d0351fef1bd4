"""The one Settings object: built once from CLI flags and environment, then passed down.

No other module reads os.environ. Secrets (Hub token, researcher key) are kept out of
repr so they never reach a log or the page.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from storage.db import Store

SPACE_DATA_DIR = Path("/data")
STARTERS = ("smollm2", "tiny")

ENV_VARS = {
    "data_dir": "STORY_ARENA_DATA_DIR",
    "researchers": "STORY_ARENA_RESEARCHERS",
    "researcher_key": "STORY_ARENA_RESEARCHER_KEY",
    "starter": "STORY_ARENA_STARTER",
    "device": "STORY_ARENA_DEVICE",
    "hub_token": "HF_TOKEN",
}


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 7860
    device: str = "auto"
    starter: str = "smollm2"
    researchers: frozenset[str] = frozenset()
    researcher_key: str | None = field(default=None, repr=False)
    hub_token: str | None = field(default=None, repr=False)
    pool_prompts: int | None = None
    generation_batch_size: int = 8
    max_new_tokens: int = 200
    undo_window_s: float = 30.0
    max_name_chars: int = 40
    max_rationale_chars: int = 1000
    max_prompt_chars: int = 500
    max_story_chars: int = 8000

    @property
    def db_path(self) -> Path:
        return self.data_dir / "arena.db"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    def store(self) -> Store:
        return Store(self.db_path)

    def role_for(self, name: str) -> str:
        return "researcher" if name in self.researchers else "annotator"


def default_data_dir() -> Path:
    """./data locally; /data on a Hugging Face Space with persistent storage."""
    return SPACE_DATA_DIR if SPACE_DATA_DIR.is_dir() and os.access(SPACE_DATA_DIR, os.W_OK) else Path("data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by app.py and every CLI command."""
    parser.add_argument("--data-dir", type=Path, help=f"where the database, models and logs live (env {ENV_VARS['data_dir']}; default ./data, or /data on a Space)")
    parser.add_argument("--starter", choices=STARTERS, help=f"default policy to prepare: the packaged SmolLM2-135M-Instruct, or a tiny random GPT-2 for tests (env {ENV_VARS['starter']})")
    parser.add_argument("--researchers", help=f"comma-separated annotator names with the researcher role (env {ENV_VARS['researchers']})")
    parser.add_argument("--device", help=f"auto, cpu or cuda (env {ENV_VARS['device']})")
    parser.add_argument("--pool-prompts", type=int, help="how many prompts each starter policy pre-generates (default: all)")


def from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    def pick(name: str, default=None):
        value = getattr(args, name, None)
        return value if value is not None else environ.get(ENV_VARS.get(name, ""), default)

    researchers = pick("researchers", "") or ""
    starter = pick("starter", "smollm2")
    if starter not in STARTERS:
        raise ValueError(f"Unknown starter {starter!r}; expected one of {', '.join(STARTERS)}.")
    pool_prompts = getattr(args, "pool_prompts", None)
    if pool_prompts is not None and pool_prompts < 1:
        raise ValueError("--pool-prompts must be at least 1.")
    return Settings(
        data_dir=Path(pick("data_dir") or default_data_dir()).resolve(),
        host=getattr(args, "host", None) or "127.0.0.1",
        port=getattr(args, "port", None) or 7860,
        device=pick("device", "auto"),
        starter=starter,
        researchers=frozenset(n.strip() for n in researchers.split(",") if n.strip()),
        researcher_key=environ.get(ENV_VARS["researcher_key"]) or None,
        hub_token=environ.get(ENV_VARS["hub_token"]) or None,
        pool_prompts=pool_prompts,
    )
