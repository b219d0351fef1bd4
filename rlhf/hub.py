"""Every Hugging Face Hub call: preferences published as a dataset repo, checkpoints pushed
as model repos, each with its card.

Uploads run as background jobs (`publish`, `push`) in their own process, so a slow Hub never
blocks voting; `PublishSchedule` queues a `publish` job every few minutes. The API object is
injectable (tests pass an in-process fake that records commits), and `make_api` is the one
place a real client is built. The token comes only from Settings.hub_token; every error is
re-raised with the token scrubbed and without the original exception chained, so it never
reaches a log, a job row or the page. Repos are created private: nothing becomes public by
accident; make a repo public on the Hub when it is ready.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import CommitOperationAdd, DatasetCard, DatasetCardData, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from rlhf.export import preference_records, write_jsonl
from rlhf.heldout import heldout_markdown
from rlhf.settings import Settings
from storage import jobs as job_rows
from storage import models, votes
from storage.db import Store
from storage.models import ModelRecord

DATASET_LICENSE = "cc-by-4.0"
DATA_FILE = "data/train.jsonl"
SCHEDULE_CHECK_S = 30.0
# Parts of a checkpoint folder that do not belong in a model repo: trainer state kept only
# so an interrupted job can resume, hidden files, half-written temporaries.
SKIPPED_PARTS = re.compile(r"^(checkpoint-\d+|\..*|.*\.tmp)$")
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{8,}")
COLUMN_MEANINGS = {
    "prompt": "the story prompt both stories answer",
    "chosen": "the story the annotator preferred",
    "rejected": "the other story",
    "source": "`human` for people's votes",
    "vote_id": "the vote's id in the arena database (stable across publishes)",
    "margin": "confidence of the label, where known",
}

Progress = Callable[[float, str], None]


class HubError(RuntimeError):
    """A Hub call failed; the message is safe to show (no token in it)."""


def scrub(text: str, token: str | None) -> str:
    """The text with the token, and anything shaped like a Hub token, blanked out."""
    if token:
        text = text.replace(token, "***")
    return TOKEN_PATTERN.sub("hf_***", text)


@contextmanager
def _hub_call(settings: Settings, what: str) -> Iterator[None]:
    try:
        yield
    except HubError:
        raise
    except Exception as exc:
        # `from None`: a chained original would print the unscrubbed text in tracebacks.
        raise HubError(f"{what} failed: {scrub(f'{type(exc).__name__}: {exc}', settings.hub_token)}") from None


def require_token(settings: Settings) -> None:
    if not settings.hub_token:
        raise ValueError("Uploading to the Hub needs a token with write access: set HF_TOKEN (a Space secret).")


def make_api(settings: Settings) -> HfApi:
    """The real Hub client: the one place one is built."""
    require_token(settings)
    return HfApi(token=settings.hub_token)


def check_repo_id(repo_id: str | None, what: str) -> str:
    """A Hub repo id `owner/name`; the error names the setting or field it came from."""
    repo_id = (repo_id or "").strip()
    if not repo_id:
        raise ValueError(f"{what} is not set: give a Hub repo id like owner/name.")
    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("expected owner/name")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"{what} must be a Hub repo id like owner/name, got {repo_id!r}.") from None
    return repo_id


def _commit(api, settings: Settings, repo_id: str, repo_type: str, operations: list, message: str) -> dict:
    with _hub_call(settings, f"Uploading to {repo_type} repo {repo_id}"):
        api.create_repo(repo_id=repo_id, repo_type=repo_type, private=True, exist_ok=True)
        info = api.create_commit(repo_id=repo_id, repo_type=repo_type, operations=operations,
                                 commit_message=message)
    return {"repo": repo_id, "commit": info.oid, "url": info.commit_url}


# --- preferences as a dataset ------------------------------------------------------------

def queue_publish(store: Store, settings: Settings, created_by: int | None = None) -> int:
    """Queue a `publish` job (the Data tab's button and the schedule)."""
    repo_id = check_repo_id(settings.hub_dataset, "--hub-dataset (STORY_ARENA_HUB_DATASET)")
    require_token(settings)
    return job_rows.create_job(store.db, "publish", {"repo": repo_id}, created_by)


def dataset_summary(store: Store, records: list[dict]) -> dict:
    """Counts the dataset card states: preferences, prompts, annotators, columns."""
    from rlhf.training import data_snapshot

    published = {r["vote_id"] for r in records}
    annotators = {row["annotator_id"] for row in votes.preference_rows(store.db) if row["id"] in published}
    columns = [c for c in COLUMN_MEANINGS if any(c in r for r in records)]
    return {
        "records": len(records), "prompts": len({r["prompt"] for r in records}),
        "annotators": len(annotators), "columns": columns, **data_snapshot(records),
    }


def dataset_card(summary: dict, repo_id: str) -> DatasetCard:
    data = DatasetCardData(
        license=DATASET_LICENSE, language="en", pretty_name="Story Arena preferences",
        task_categories="text-generation", tags=["rlhf", "preference", "trl", "story-arena"],
        size_categories=_size_category(summary["records"]),
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILE}]}],
    )
    columns = "\n".join(f"| `{c}` | {COLUMN_MEANINGS[c]} |" for c in summary["columns"])
    body = f"""
# Story Arena preferences

People compared two children's stories written for the same prompt in Story Arena and said
which was better. Each decided vote is one row in TRL's preference format (`prompt`, `chosen`,
`rejected`), ready for `RewardTrainer` or `DPOTrainer`. Ties and both-bad votes are left out;
annotators are not identified.

```python
from datasets import load_dataset
prefs = load_dataset("{repo_id}", split="train")
```

## Columns

| column | meaning |
|---|---|
{columns}

## Counts

- preferences: {summary['records']}
- prompts: {summary['prompts']}
- annotators: {summary['annotators']}
- data snapshot: `{summary['data_hash']}` (the hash a Story Arena checkpoint's lineage records for the votes
  it trained on)
- published: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}

## License

{DATASET_LICENSE}
"""
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _size_category(count: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if count < limit:
            return label
    return "100K<n<1M"


def publish_preferences(store: Store, settings: Settings, repo_id: str, api=None,
                        progress: Progress | None = None) -> dict:
    """Commit the decided human votes and their card to the dataset repo; skipped (no
    commit) when the same votes were already published there."""
    progress = progress or (lambda fraction, message: None)
    repo_id = check_repo_id(repo_id, "the dataset repo")
    folder = settings.data_dir / "hub" / "dataset"
    records = list(preference_records(store))
    summary = dataset_summary(store, records)
    state_path = folder / "published.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get(repo_id) == summary["data_hash"]:
        progress(1.0, f"{repo_id} already has these {summary['records']} preferences")
        return {"repo": repo_id, "skipped": True, **summary}
    progress(0.2, f"writing {summary['records']} preferences")
    write_jsonl(records, folder / DATA_FILE)
    card_path = folder / "README.md"
    dataset_card(summary, repo_id).save(card_path)
    api = api or make_api(settings)
    progress(0.5, f"uploading to {repo_id}")
    operations = [CommitOperationAdd(path_in_repo=DATA_FILE, path_or_fileobj=str(folder / DATA_FILE)),
                  CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card_path))]
    result = _commit(api, settings, repo_id, "dataset", operations,
                     f"Story Arena: {summary['records']} preferences ({summary['data_hash']})")
    state_path.write_text(json.dumps({**state, repo_id: summary["data_hash"]}))
    return {**result, **summary}


class PublishSchedule:
    """Queues a `publish` job every `hub_publish_minutes` (the job worker ticks it), never
    while one is queued or running; the job itself skips when nothing changed."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.clock = clock
        self._next_check = 0.0

    @property
    def enabled(self) -> bool:
        s = self.settings
        return bool(s.hub_publish_minutes > 0 and s.hub_dataset and s.hub_token)

    def tick(self, store: Store) -> int | None:
        """The id of the job it queued, if one was due."""
        now = self.clock()
        if not self.enabled or now < self._next_check:
            return None
        self._next_check = now + SCHEDULE_CHECK_S
        last = job_rows.list_jobs(store.db, limit=1, kind="publish")
        if last and (last[0]["status"] in job_rows.ACTIVE
                     or now - last[0]["created_at"] < self.settings.hub_publish_minutes * 60):
            return None
        return queue_publish(store, self.settings)


# --- checkpoints as model repos ----------------------------------------------------------

def queue_push(store: Store, settings: Settings, model_id, repo_id: str, created_by: int | None = None) -> int:
    """Queue a `push` job for a local checkpoint (the Models tab's button)."""
    record = _pushable(store, model_id)
    repo_id = check_repo_id(repo_id, "Hub model repo")
    require_token(settings)
    return job_rows.create_job(store.db, "push", {"model_id": record.id, "repo": repo_id}, created_by)


def _pushable(store: Store, model_id) -> ModelRecord:
    try:
        record = models.get_model(store.db, int(model_id))
    except (TypeError, ValueError):
        raise ValueError(f"model id must be a policy id, got {model_id!r}.") from None
    if not record.path or not Path(record.path).is_dir():
        raise ValueError(f"Policy {record.id} ({record.name}) has no local folder to push"
                         + (f"; it loads from the Hub id {record.hub_id}." if record.hub_id else "."))
    return record


def lineage(store: Store, record: ModelRecord) -> list[ModelRecord]:
    """The model, its parent, and so on up to the root."""
    chain, seen = [record], {record.id}
    while chain[-1].parent_id is not None and chain[-1].parent_id not in seen:
        chain.append(models.get_model(store.db, chain[-1].parent_id))
        seen.add(chain[-1].id)
    return chain


def model_card(store: Store, settings: Settings, record: ModelRecord, repo_id: str) -> ModelCard:
    chain = lineage(store, record)
    base = next((m.hub_id for m in chain[1:] if m.hub_id), None)
    data = ModelCardData(
        library_name="transformers", base_model=base,
        tags=["story-arena", record.kind, *(["trl"] if record.kind in ("reward", "dpo", "rloo") else [])],
        datasets=[settings.hub_dataset] if settings.hub_dataset else None,
        pipeline_tag="text-classification" if record.kind == "reward" else "text-generation",
    )
    steps = "\n".join(
        f"{i + 1}. **{m.name}** (arena id {m.id}, kind `{m.kind}`"
        + (f", job {m.job_id}" if m.job_id else "") + (f", Hub `{m.hub_id}`" if m.hub_id else "") + ")"
        for i, m in enumerate(chain)
    )
    metrics = record.metrics or {}
    snapshot = (f"{metrics['votes_used']} votes, snapshot `{metrics['data_hash']}`"
                if "data_hash" in metrics else "not recorded (not trained on votes)")
    held_out = heldout_markdown(metrics.get("heldout"))
    evaluation = f"## Held-out evaluation\n\n{held_out}\n\n" if held_out else ""
    body = f"""
# {record.name}

A `{record.kind}` model from Story Arena, where people vote on pairs of children's stories
and the votes train the next models. Pushed from the arena as `{repo_id}`.

- training kind: `{record.kind}`
- job: {record.job_id if record.job_id is not None else "none (added by hand)"}
- data: {snapshot}
- decoding in the arena: `{json.dumps(record.decoding)}`

## Lineage

From this model to its root:

{steps}

{evaluation}## Metrics

```json
{json.dumps(metrics, indent=2, sort_keys=True, default=str)}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() != "README.md"
        and not any(SKIPPED_PARTS.match(part) for part in p.relative_to(folder).parts)
    )


def push_model(store: Store, settings: Settings, model_id, repo_id: str, api=None,
               progress: Progress | None = None) -> dict:
    """Commit a checkpoint folder and its model card (lineage, kind, data, metrics)."""
    progress = progress or (lambda fraction, message: None)
    record = _pushable(store, model_id)
    repo_id = check_repo_id(repo_id, "the model repo")
    folder = Path(record.path)
    card = model_card(store, settings, record, repo_id)
    files = checkpoint_files(folder)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    api = api or make_api(settings)
    progress(0.2, f"uploading {len(files)} files of {record.name} to {repo_id}")
    result = _commit(api, settings, repo_id, "model", operations, f"Story Arena: {record.name} ({record.kind})")
    return {**result, "model_id": record.id, "files": len(files) + 1}
