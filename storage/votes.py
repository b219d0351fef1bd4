"""Votes, skips and the pair statistics that pair selection reads."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sqlite_utils import Database

from storage import completions, models, prompts
from storage.db import write_transaction

CHOICES = ("a", "b", "tie", "both_bad")
# import: pairs of an imported preference data set (votes.dataset names it); like weak and
# gold votes they count in no human statistic, only in training data that asks for them.
SOURCES = ("human", "weak", "simulated", "gold", "import")


def not_excluded(alias: str) -> str:
    """SQL condition: the row (votes or ratings, under `alias`) is not by an excluded annotator.

    Their votes and ratings stay stored but count on no leaderboard, in no training data and
    in no policy average. NOT EXISTS, not NOT IN: weak votes have no annotator and must stay.
    """
    return f"NOT EXISTS (SELECT 1 FROM annotators x WHERE x.id = {alias}.annotator_id AND x.excluded_at IS NOT NULL)"


@dataclass(frozen=True)
class ShownPair:
    """What one annotator was shown: stories in screen order (A left, B right)."""
    prompt_id: int
    completion_a: int
    completion_b: int
    model_a: int
    model_b: int
    shown_at: float
    gold_id: int | None = None  # a gold pair with a known answer (votes get source 'gold')


def _ordered(x: int, y: int) -> tuple[int, int]:
    return (x, y) if x < y else (y, x)


def record_vote(
    db: Database, pair: ShownPair, *, annotator_id: int | None, choice: str, client_key: str,
    rationale: str = "", source: str = "human", confidence: float | None = None,
    predicted: float | None = None, predicted_by: int | None = None,
) -> tuple[int, bool]:
    """Store a vote once per client key; returns (vote id, whether it was new).

    `predicted` is a reward model's P(A better) for the pair and `predicted_by` that model.
    """
    if choice not in CHOICES:
        raise ValueError(f"Unknown choice {choice!r}; expected one of {', '.join(CHOICES)}.")
    if source not in SOURCES:
        raise ValueError(f"Unknown vote source {source!r}.")
    if (pair.gold_id is not None) != (source == "gold"):
        raise ValueError("Votes on gold pairs, and only those, have source 'gold'.")
    now = time.time()
    with write_transaction(db):
        existing = db.execute(
            "SELECT id FROM votes WHERE annotator_id IS ? AND client_key = ?", [annotator_id, client_key]
        ).fetchone()
        if existing:
            return existing[0], False
        vote_id = db["votes"].insert({
            "prompt_id": pair.prompt_id, "completion_a": pair.completion_a,
            "completion_b": pair.completion_b, "model_a": pair.model_a, "model_b": pair.model_b,
            "annotator_id": annotator_id, "choice": choice, "rationale": rationale,
            "shown_at": pair.shown_at, "voted_at": now, "source": source,
            "confidence": confidence, "client_key": client_key,
            "predicted": predicted, "predicted_by": predicted_by, "gold_id": pair.gold_id,
        }).last_pk
        if annotator_id is not None:
            mark_seen(db, annotator_id, pair.completion_a, pair.completion_b)
    return vote_id, True


def mark_seen(db: Database, annotator_id: int, completion_x: int, completion_y: int) -> None:
    """Remember a pair (voted or skipped) so this annotator never gets it again."""
    lo, hi = _ordered(completion_x, completion_y)
    db["seen_pairs"].insert(
        {"annotator_id": annotator_id, "completion_lo": lo, "completion_hi": hi, "created_at": time.time()},
        ignore=True,
    )


def undo_vote(db: Database, vote_id: int, annotator_id: int, window_s: float) -> dict | None:
    """Delete the annotator's own vote if it is younger than the window; returns the deleted row."""
    rows = list(db["votes"].rows_where("id = ? AND annotator_id = ?", [vote_id, annotator_id]))
    if not rows or time.time() - rows[0]["voted_at"] > window_s:
        return None
    vote = rows[0]
    lo, hi = _ordered(vote["completion_a"], vote["completion_b"])
    with write_transaction(db):
        db.execute("DELETE FROM votes WHERE id = ?", [vote_id])
        db.execute(
            "DELETE FROM seen_pairs WHERE annotator_id = ? AND completion_lo = ? AND completion_hi = ?",
            [annotator_id, lo, hi],
        )
    return vote


def policy_pair_stats(db: Database) -> list[dict]:
    """Human vote totals per policy pair (maintained by triggers, so this read is cheap)."""
    return list(db.query("SELECT * FROM policy_pairs WHERE votes > 0"))


def find_unseen_pair(
    db: Database, annotator_id: int, model_x: int, model_y: int, prompt_sources: Sequence[str] | None = None,
    collections: Sequence[str] | None = None,
) -> dict | None:
    """A random prompt where both policies have stories this annotator has not judged together,
    among prompts of `prompt_sources` (seed, user, teams) and of `collections` only when given.
    Retired and blocked prompts and blocked stories are never served."""
    sources, chosen = list(prompt_sources or []), list(collections or [])
    # the prompt's row is found by its primary key: no scan, whatever the filter
    prompt_filter = "".join((
        f" AND p.source IN ({', '.join('?' for _ in sources)})" if sources else "",
        f" AND p.collection IN ({', '.join('?' for _ in chosen)})" if chosen else "",
    ))
    row = db.execute(
        "SELECT cx.prompt_id, cx.id AS completion_x, cy.id AS completion_y"
        " FROM completions cx JOIN completions cy"
        "   ON cy.prompt_id = cx.prompt_id AND cy.model_id = ?"
        " JOIN prompts p ON p.id = cx.prompt_id AND p.retired_at IS NULL AND p.blocked_reason IS NULL"
        f"{prompt_filter}"
        " WHERE cx.model_id = ? AND cx.blocked_reason IS NULL AND cy.blocked_reason IS NULL AND NOT EXISTS ("
        "   SELECT 1 FROM seen_pairs s WHERE s.annotator_id = ?"
        "   AND s.completion_lo = min(cx.id, cy.id) AND s.completion_hi = max(cx.id, cy.id))"
        " ORDER BY random() LIMIT 1",
        [model_y, *sources, *chosen, model_x, annotator_id],
    ).fetchone()
    if row is None:
        return None
    return {"prompt_id": row[0], "completion_x": row[1], "completion_y": row[2]}


def human_comparisons(db: Database) -> list[dict]:
    """Human votes (excluded annotators left out) as (model_a, model_b, choice, n) for ranking."""
    return list(db.query(
        "SELECT model_a, model_b, choice, count(*) AS n FROM votes v WHERE source = 'human'"
        f" AND {not_excluded('v')} GROUP BY model_a, model_b, choice"
    ))


def annotator_vote_count(db: Database, annotator_id: int) -> int:
    return db.execute(
        "SELECT count(*) FROM votes WHERE annotator_id = ?", [annotator_id]
    ).fetchone()[0]


def votes_per_annotator(db: Database) -> list[dict]:
    """People's votes per annotator (weak labels have no annotator and are left out)."""
    return list(db.query(
        "SELECT a.name AS annotator, a.role AS role,"
        " count(*) AS votes, sum(v.choice = 'tie') AS ties, sum(v.choice = 'both_bad') AS both_bad"
        " FROM votes v JOIN annotators a ON a.id = v.annotator_id"
        " GROUP BY v.annotator_id ORDER BY votes DESC"
    ))


def votes_per_source(db: Database) -> list[dict]:
    return list(db.query(
        "SELECT source, count(*) AS votes, sum(choice = 'a') + sum(choice = 'b') AS decided,"
        " sum(choice = 'tie') AS ties, sum(choice = 'both_bad') AS both_bad"
        " FROM votes GROUP BY source ORDER BY source"
    ))


def preference_rows(
    db: Database, sources: tuple[str, ...] = ("human",), datasets: Sequence[str] | None = None,
) -> Iterator[dict]:
    """Every vote with its prompt and both stories, for training data (excluded annotators left
    out); `import` votes only of the named `datasets` when given."""
    marks = ", ".join("?" for _ in sources)
    named = list(datasets or [])
    dataset_filter = (
        f" AND (v.source != 'import' OR v.dataset IN ({', '.join('?' for _ in named)}))" if named else ""
    )
    yield from db.query(
        "SELECT v.id, v.choice, v.source, v.dataset, v.confidence, v.annotator_id, v.rationale,"
        " v.completion_a, v.completion_b, p.text AS prompt, ca.text AS text_a, cb.text AS text_b,"
        " v.model_a, v.model_b"
        " FROM votes v JOIN prompts p ON p.id = v.prompt_id"
        " JOIN completions ca ON ca.id = v.completion_a"
        " JOIN completions cb ON cb.id = v.completion_b"
        f" WHERE v.source IN ({marks}){dataset_filter} AND {not_excluded('v')} ORDER BY v.id",
        [*sources, *named],
    )


@dataclass(frozen=True)
class ImportedPair:
    """One preference pair of an imported data set; blocked reasons come from the content check."""
    prompt: str
    chosen: str
    rejected: str
    blocked_prompt: str | None = None
    blocked_chosen: str | None = None
    blocked_rejected: str | None = None


def import_pairs(db: Database, dataset: str, origin: str, pairs: Sequence[ImportedPair]) -> dict:
    """Store a preference data set in one transaction: prompts (source `import` unless already
    stored), each side's story as a completion of an `external` policy, and one vote per pair
    (source `import`, choice `a`: the chosen story is side A).

    A policy has one story per prompt, so a prompt's k-th pair goes to the k-th pair of
    external policies ("NAME-a", "NAME-b", then "NAME-a2", "NAME-b2", ...)."""
    now = time.time()
    with write_transaction(db):
        if db.execute("SELECT 1 FROM votes WHERE dataset = ? LIMIT 1", [dataset]).fetchone():
            raise ValueError(f"A data set named {dataset!r} is already imported: choose another --name.")
        sides: list[tuple[int, int]] = []
        occurrences: dict[int, int] = defaultdict(int)
        for number, pair in enumerate(pairs):
            prompt_id = prompts.prompt_id_for(db, pair.prompt, "import", dataset, pair.blocked_prompt)
            k = occurrences[prompt_id]
            occurrences[prompt_id] += 1
            if k == len(sides):
                suffix = str(k + 1) if k else ""
                sides.append(tuple(
                    models.add_model(db, f"{dataset}-{side}{suffix}", "external", hub_id=origin, active=False).id
                    for side in ("a", "b")
                ))
            model_a, model_b = sides[k]
            completion_a = completions.add_completion(db, prompt_id, model_a, pair.chosen,
                                                      blocked_reason=pair.blocked_chosen)
            completion_b = completions.add_completion(db, prompt_id, model_b, pair.rejected,
                                                      blocked_reason=pair.blocked_rejected)
            db["votes"].insert({
                "prompt_id": prompt_id, "completion_a": completion_a, "completion_b": completion_b,
                "model_a": model_a, "model_b": model_b, "annotator_id": None, "choice": "a",
                "voted_at": now, "source": "import", "dataset": dataset, "client_key": f"import:{dataset}:{number}",
            })
    return {"dataset": dataset, "pairs": len(pairs), "policies": len(sides) * 2,
            "prompts": len(occurrences), "blocked_texts": sum(
                (p.blocked_prompt is not None) + (p.blocked_chosen is not None) + (p.blocked_rejected is not None)
                for p in pairs)}


def imported_datasets(db: Database) -> list[dict]:
    """Imported preference data sets with their pair counts."""
    return list(db.query(
        "SELECT dataset, count(*) AS pairs, min(voted_at) AS imported_at FROM votes"
        " WHERE source = 'import' GROUP BY dataset ORDER BY imported_at"
    ))


def human_vote_total(db: Database) -> int:
    """Total human votes, from the trigger-maintained pair table (cheap at any size)."""
    return db.execute("SELECT coalesce(sum(votes), 0) FROM policy_pairs").fetchone()[0]
