"""The arena's schema, as an ordered list of sqlite-utils migrations.

Never edit an applied migration: add a new one below it. Times are Unix seconds (REAL);
JSON columns hold text that storage functions encode and decode.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

MIGRATIONS = Migrations("story_arena")

# Per policy pair, human votes only: keeps pair selection a constant-cost read however
# large the votes table grows. Maintained by triggers so no code path can forget it.
_PAIR_STATS_TRIGGERS = (
    """
CREATE TRIGGER votes_pair_stats_insert AFTER INSERT ON votes WHEN NEW.source = 'human'
BEGIN
  INSERT INTO policy_pairs (model_lo, model_hi, votes, lo_wins, hi_wins, ties, both_bad)
  VALUES (
    min(NEW.model_a, NEW.model_b), max(NEW.model_a, NEW.model_b), 1,
    (NEW.choice = 'a' AND NEW.model_a < NEW.model_b) OR (NEW.choice = 'b' AND NEW.model_b < NEW.model_a),
    (NEW.choice = 'a' AND NEW.model_a > NEW.model_b) OR (NEW.choice = 'b' AND NEW.model_b > NEW.model_a),
    NEW.choice = 'tie', NEW.choice = 'both_bad')
  ON CONFLICT (model_lo, model_hi) DO UPDATE SET
    votes = votes + 1,
    lo_wins = lo_wins + excluded.lo_wins,
    hi_wins = hi_wins + excluded.hi_wins,
    ties = ties + excluded.ties,
    both_bad = both_bad + excluded.both_bad;
END
""",
    """
CREATE TRIGGER votes_pair_stats_delete AFTER DELETE ON votes WHEN OLD.source = 'human'
BEGIN
  UPDATE policy_pairs SET
    votes = votes - 1,
    lo_wins = lo_wins - ((OLD.choice = 'a' AND OLD.model_a < OLD.model_b) OR (OLD.choice = 'b' AND OLD.model_b < OLD.model_a)),
    hi_wins = hi_wins - ((OLD.choice = 'a' AND OLD.model_a > OLD.model_b) OR (OLD.choice = 'b' AND OLD.model_b > OLD.model_a)),
    ties = ties - (OLD.choice = 'tie'),
    both_bad = both_bad - (OLD.choice = 'both_bad')
  WHERE model_lo = min(OLD.model_a, OLD.model_b) AND model_hi = max(OLD.model_a, OLD.model_b);
END
""",  # noqa: E501 (the trigger's SQL as an applied migration created it)
)


@MIGRATIONS()
def m001_initial(db: Database) -> None:
    db["annotators"].create(
        {"id": int, "name": str, "role": str, "created_at": float},
        pk="id",
        not_null={"name", "role"},
    )
    db["annotators"].create_index(["name"], unique=True)

    db["jobs"].create(
        {
            "id": int, "kind": str, "params": str, "status": str, "progress": float,
            "message": str, "log_path": str, "pid": int, "created_at": float,
            "started_at": float, "finished_at": float, "result_model_id": int,
            "error": str, "metrics": str, "created_by": int,
        },
        pk="id",
        not_null={"kind", "status"},
        defaults={"status": "queued", "progress": 0.0, "params": "{}"},
    )
    db["jobs"].create_index(["status"])

    db["models"].create(
        {
            "id": int, "name": str, "kind": str, "parent_id": int, "path": str,
            "hub_id": str, "decoding": str, "job_id": int, "created_at": float,
            "active": int, "metrics": str,
        },
        pk="id",
        not_null={"name", "kind"},
        defaults={"active": 1, "decoding": "{}", "metrics": "{}"},
        foreign_keys=[("parent_id", "models", "id"), ("job_id", "jobs", "id")],
    )
    db["models"].create_index(["name"], unique=True)

    db["prompts"].create(
        {
            "id": int, "text": str, "source": str, "parent_id": int, "operation": str,
            "created_at": float,
        },
        pk="id",
        not_null={"text", "source"},
        foreign_keys=[("parent_id", "prompts", "id")],
    )
    db["prompts"].create_index(["text"], unique=True)

    db["completions"].create(
        {
            "id": int, "prompt_id": int, "model_id": int, "text": str, "gen_params": str,
            "tokens": int, "ms": float, "created_at": float,
        },
        pk="id",
        not_null={"prompt_id", "model_id", "text"},
        foreign_keys=[("prompt_id", "prompts", "id"), ("model_id", "models", "id")],
    )
    db["completions"].create_index(["model_id", "prompt_id"], unique=True)
    db["completions"].create_index(["prompt_id"])

    # AUTOINCREMENT: an undone vote's id is never given to a later vote, so ids in
    # exports and in an annotator's undo stay unambiguous.
    votes_sql = db.create_table_sql(
        "votes",
        {
            "id": int, "prompt_id": int, "completion_a": int, "completion_b": int,
            "model_a": int, "model_b": int, "annotator_id": int, "choice": str,
            "rationale": str, "shown_at": float, "voted_at": float, "source": str,
            "confidence": float, "client_key": str,
        },
        pk="id",
        not_null={"prompt_id", "completion_a", "completion_b", "model_a", "model_b", "choice", "source"},
        defaults={"source": "human"},
        foreign_keys=[
            ("prompt_id", "prompts", "id"),
            ("completion_a", "completions", "id"),
            ("completion_b", "completions", "id"),
            ("model_a", "models", "id"),
            ("model_b", "models", "id"),
            ("annotator_id", "annotators", "id"),
        ],
    )
    db.execute(votes_sql.replace('"id" INTEGER PRIMARY KEY', '"id" INTEGER PRIMARY KEY AUTOINCREMENT', 1))
    db["votes"].create_index(["annotator_id", "client_key"], unique=True)
    db["votes"].create_index(["source", "model_a", "model_b", "choice"])
    db["votes"].create_index(["prompt_id"])

    # Every pair an annotator has voted on or skipped: they are never shown it again.
    db["seen_pairs"].create(
        {"annotator_id": int, "completion_lo": int, "completion_hi": int, "created_at": float},
        pk=("annotator_id", "completion_lo", "completion_hi"),
        foreign_keys=[("annotator_id", "annotators", "id")],
    )

    db["policy_pairs"].create(
        {
            "model_lo": int, "model_hi": int, "votes": int, "lo_wins": int,
            "hi_wins": int, "ties": int, "both_bad": int,
        },
        pk=("model_lo", "model_hi"),
    )
    for trigger in _PAIR_STATS_TRIGGERS:
        db.execute(trigger)


@MIGRATIONS()
def m002_reward_scores(db: Database) -> None:
    """Reward-model scores of pool stories, and the prediction stored with each vote.

    votes.predicted is P(story A is better) from the newest reward model that had scored
    both stories when the vote came in (votes.predicted_by): live agreement with humans.
    """
    db["reward_scores"].create(
        {"completion_id": int, "reward_model_id": int, "score": float, "created_at": float},
        pk=("completion_id", "reward_model_id"),
        not_null={"score"},
        foreign_keys=[("completion_id", "completions", "id"), ("reward_model_id", "models", "id")],
    )
    db["reward_scores"].create_index(["reward_model_id"])
    # Plain ALTER TABLE columns: a foreign key here would make sqlite-utils rebuild the
    # votes table, and with it the pair-statistics triggers.
    db["votes"].add_column("predicted", float)
    db["votes"].add_column("predicted_by", int)


@MIGRATIONS()
def m004_ratings_and_metrics(db: Database) -> None:
    """Rubric ratings and automatic metrics, kept per story so per-policy means are one query.

    ratings: one 1-5 score per (story, annotator, criterion), with the vote it followed
    (no foreign key: undo deletes a vote, and the judgement of the stories stays valid).
    story_metrics: one value per (story, metric); policy_metrics: metrics of a whole policy
    (held-out perplexity), with what they were measured on in `detail` (JSON).
    """
    db["ratings"].create(
        {"completion_id": int, "annotator_id": int, "criterion": str, "rating": int,
         "vote_id": int, "created_at": float},
        pk=("completion_id", "annotator_id", "criterion"),
        not_null={"rating"},
        foreign_keys=[("completion_id", "completions", "id"), ("annotator_id", "annotators", "id")],
    )
    db["story_metrics"].create(
        {"completion_id": int, "metric": str, "value": float},
        pk=("completion_id", "metric"),
        not_null={"value"},
        foreign_keys=[("completion_id", "completions", "id")],
    )
    db["policy_metrics"].create(
        {"model_id": int, "metric": str, "value": float, "detail": str, "computed_at": float},
        pk=("model_id", "metric"),
        not_null={"value"},
        foreign_keys=[("model_id", "models", "id")],
    )


@MIGRATIONS()
def m006_hub_identity(db: Database) -> None:
    """annotators.hub_username: set for people signed in with Hugging Face (OAuth-verified).

    Their display name is "@username", which the name form cannot produce, so nobody can
    sign in by name as a Hub user. A plain ALTER TABLE column plus a unique index.
    """
    db["annotators"].add_column("hub_username", str)
    db["annotators"].create_index(["hub_username"], unique=True)


@MIGRATIONS()
def m005_quality_controls(db: Database) -> None:
    """Gold pairs with a known answer, the gold pair behind each gold vote, and exclusion.

    gold_pairs: two stories of one prompt (ids in order, lo < hi) and the better one.
    votes.gold_id: set on votes with source 'gold'. annotators.excluded_at: set when a
    researcher leaves an annotator's votes out of training data and the leaderboard.
    Plain ALTER TABLE columns, no foreign keys: votes must not be rebuilt (its triggers).
    """
    db["gold_pairs"].create(
        {"id": int, "completion_lo": int, "completion_hi": int, "better": int,
         "created_by": int, "created_at": float},
        pk="id",
        not_null={"completion_lo", "completion_hi", "better"},
        foreign_keys=[("completion_lo", "completions", "id"), ("completion_hi", "completions", "id"),
                      ("created_by", "annotators", "id")],
    )
    db["gold_pairs"].create_index(["completion_lo", "completion_hi"], unique=True)
    db["votes"].add_column("gold_id", int)
    db["annotators"].add_column("excluded_at", float)
    db["annotators"].add_column("excluded_reason", str)


@MIGRATIONS()
def m010_annotator_identity(db: Database) -> None:
    """annotators.name_key (storage.annotators.name_key: look-alike names share it) and
    annotators.token_hash (the SHA-256 of the secret of the browser that claimed the name).

    Existing rows get their key now and no token: the next browser to sign in claims them.
    Not unique: names made before this migration may already share a key (the oldest wins).
    """
    from storage.annotators import name_key

    db["annotators"].add_column("name_key", str)
    db["annotators"].add_column("token_hash", str)
    for row in db.query("SELECT id, name FROM annotators"):
        db.execute("UPDATE annotators SET name_key = ? WHERE id = ?", [name_key(row["name"]), row["id"]])
    db["annotators"].create_index(["name_key"])


# Seeded once into content_themes by m012; researchers edit the stored list afterwards.
_DEFAULT_UNSUITABLE_THEMES = (
    "corpse", "corpses", "dead body", "dead bodies", "gore", "gory", "blood-soaked", "murder",
    "murdered", "murderer", "suicide", "self-harm", "torture", "tortured", "behead", "beheaded",
    "dismember", "dismembered", "massacre", "rape", "sex", "sexual", "sexy", "nude", "porn",
    "drugs", "cocaine", "heroin", "meth", "overdose", "drunk", "cigarette", "stab", "stabbed",
)


@MIGRATIONS()
def m012_collections_imports_and_content_checks(db: Database) -> None:
    """Prompt collections, retired prompts, imported preference data and content checks.

    prompts.collection: the named import a user prompt came from; prompts.normalized: its
    text lower-cased with punctuation and spacing removed, so near-duplicates are skipped;
    prompts.retired_at: left the arena (votes kept). prompts/completions.blocked_reason: why
    a text is kept out of the arena (content check or confirmed reports). votes.dataset: the
    data set an `import` vote came from. content_themes: whole-word patterns unfit for young
    children. reports: annotators' reports of a prompt or story, reviewed by researchers.
    Plain ALTER TABLE columns, no foreign keys: votes must not be rebuilt (its triggers).
    """
    db["prompts"].add_column("collection", str)
    db["prompts"].add_column("normalized", str)
    db["prompts"].add_column("retired_at", float)
    db["prompts"].add_column("blocked_reason", str)
    from storage.prompts import normalized_text

    db["prompts"].create_index(["normalized"])
    for row in db.query("SELECT id, text FROM prompts"):
        db["prompts"].update(row["id"], {"normalized": normalized_text(row["text"])})
    db["prompts"].create_index(["collection"])
    db["completions"].add_column("blocked_reason", str)
    db["votes"].add_column("dataset", str)
    db["votes"].create_index(["dataset"])
    db["content_themes"].create({"phrase": str, "created_at": float}, pk="phrase")
    db["content_themes"].insert_all({"phrase": phrase, "created_at": 0.0} for phrase in _DEFAULT_UNSUITABLE_THEMES)
    db["reports"].create(
        {"id": int, "annotator_id": int, "prompt_id": int, "completion_id": int, "created_at": float,
         "status": str, "reviewed_by": int, "reviewed_at": float},
        pk="id",
        not_null={"prompt_id", "status"},
        defaults={"status": "open"},
        foreign_keys=[("annotator_id", "annotators", "id"), ("prompt_id", "prompts", "id"),
                      ("completion_id", "completions", "id"), ("reviewed_by", "annotators", "id")],
    )
    db["reports"].create_index(["annotator_id", "prompt_id", "completion_id"], unique=True)
    db["reports"].create_index(["status"])


@MIGRATIONS()
def m013_job_results(db: Database) -> None:
    """jobs.result_model_ids: a JSON list, set in the transaction that registers a job's
    models (empty for kinds that make none); a re-run of a job that has it trains nothing."""
    db["jobs"].add_column("result_model_ids", str)


@MIGRATIONS()
def m011_completion_truncated(db: Database) -> None:
    """completions.truncated: 1 when the story hit the token budget before end-of-sequence
    (and was trimmed to its last finished sentence), 0 when the model ended it, NULL for
    stories written before this was recorded. A plain ALTER TABLE column."""
    db["completions"].add_column("truncated", int)


@MIGRATIONS()
def m015_prompt_requested_by(db: Database) -> None:
    """prompts.requested_by: the annotator who typed the prompt in a live battle (source
    `user`); counts their live requests against the per-annotator cap. NULL otherwise."""
    db["prompts"].add_column("requested_by", int)
    db["prompts"].create_index(["requested_by", "created_at"])


@MIGRATIONS()
def m016_rounds(db: Database) -> None:
    """round_recipe: the one recipe of automatic training rounds (row id 1; version counts
    its changes, set_by/set_at say who set it and when). rounds: each round's state machine
    (queued -> training -> collecting -> decided | failed | cancelled) with a snapshot of the
    recipe it ran, the champion it started from (parent_id), its step jobs in order, the
    reward model, the children, the newest decided human vote id when it started (the vote
    trigger counts from there), the votes its reward job used (count and hash), and each
    child's decision."""
    db["round_recipe"].create(
        {"id": int, "recipe": str, "version": int, "set_by": int, "set_at": float},
        pk="id", not_null={"recipe", "version"},
        foreign_keys=[("set_by", "annotators", "id")],
    )
    db["rounds"].create(
        {
            "id": int, "status": str, "trigger": str, "recipe": str, "parent_id": int,
            "job_ids": str, "reward_model_id": int, "child_ids": str, "votes_after": int,
            "votes_used": int, "votes_hash": str, "results": str, "promoted_id": int,
            "decision": str, "reason": str, "created_by": int, "created_at": float,
            "updated_at": float, "finished_at": float,
        },
        pk="id", not_null={"status", "recipe", "parent_id"},
        foreign_keys=[("parent_id", "models", "id"), ("reward_model_id", "models", "id"),
                      ("promoted_id", "models", "id"), ("created_by", "annotators", "id")],
    )
    db["rounds"].create_index(["status"])
