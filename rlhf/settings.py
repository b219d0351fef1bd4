"""The one Settings object: built once from CLI flags and environment, then passed down.

No other module reads os.environ. Secrets (Hub token, researcher key) are kept out of
repr so they never reach a log or the page.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from storage.db import Store
from storage.prompts import SOURCES as PROMPT_SOURCES

SPACE_DATA_DIR = Path("/data")
STARTERS = ("smollm2", "tiny")

ENV_VARS = {
    "data_dir": "STORY_ARENA_DATA_DIR",
    "researchers": "STORY_ARENA_RESEARCHERS",
    "researcher_key": "STORY_ARENA_RESEARCHER_KEY",
    "starter": "STORY_ARENA_STARTER",
    "device": "STORY_ARENA_DEVICE",
    "hub_token": "HF_TOKEN",
    "metrics_corpus": "STORY_ARENA_METRICS_CORPUS",
    "admins": "STORY_ARENA_ADMINS",
    "hub_dataset": "STORY_ARENA_HUB_DATASET",
    "hub_publish_minutes": "STORY_ARENA_HUB_PUBLISH_MINUTES",
    "light_jobs": "STORY_ARENA_LIGHT_JOBS",
    "trusted_proxies": "STORY_ARENA_TRUSTED_PROXIES",
    "train_processes": "STORY_ARENA_TRAIN_PROCESSES",
    "accelerate_config": "STORY_ARENA_ACCELERATE_CONFIG",
}
# Set by Hugging Face on a Space with `hf_oauth: true` (plus SYSTEM=spaces on every Space);
# without them there is no Hub login: off a Space Gradio would mock it with a Hub call.
OAUTH_ENV_VARS = ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OPENID_PROVIDER_URL", "SPACE_ID")
# Abuse controls and annotator quality (rlhf.quality): setting -> (type, lowest, highest, help).
QUALITY_FLAGS = {
    "min_vote_seconds": (float, 0.0, 3600.0, "a vote sooner than this after its pair appeared is refused; 0 = off"),
    "annotator_votes_per_minute": (int, 0, 100_000, "votes one annotator may cast in any 60 s; 0 = no limit"),
    "ip_votes_per_minute": (int, 0, 1_000_000, "votes one client address may cast in any 60 s; 0 = no limit"),
    "gold_rate": (float, 0.0, 1.0, "share of pairs served as gold pairs (known answer) while unseen ones are left"),
    "min_gold_accuracy": (float, 0.0, 1.0, "annotators below this gold accuracy are flagged for exclusion"),
    "min_gold_votes": (int, 1, 100_000, "gold votes needed before an annotator can be flagged"),
    "reports_to_hide": (int, 1, 100_000, (
        "annotators' reports that take a prompt or story out of the arena before a researcher reviews it"
    )),
    "annotators_per_address_per_hour": (int, 0, 1_000_000, (
        "new annotator names one client address may create in any hour; 0 = no limit"
    )),
    "live_battles_per_hour": (int, 0, 10_000, (
        "stories an annotator may ask for (live battles) in any hour; 0 = live battles off"
    )),
    "max_queued_jobs": (int, 0, 10_000, "queued jobs one researcher may have waiting at once; 0 = no limit"),
    "max_upload_mb": (float, 0.001, 100_000.0, "largest file anyone may upload (a pretrain corpus), in MB"),
    "session_capacity": (int, 10, 1_000_000, (
        "browser sessions kept in memory; the least recently used beyond it are dropped"
    )),
    "session_idle_minutes": (float, 1.0, 10_080.0, (
        "a sign-in is forgotten this long after it was made; sign in again then"
    )),
}
ENV_VARS.update({name: f"STORY_ARENA_{name.upper()}" for name in QUALITY_FLAGS})


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
    admins: frozenset[str] = frozenset()
    hub_dataset: str | None = None
    hub_publish_minutes: float = 0.0
    hub_oauth: bool = False
    pool_prompts: int | None = None
    pair_prompt_sources: tuple[str, ...] | None = None  # prompt sources pairs are drawn from; None: all
    pair_prompt_collections: tuple[str, ...] | None = None  # prompt collections pairs are drawn from; None: all
    generation_batch_size: int = 8
    max_new_tokens: int = 256
    undo_window_s: float = 30.0
    max_name_chars: int = 40
    max_rationale_chars: int = 1000
    max_prompt_chars: int = 500
    max_story_chars: int = 8000
    min_vote_seconds: float = 2.0
    annotator_votes_per_minute: int = 30
    ip_votes_per_minute: int = 120
    gold_rate: float = 0.1
    min_gold_accuracy: float = 0.7
    min_gold_votes: int = 5
    reports_to_hide: int = 3
    live_battles_per_hour: int = 5
    annotators_per_address_per_hour: int = 30
    max_queued_jobs: int = 5
    max_upload_mb: float = 25.0
    session_capacity: int = 1000
    session_idle_minutes: float = 240.0
    trusted_proxies: tuple[str, ...] = ()  # proxy addresses/networks whose X-Forwarded-For is believed
    metrics_corpus: Path | None = None  # stories (.txt or .jsonl) for each policy's held-out perplexity
    light_jobs: int = 1  # light jobs (publish, push, pool, prepare) run at once beside the one training job
    train_processes: int = 1  # processes per training job; over 1 (or a config) launches through accelerate
    accelerate_config: Path | None = None  # `accelerate config` file for training jobs (multi-GPU, DeepSpeed)

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

    @property
    def protected_paths(self) -> tuple[Path, ...]:
        """What no researcher input may point the app at: the database and its journal
        files (SQLite holds them), job logs and exports."""
        db = self.db_path
        journals = tuple(db.with_name(db.name + suffix) for suffix in ("-wal", "-shm", "-journal"))
        return (db, *journals, self.jobs_dir, self.exports_dir)

    def data_file(self, value, field: str) -> Path:
        """A file named by a researcher (e.g. a corpus), resolved (relative to the data dir)
        and accepted only inside the data dir, never one of protected_paths. The error
        never echoes the path, so it cannot tell what exists elsewhere on the server."""
        refused = ValueError(f"{field}: give an uploaded file or a file inside the data folder.")
        if not isinstance(value, str | Path) or not str(value).strip() or len(str(value)) > 1000:
            raise refused
        path = (self.data_dir / Path(value).expanduser()).resolve()
        if not path.is_relative_to(self.data_dir) or any(
                path == p or path.is_relative_to(p) for p in self.protected_paths):
            raise refused
        return path

    def store(self) -> Store:
        return Store(self.db_path)

    def role_for(self, name: str) -> str:
        return "researcher" if name in self.researchers else "annotator"

    def role_for_hub(self, username: str) -> str:
        """A Hub login is verified by OAuth, so the lists alone decide its role (no key)."""
        return "admin" if username in self.admins else self.role_for(username)


def default_data_dir() -> Path:
    """./data locally; /data on a Hugging Face Space with persistent storage."""
    return SPACE_DATA_DIR if SPACE_DATA_DIR.is_dir() and os.access(SPACE_DATA_DIR, os.W_OK) else Path("data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by app.py and every CLI command."""
    parser.add_argument("--data-dir", type=Path, help=(
        f"where the database, models and logs live (env {ENV_VARS['data_dir']}; default ./data, or /data on a Space)"
    ))
    parser.add_argument("--starter", choices=STARTERS, help=(
        f"default policy to prepare: the packaged SmolLM2-135M-Instruct, or a tiny random GPT-2 for tests (env "
        f"{ENV_VARS['starter']})"
    ))
    parser.add_argument("--researchers", help=(
        f"comma-separated annotator names with the researcher role (env {ENV_VARS['researchers']})"
    ))
    parser.add_argument("--device", help=f"auto, cpu or cuda (env {ENV_VARS['device']})")
    parser.add_argument("--pool-prompts", type=int, help=(
        "how many prompts each starter policy pre-generates (default: all)"
    ))
    parser.add_argument("--pair-prompt-sources", help=(
        f"comma-separated prompt sources the arena draws pairs from, of {', '.join(PROMPT_SOURCES)} (default: all)"
    ))
    parser.add_argument("--pair-prompt-collections", help=(
        "comma-separated prompt collections (named imports) the arena draws pairs from (default: all prompts)"
    ))
    for name, (kind, _, _, text) in QUALITY_FLAGS.items():
        default = Settings.__dataclass_fields__[name].default
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=(
            f"{text} (env {ENV_VARS[name]}; default {default})"
        ))
    parser.add_argument("--trusted-proxies", help=(
        f"comma-separated proxy addresses or networks (e.g. 10.0.0.0/8) whose X-Forwarded-For header names the "
        f"client; default none: the connecting address counts (env {ENV_VARS['trusted_proxies']})"
    ))
    parser.add_argument("--metrics-corpus", type=Path, help=(
        f"story corpus (.txt or .jsonl) for each policy's held-out perplexity on the Metrics tab; none: not measured "
        f"(env {ENV_VARS['metrics_corpus']})"
    ))
    parser.add_argument("--admins", help=(
        f"comma-separated Hugging Face usernames with the admin role when signed in with Hugging Face (env "
        f"{ENV_VARS['admins']})"
    ))
    parser.add_argument("--hub-dataset", help=(
        f"Hub dataset repo (owner/name) the preferences are published to (env {ENV_VARS['hub_dataset']})"
    ))
    parser.add_argument("--hub-publish-minutes", type=float, help=(
        f"publish the preferences every N minutes; 0 = only on demand (env {ENV_VARS['hub_publish_minutes']})"
    ))
    parser.add_argument("--light-jobs", type=int, help=(
        "light jobs (publish, push, story pools, prepare) run at once beside the one training job "
        f"(env {ENV_VARS['light_jobs']}; default 1)"))
    parser.add_argument("--train-processes", type=int, help=(
        "processes each training job runs in, started by `accelerate launch` when more than 1 "
        f"(one per GPU; on CPU they talk over gloo) (env {ENV_VARS['train_processes']}; default 1)"))
    parser.add_argument("--accelerate-config", type=Path, help=(
        "an `accelerate config` file training jobs are launched with (multi-GPU, multi-node, DeepSpeed, FSDP); "
        f"its num_processes holds unless --train-processes is given (env {ENV_VARS['accelerate_config']})"))


def from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    def pick(name: str, default=None):
        value = getattr(args, name, None)
        return value if value is not None else environ.get(ENV_VARS.get(name, ""), default)

    researchers = pick("researchers", "") or ""
    hub_dataset = pick("hub_dataset") or None
    try:
        hub_publish_minutes = float(pick("hub_publish_minutes", 0) or 0)
    except ValueError:
        raise ValueError("--hub-publish-minutes must be a number of minutes.") from None
    if hub_publish_minutes < 0:
        raise ValueError("--hub-publish-minutes must be 0 (only on demand) or more.")
    if hub_publish_minutes and not hub_dataset:
        raise ValueError("--hub-publish-minutes needs --hub-dataset (the repo to publish to).")
    starter = pick("starter", "smollm2")
    if starter not in STARTERS:
        raise ValueError(f"Unknown starter {starter!r}; expected one of {', '.join(STARTERS)}.")
    pool_prompts = getattr(args, "pool_prompts", None)
    if pool_prompts is not None and pool_prompts < 1:
        raise ValueError("--pool-prompts must be at least 1.")
    pair_prompt_sources = _prompt_sources(getattr(args, "pair_prompt_sources", None))
    try:
        light_jobs = int(pick("light_jobs", 1))
    except ValueError:
        raise ValueError("--light-jobs must be an integer.") from None
    if light_jobs < 1:
        raise ValueError("--light-jobs must be at least 1.")
    train_processes, accelerate_config = _training_launch(pick)
    metrics_corpus = pick("metrics_corpus")
    if metrics_corpus is not None and not Path(metrics_corpus).expanduser().is_file():
        raise ValueError(f"--metrics-corpus {metrics_corpus} is not a file.")
    return Settings(
        data_dir=Path(pick("data_dir") or default_data_dir()).resolve(),
        host=getattr(args, "host", None) or "127.0.0.1",
        port=getattr(args, "port", None) or 7860,
        device=pick("device", "auto"),
        starter=starter,
        researchers=_name_set(researchers),
        admins=_name_set(pick("admins", "") or ""),
        hub_dataset=hub_dataset,
        hub_publish_minutes=hub_publish_minutes,
        hub_oauth=environ.get("SYSTEM") == "spaces" and all(environ.get(name) for name in OAUTH_ENV_VARS),
        researcher_key=environ.get(ENV_VARS["researcher_key"]) or None,
        hub_token=environ.get(ENV_VARS["hub_token"]) or None,
        pool_prompts=pool_prompts,
        pair_prompt_sources=pair_prompt_sources,
        pair_prompt_collections=tuple(sorted(_name_set(getattr(args, "pair_prompt_collections", None) or ""))) or None,
        trusted_proxies=_networks(pick("trusted_proxies", "") or ""),
        **_quality_settings(pick),
        metrics_corpus=Path(metrics_corpus).expanduser().resolve() if metrics_corpus else None,
        light_jobs=light_jobs,
        train_processes=train_processes,
        accelerate_config=accelerate_config,
    )


def _training_launch(pick) -> tuple[int, Path | None]:
    """--train-processes and --accelerate-config, checked."""
    try:
        train_processes = int(pick("train_processes", 1))
    except ValueError:
        raise ValueError("--train-processes must be an integer.") from None
    if not 1 <= train_processes <= 1024:
        raise ValueError(f"--train-processes must be between 1 and 1024, got {train_processes}.")
    config = pick("accelerate_config")
    if config is None or str(config) == "":
        return train_processes, None
    path = Path(config).expanduser()
    if not path.is_file():
        raise ValueError(f"--accelerate-config {config} is not a file.")
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        load_config_from_file(str(path))
    except Exception as exc:  # YAML/JSON syntax or accelerate's own field checks
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"--accelerate-config {config} is not an accelerate config: {first_line}") from None
    return train_processes, path.resolve()


def _prompt_sources(text: str | None) -> tuple[str, ...] | None:
    """--pair-prompt-sources as a tuple of known sources; None (all) when not given."""
    if text is None:
        return None
    chosen = {s.strip() for s in text.split(",") if s.strip()}
    unknown = sorted(chosen - set(PROMPT_SOURCES))
    if unknown or not chosen:
        raise ValueError(f"--pair-prompt-sources takes sources of {', '.join(PROMPT_SOURCES)}, got {text!r}.")
    return tuple(s for s in PROMPT_SOURCES if s in chosen)


def _networks(text: str) -> tuple[str, ...]:
    """--trusted-proxies as checked address or network strings (uvicorn's syntax)."""
    chosen = tuple(n.strip() for n in text.split(",") if n.strip())
    for network in chosen:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(
                f"--trusted-proxies takes addresses or networks like 10.0.0.0/8, got {network!r}."
            ) from None
    return chosen


def _name_set(text: str) -> frozenset[str]:
    return frozenset(n.strip() for n in text.split(",") if n.strip())


def _quality_settings(pick) -> dict:
    """The quality flags given (flag or environment), checked; absent ones keep the defaults."""
    chosen = {}
    for name, (kind, lowest, highest, _) in QUALITY_FLAGS.items():
        value = pick(name)
        if value is None or value == "":
            continue
        flag = f"--{name.replace('_', '-')}"
        try:
            value = kind(value)
        except ValueError:
            raise ValueError(f"{flag} must be a{'n integer' if kind is int else ' number'}, got {value!r}.") from None
        if not lowest <= value <= highest:
            raise ValueError(f"{flag} must be between {lowest} and {highest}, got {value}.")
        chosen[name] = value
    return chosen


# A job process gets the app's Settings whole: JSON of every field but the secrets, which
# travel as their own environment variables (never on a command line or in a log).
JOB_SETTINGS_ENV = "STORY_ARENA_JOB_SETTINGS"
SECRET_FIELDS = ("researcher_key", "hub_token")


def job_environment(settings: Settings) -> dict[str, str]:
    """Environment variables that carry `settings` to a job process (see job_settings)."""
    values = {f.name: getattr(settings, f.name) for f in fields(Settings) if f.name not in SECRET_FIELDS}
    env = {JOB_SETTINGS_ENV: json.dumps(values, default=lambda v: sorted(v) if isinstance(v, frozenset) else str(v))}
    for name in SECRET_FIELDS:
        if getattr(settings, name):
            env[ENV_VARS[name]] = getattr(settings, name)
    return env


def job_settings(environ: Mapping[str, str]) -> Settings | None:
    """The Settings a job process was given by job_environment; None when it was given none."""
    text = environ.get(JOB_SETTINGS_ENV)
    if text is None:
        return None
    values = json.loads(text)
    for f in fields(Settings):
        value = values.get(f.name)
        if value is not None and "Path" in f.type:
            values[f.name] = Path(value)
        elif value is not None and f.type.startswith("frozenset"):
            values[f.name] = frozenset(value)
        elif value is not None and f.type.startswith("tuple"):
            values[f.name] = tuple(value)
    return Settings(**values, **{name: environ.get(ENV_VARS[name]) or None for name in SECRET_FIELDS})
