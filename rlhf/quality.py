"""Vote quality on a public arena: rate limits, gold pairs, per-annotator accuracy and
agreement, and excluding annotators from training data and the leaderboard.

Decisions:
- A vote sooner than `min_vote_seconds` after its pair appeared is refused, not stored
  (rlhf.arena.submit_vote): the pair stays on screen, so a person who clicked early votes
  again a moment later, and nothing downstream has to filter such votes out.
- Gold votes are stored with source 'gold': the pair-statistics triggers, the leaderboard
  and the training export read source 'human' only, so gold votes count nowhere but here.
- Agreement is Cohen's kappa of each annotator against the majority verdict of the other
  (not excluded) annotators on the story pairs they share. Krippendorff's alpha rates a
  whole crowd; exclusion needs one chance-corrected figure per person, and kappa's chance
  correction gives an annotator who always picks A on randomized sides about 0.
- Excluded annotators' votes stay stored (exclusion can be undone) but are left out of
  storage.votes.preference_rows (every training kind's data) and human_comparisons
  (the leaderboard). Pair scheduling still counts them: it only decides what to show.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable

from sklearn.metrics import cohen_kappa_score

from rlhf.settings import Settings
from storage import models
from storage import quality as quality_rows
from storage.db import Store

WINDOW_S = 60.0
# Stale windows are dropped once this many clients are tracked, so memory stays bounded.
PRUNE_ABOVE = 4096
MIN_SHARED_PAIRS = 3


class VoteRateLimiter:
    """Sliding windows (60 s for votes) of accepted actions per annotator and per client address.

    In memory in the app process, on purpose: the app is one process (jobs run in their own
    processes and never vote), a window lasts a minute so forgetting it on a restart costs
    nothing, and a refused request writes nothing to disk. Several replicas would each keep
    their own windows. The same class caps new annotator names per address per hour.
    """

    def __init__(self, per_annotator: int, per_address: int, clock: Callable[[], float] = time.monotonic,
                 window_s: float = WINDOW_S, what: str = "votes"):
        self.limits = {"annotator": per_annotator, "address": per_address}
        self.clock = clock
        self.window_s, self.what = window_s, what
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, object], deque] = defaultdict(deque)

    @classmethod
    def from_settings(cls, settings: Settings) -> VoteRateLimiter:
        return cls(settings.annotator_votes_per_minute, settings.ip_votes_per_minute)

    @classmethod
    def for_new_names(cls, settings: Settings) -> VoteRateLimiter:
        """New annotator names per client address per hour: the annotators table stays bounded."""
        return cls(0, settings.annotators_per_address_per_hour, window_s=3600.0, what="new names")

    def admit(self, annotator_id: int, address: str | None) -> str | None:
        """Count the vote and return None, or return why it is refused (and count nothing)."""
        now = self.clock()
        keys = [key for key in (("annotator", annotator_id), ("address", address))
                if self.limits[key[0]] and key[1] is not None]
        with self._lock:
            for kind, who in keys:
                limit, window = self.limits[kind], self._windows[(kind, who)]
                while window and window[0] <= now - self.window_s:
                    window.popleft()
                if len(window) >= limit:
                    wait = math.ceil(window[0] + self.window_s - now)
                    whose = "per annotator" if kind == "annotator" else "from one network address"
                    period = "a minute" if self.window_s == WINDOW_S else f"in {self.window_s / 60:g} minutes"
                    return f"Too many {self.what}: at most {limit} {period} {whose}. Please wait {wait} s."
            for key in keys:
                self._windows[key].append(now)
            if len(self._windows) > PRUNE_ABOVE:
                self._prune(now)
        return None

    def _prune(self, now: float) -> None:
        stale = [key for key, window in self._windows.items() if not window or window[-1] <= now - self.window_s]
        for key in stale:
            del self._windows[key]


def _policy(store: Store, name_or_id: str | int):
    text = str(name_or_id).strip()
    record = models.get_model(store.db, int(text)) if text.isdigit() else models.get_model_by_name(store.db, text)
    if record is None:
        raise LookupError(f"No policy named {text!r}.")
    return record


def add_gold_pair(store: Store, prompt_id: int, better: str | int, worse: str | int,
                  created_by: int | None = None) -> int:
    """A gold pair from two policies' stories for one prompt, the first the known better one."""
    better_model, worse_model = _policy(store, better), _policy(store, worse)
    stories = {row["model_id"]: row["id"] for row in store.db.query(
        "SELECT id, model_id FROM completions WHERE prompt_id = ?", [prompt_id])}
    for record in (better_model, worse_model):
        if record.id not in stories:
            raise LookupError(f"Policy {record.name!r} has no story for prompt {prompt_id}.")
    return quality_rows.add_gold_pair(store.db, stories[better_model.id], stories[worse_model.id], created_by)


def _kappas(judgements: list[dict], excluded: set[int]) -> dict[int, tuple[int, float | None]]:
    """Per annotator: (shared pairs, Cohen's kappa against the others' majority verdict)."""
    by_pair: dict[tuple[int, int], dict[int, str]] = defaultdict(dict)
    for row in judgements:
        by_pair[(row["completion_lo"], row["completion_hi"])][row["annotator_id"]] = row["label"]
    own: dict[int, list[str]] = defaultdict(list)
    majority: dict[int, list[str]] = defaultdict(list)
    for verdicts in by_pair.values():
        for annotator, label in verdicts.items():
            others = Counter(v for a, v in verdicts.items() if a != annotator and a not in excluded)
            ranked = others.most_common(2)
            if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
                continue  # nobody else, or no majority among them
            own[annotator].append(label)
            majority[annotator].append(ranked[0][0])
    result = {}
    for annotator, labels in own.items():
        kappa = None
        if len(labels) >= MIN_SHARED_PAIRS and len(set(labels) | set(majority[annotator])) > 1:
            value = float(cohen_kappa_score(labels, majority[annotator]))
            kappa = None if math.isnan(value) else value
        result[annotator] = (len(labels), kappa)
    return result


def report(store: Store, settings: Settings) -> list[dict]:
    """One row per annotator: votes, gold accuracy with its count, agreement, exclusion."""
    db = store.db
    gold = {r["annotator_id"]: r for r in quality_rows.gold_results(db)}
    people = quality_rows.annotator_rows(db)
    excluded = {p["id"] for p in people if p["excluded_at"] is not None}
    kappas = _kappas(quality_rows.human_judgements(db), excluded)
    rows = []
    for person in people:
        result = gold.get(person["id"], {"gold_votes": 0, "gold_correct": 0})
        accuracy = result["gold_correct"] / result["gold_votes"] if result["gold_votes"] else None
        shared, kappa = kappas.get(person["id"], (0, None))
        rows.append({
            "annotator_id": person["id"], "annotator": person["name"], "role": person["role"],
            "votes": person["votes"], "gold_votes": result["gold_votes"],
            "gold_correct": result["gold_correct"], "gold_accuracy": accuracy,
            "shared_pairs": shared, "kappa": kappa,
            "below_threshold": accuracy is not None and result["gold_votes"] >= settings.min_gold_votes
                               and accuracy < settings.min_gold_accuracy,
            "excluded": person["excluded_at"] is not None, "excluded_reason": person["excluded_reason"],
        })
    return rows


def set_excluded(store: Store, name: str, excluded: bool, reason: str = "excluded by a researcher") -> dict:
    """Exclude an annotator by name (or include them again); returns their report row."""
    people = {p["name"]: p["id"] for p in quality_rows.annotator_rows(store.db)}
    name = (name or "").strip()
    if name not in people:
        raise LookupError(f"No annotator named {name!r}.")
    quality_rows.set_excluded(store.db, [people[name]], reason if excluded else None)
    return {"annotator": name, "excluded": excluded}


def exclude_below_threshold(store: Store, settings: Settings) -> list[str]:
    """Exclude every annotator flagged by the gold-accuracy threshold; returns their names."""
    flagged = [r for r in report(store, settings) if r["below_threshold"] and not r["excluded"]]
    reason = f"gold accuracy below {settings.min_gold_accuracy:.0%} (at least {settings.min_gold_votes} gold votes)"
    quality_rows.set_excluded(store.db, [r["annotator_id"] for r in flagged], reason)
    return [r["annotator"] for r in flagged]
