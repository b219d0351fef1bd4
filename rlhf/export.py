"""Votes as training data in TRL's preference format (`prompt`, `chosen`, `rejected`)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from storage import votes
from storage.db import Store


def preference_records(
    store: Store, sources: tuple[str, ...] = ("human",), include_undecided: bool = False,
    min_annotators: int = 1, datasets: Sequence[str] | None = None,
) -> Iterator[dict]:
    """One record per decided vote; ties and both-bad are skipped, or kept with `label` set.

    `sources` may include "import" (imported preference data sets), restricted to the named
    `datasets` when given; records keep their source and data set name.
    min_annotators > 1 keeps only votes on story pairs that at least that many different
    annotators judged (any verdict), a guard against one person's idiosyncrasies.
    """
    rows = votes.preference_rows(store.db, sources, datasets)
    if min_annotators > 1:
        rows = list(rows)
        judges: dict[frozenset, set] = defaultdict(set)
        for row in rows:
            judges[frozenset((row["completion_a"], row["completion_b"]))].add(row["annotator_id"])
        rows = [r for r in rows if len(judges[frozenset((r["completion_a"], r["completion_b"]))]) >= min_annotators]
    for row in rows:
        decided = row["choice"] in ("a", "b")
        if not decided and not include_undecided:
            continue
        chosen, rejected = (row["text_b"], row["text_a"]) if row["choice"] == "b" else (row["text_a"], row["text_b"])
        record = {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                  "source": row["source"], "vote_id": row["id"]}
        if row["dataset"] is not None:
            record["dataset"] = row["dataset"]
        if row["confidence"] is not None:
            record["margin"] = row["confidence"]
        if not decided:
            record["label"] = row["choice"]
        yield record


def jsonl_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(records: Iterable[dict], path: Path) -> int:
    """Write JSON lines atomically (a reader never sees half a file); returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(jsonl_line(record))
            count += 1
    os.replace(tmp, path)
    return count
