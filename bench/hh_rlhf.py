"""Reading Anthropic's HH-RLHF preference pairs (../shared/data), shared by the benches.

Each record holds two whole dialogues, `chosen` and `rejected`, that share every turn but
the last assistant answer. A held-out split of these pairs is by their first human turn
(`first_turn`): the same opening question recurs across records and across the data set's
splits, so a split by record would score a model on questions it trained on.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from rlhf.heldout import normalised_prompt, split_by_prompt

ASSISTANT, HUMAN = "\n\nAssistant:", "\n\nHuman:"


def split_dialogue(chosen: str, rejected: str) -> dict | None:
    """The shared dialogue before the last answer (`prompt`), its first and last human turns
    (`first_turn`, `last_turn`) and both answers; None when the dialogues differ earlier or
    the answers are empty or equal."""
    cut = chosen.rfind(ASSISTANT)
    if cut < 0 or not rejected.startswith(chosen[: cut + len(ASSISTANT)]):
        return None
    prompt = chosen[:cut].strip()
    good, bad = chosen[cut + len(ASSISTANT):].strip(), rejected[cut + len(ASSISTANT):].strip()
    last_turn = chosen[chosen.rfind(HUMAN, 0, cut) + len(HUMAN): cut].strip()
    opening = chosen.find(HUMAN) + len(HUMAN) if chosen.find(HUMAN) >= 0 else 0
    first_turn = chosen[opening: chosen.find(ASSISTANT, opening)].strip()
    if not prompt or not first_turn or not last_turn or not good or not bad or good == bad:
        return None
    return {"prompt": prompt, "first_turn": first_turn, "last_turn": last_turn, "chosen": good, "rejected": bad}


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


def split_by_first_turn(pairs: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs with no first human turn on both sides (rlhf.heldout.split_by_prompt
    keyed on it)."""
    train, held_out = split_by_prompt([{"prompt": p["first_turn"], "pair": p} for p in pairs], eval_fraction)
    return [r["pair"] for r in train], [r["pair"] for r in held_out]


def without_turns_of(pairs: list[dict], others: list[dict]) -> list[dict]:
    """The pairs whose first human turn (normalised as the split sees it) none of `others` has:
    a test file made disjoint by prompt from a training file."""
    seen = {normalised_prompt(p["first_turn"]) for p in others}
    return [p for p in pairs if normalised_prompt(p["first_turn"]) not in seen]


def report_records(pairs: list[dict]) -> list[dict]:
    """Pairs as rlhf.heldout.pairwise_report reads them: clustered by first human turn, which
    is also the prompt its prompt-keyword baseline reads."""
    return [{"prompt": p["first_turn"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
