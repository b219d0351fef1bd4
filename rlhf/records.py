"""Reading user-supplied records (prompt lists, preference data) from files, pasted text
and Hub datasets, each with the line or row number a researcher can find it by.

One reader for every import, so files, pastes and Hub datasets are numbered and refused
the same way: `ImportRejected` lists every bad row, and callers store nothing of a batch
that has one.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

FILE_SUFFIXES = (".txt", ".csv", ".jsonl")
MAX_REPORTED_PROBLEMS = 20


class ImportRejected(ValueError):
    """A batch with bad rows; the message names each one ("line 3: empty")."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "; ".join(problems[:MAX_REPORTED_PROBLEMS])
        more = f"; and {len(problems) - MAX_REPORTED_PROBLEMS} more" if len(problems) > MAX_REPORTED_PROBLEMS else ""
        super().__init__(f"Nothing was imported: {len(problems)} bad row{'s' if len(problems) != 1 else ''}: "
                         f"{shown}{more}.")


def text_problem(value, max_chars: int) -> str | None:
    """Why a field value is not a usable text: not text, empty, or over the length limit."""
    if not isinstance(value, str):
        return "not text"
    if not value.strip():
        return "empty"
    if len(value) > max_chars:
        return f"over {max_chars} characters"
    return None


def lines(text: str) -> Iterator[tuple[str, str]]:
    """Pasted text or a .txt file: one record per non-blank line, as ("line N", text)."""
    for number, line in enumerate((text or "").splitlines(), start=1):
        if line.strip():
            yield f"line {number}", line.strip()


def file_records(path: Path) -> Iterator[tuple[str, dict]]:
    """("line N", row) from a .jsonl file (one JSON object a line) or a .csv file with a
    header; a line that is not a JSON object is yielded as None for the caller to refuse."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ValueError(f"file: expected one of {', '.join(FILE_SUFFIXES)}, got {path.name!r}.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"file: {path.name} is not UTF-8 text.") from None
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            yield f"line {reader.line_num}", row
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        yield f"line {number}", row if isinstance(row, dict) else None


def hub_records(dataset: str, split: str, token: str | None = None) -> Iterator[tuple[str, dict]]:
    """("row N", row) from a Hub dataset id or a local dataset folder (parquet/json files,
    or one written by `save_to_disk`), through `datasets`."""
    import datasets

    folder = Path(dataset).expanduser()
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file():
            loaded = datasets.load_from_disk(str(folder))
            rows = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            rows = datasets.load_dataset(str(folder) if folder.is_dir() else dataset, split=split, token=token)
    except (OSError, KeyError, ValueError) as exc:  # the Hub's errors (missing, offline, gated) are OSErrors
        raise ValueError(f"dataset: cannot load split {split!r} of {dataset!r}: {type(exc).__name__}: {exc}") from None
    for number, row in enumerate(rows, start=1):
        yield f"row {number}", row
