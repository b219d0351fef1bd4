"""Importing preference data sets in TRL's format, to train on beside (or instead of) the
arena's own votes.

Accepted rows: `prompt`/`chosen`/`rejected` texts, or the conversational form where each is
a list of {role, content} messages (the prompt may be left out: then it is the messages
chosen and rejected share). From a .jsonl file, a Hub dataset id or a local dataset folder.
Pairs are stored as votes with source `import` and the data set's name (storage.votes.
import_pairs): they never reach the leaderboard, annotator statistics or gold checks, and
training reads them only when asked (rlhf.export.preference_records(sources=..., datasets=...)).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from rlhf import safety
from rlhf.records import ImportRejected, file_records, hub_records, text_problem
from rlhf.settings import Settings
from storage import votes
from storage.db import Store
from storage.votes import ImportedPair

DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
COLUMNS = ("prompt", "chosen", "rejected")


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not DATASET_NAME.match(name):
        raise ValueError("name: 1-40 letters, digits, '.', '_' or '-', starting with a letter or digit.")
    return name


def _is_conversation(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def conversation_text(messages: list[dict]) -> str:
    """One message as its content; several as "role: content" lines (what the reader saw)."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def pair_texts(row: dict | None) -> tuple[str, str, str] | str:
    """(prompt, chosen, rejected) from a TRL-format row, or why the row is unusable."""
    if row is None:
        return "not a JSON object"
    missing = [c for c in ("chosen", "rejected") if c not in row]
    if missing:
        return f"no {' or '.join(missing)} field"
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if _is_conversation(chosen) and _is_conversation(rejected):
        if prompt is None:  # implicit prompt: the messages both conversations start with
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not _is_conversation(prompt) or not prompt:
            return "the prompt is not a list of {role, content} messages"
        return conversation_text(prompt), conversation_text(chosen), conversation_text(rejected)
    if prompt is None:
        return "no prompt field"
    return prompt, chosen, rejected


def read_pairs(source: str, split: str = "train", token: str | None = None) -> Iterable[tuple[str, dict | None]]:
    """(where, row) from a .jsonl file, or else a Hub dataset id or local dataset folder."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".jsonl":
            raise ValueError(f"source: preference files are .jsonl (one TRL-format pair a line), got {path.name!r}.")
        return file_records(path)
    return hub_records(source, split, token)


def import_preferences(
    store: Store, settings: Settings, rows: Iterable[tuple[str, dict | None]], name: str, origin: str,
) -> dict:
    """Store a preference data set as `import` votes named `name`, all or nothing: any bad row
    (missing field, not text, empty, over the length limits, chosen equal to rejected) refuses
    the batch, naming each bad row. Texts failing the content check are stored with the reason."""
    name = check_name(name)
    limits = dict(zip(COLUMNS, (settings.max_prompt_chars, settings.max_story_chars, settings.max_story_chars)))
    texts, problems = [], []
    for where, row in rows:
        found = pair_texts(row)
        if isinstance(found, str):
            problems.append(f"{where}: {found}")
            continue
        bad = [f"{column} {problem}" for column, value in zip(COLUMNS, found)
               if (problem := text_problem(value, limits[column]))]
        if not bad and found[1].strip() == found[2].strip():
            bad = ["chosen and rejected are the same"]
        if bad:
            problems.append(f"{where}: {', '.join(bad)}")
            continue
        texts.extend(t.strip() for t in found)
    if problems:
        raise ImportRejected(problems)
    if not texts:
        raise ValueError("source: there are no preference pairs to import.")
    verdicts = safety.ContentCheck(store).many(texts)
    pairs = [ImportedPair(*texts[i:i + 3], *verdicts[i:i + 3]) for i in range(0, len(texts), 3)]
    return votes.import_pairs(store.db, name, origin, pairs)
