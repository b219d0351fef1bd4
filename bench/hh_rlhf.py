"""Reading Anthropic's HH-RLHF preference pairs (../shared/data), shared by the benches.

Each record holds two whole dialogues, `chosen` and `rejected`, that share every turn but
the last assistant answer.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

ASSISTANT, HUMAN = "\n\nAssistant:", "\n\nHuman:"


def split_dialogue(chosen: str, rejected: str) -> dict | None:
    """The shared dialogue before the last answer (`prompt`), its last human turn
    (`last_turn`) and both answers; None when the dialogues differ earlier or the answers
    are empty or equal."""
    cut = chosen.rfind(ASSISTANT)
    if cut < 0 or not rejected.startswith(chosen[: cut + len(ASSISTANT)]):
        return None
    prompt = chosen[:cut].strip()
    good, bad = chosen[cut + len(ASSISTANT):].strip(), rejected[cut + len(ASSISTANT):].strip()
    last_turn = chosen[chosen.rfind(HUMAN, 0, cut) + len(HUMAN): cut].strip()
    if not prompt or not last_turn or not good or not bad or good == bad:
        return None
    return {"prompt": prompt, "last_turn": last_turn, "chosen": good, "rejected": bad}


def read_pairs(path: Path) -> Iterator[dict]:
    """Every usable pair of a .jsonl or .jsonl.gz file, in file order."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                pair = split_dialogue(record["chosen"], record["rejected"])
                if pair is not None:
                    yield pair
