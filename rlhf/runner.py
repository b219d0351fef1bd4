"""The contract every training kind follows, and the runner that owns a job's life.

A kind is one module with a Params dataclass and `run(ctx) -> JobResult`, declared once
as a `Kind`. The runner does everything around it, the same way for every kind: the
re-run guard (a re-queued job whose results are recorded trains nothing and registers
nothing twice), the output folder, which checkpoint to resume from, atomic saving,
registering all of a job's models in one transaction, the job's metrics, and removing
the resume checkpoints once the result is safe. Database writes happen on the main
process only, so a job launched with several processes (accelerate) registers once.

Adding a kind: write its module (Params + run + `KIND = Kind(...)`) and name the module
in KIND_MODULES, or call `declare(kind)` (tests do) before queuing its jobs.
"""

from __future__ import annotations

import importlib
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.progress import JobProgress, is_main_process
from rlhf.settings import Settings
from storage import jobs as job_rows
from storage import models
from storage.db import Store, write_transaction
from storage.models import ModelRecord

# Each training kind's module; imported only when the kind is used (most import torch).
KIND_MODULES = {
    "reward": "rlhf.reward", "dpo": "rlhf.dpo", "rloo": "rlhf.rloo", "pretrain": "rlhf.pretrain",
    "dph": "rlhf.dph", "weak": "rlhf.weak", "teams": "rlhf.teams",
    "raft": "rlhf.raft",
}
MODEL_FOLDER = "model"


@dataclass(frozen=True)
class ModelSpec:
    """A model a job made, to register: `parent` is a stored model or an earlier spec of
    the same result (registered first, in the same transaction). A policy enters the
    arena (active, story pool queued); its decoding defaults to its parent's."""

    name: str
    kind: str
    path: Path
    parent: ModelRecord | ModelSpec | None = None
    metrics: dict = field(default_factory=dict)
    policy: bool = True
    decoding: dict | None = None


@dataclass(frozen=True)
class JobResult:
    """What a kind's run returns: models to register and the job's metrics (the first
    model's metrics when empty). `writes(store)` holds store writes that belong to the
    result (e.g. evolved prompts); it runs in the registering transaction."""

    models: list[ModelSpec] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    message: str = ""
    writes: Callable[[Store], None] | None = None


@dataclass
class JobContext:
    """Everything a kind's run gets: it reads the store and writes files under output_dir."""

    settings: Settings
    params: object
    progress: JobProgress
    job_id: int | None
    output_dir: Path
    resume_from: str | None
    store: Store
    # What run leaves for evaluate in the same process (e.g. cached features); empty on a re-run.
    memo: dict = field(default_factory=dict)

    @property
    def resumed_step(self) -> int:
        """The trainer step the resume checkpoint holds (0 when starting fresh)."""
        return int(Path(self.resume_from).name.rsplit("-", 1)[-1]) if self.resume_from else 0

    def save_model(self, write: Callable[[Path], None], folder: str = MODEL_FOLDER) -> Path:
        """Write the job's model folder atomically: write(tmp) fills a temp folder that is
        renamed into place, so a kill never leaves a half-written model. In a multi-process
        job the main process writes it (data-parallel ranks hold the same weights) while the
        others wait, so no two processes rename the same folder."""
        from accelerate import PartialState

        from rlhf.models import save_atomically

        state = PartialState()
        target = self.output_dir / folder
        if state.is_main_process:
            save_atomically(target, write)
        state.wait_for_everyone()
        return target

    def register_now(self, spec: ModelSpec) -> ModelRecord | None:
        """Register a model while the job still runs (pretrain's arena checkpoints): once
        per job and folder, so a re-run of the job gets the same row back. None off the
        main process, which registers nothing."""
        if not is_main_process():
            return None
        for record in models.list_models(self.store.db):
            if record.job_id == self.job_id and self.job_id is not None and record.path == str(spec.path):
                return record
        with write_transaction(self.store.db):
            return _register(self.store, self.settings, spec, self.job_id, spec.parent)


def model_writer(model, tokenizer) -> Callable[[Path], None]:
    """The usual `write` for JobContext.save_model: a transformers model and its tokenizer."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write


@dataclass(frozen=True)
class Kind:
    """One training kind, declared once. `evaluate(ctx, records)` (optional) runs after
    its models are registered, also on a re-run, and returns metrics merged into the
    first model's (e.g. scoring the pool with a new reward model); it must be idempotent."""

    name: str
    params: type
    run: Callable[[JobContext], JobResult]
    help: str
    needs_base_policy: bool = False
    learns_from_votes: bool = False
    produces: str | None = "policy"  # "policy", "reward" (a scorer), or None
    evaluate: Callable[[JobContext, list[ModelRecord]], dict] | None = None
    model_params: Mapping[str, str] = field(default_factory=dict)  # param -> "base policy" | "reward model"
    steps_param: str = "max_steps"  # the parameter that sets the job's budget (the form's "Max steps")


_declared: dict[str, Kind] = {}


def declare(kind: Kind) -> Kind:
    _declared[kind.name] = kind
    return kind


def kind_names() -> list[str]:
    return list(dict.fromkeys([*KIND_MODULES, *_declared]))


def get_kind(name: str) -> Kind:
    if name not in _declared:
        if name not in KIND_MODULES:
            raise ValueError(f"Unknown training kind {name!r}; expected one of {', '.join(kind_names())}.")
        declare(importlib.import_module(KIND_MODULES[name]).KIND)
    return _declared[name]


def is_training_kind(name: str) -> bool:
    return name in KIND_MODULES or name in _declared


def parameter_tables() -> str:
    """Every kind's parameters as markdown, for the README (tests/test_runner.py keeps it in step)."""
    from rlhf.params import markdown_table

    return "\n\n".join(f"**{name}**: {get_kind(name).help}\n\n{markdown_table(get_kind(name).params)}"
                         for name in KIND_MODULES)


def check_params(store: Store, kind_name: str, params: dict):
    """Validated parameters of a job before it is queued; model ids must name stored models."""
    from rlhf.training import chosen_model

    kind = get_kind(kind_name)
    checked = kind.params.from_dict(params)
    for name, what in kind.model_params.items():
        if getattr(checked, name, None) is not None:
            chosen_model(store, getattr(checked, name), what, reward=what == "reward model")
    return checked


def output_dir(settings: Settings, kind: str, job_id: int | None) -> Path:
    """Where a job writes its checkpoints and models: stable per job, so a resumed job
    finds its checkpoints (a run outside any job gets a fresh folder)."""
    return settings.models_dir / (f"{kind}-job{job_id}" if job_id is not None else f"{kind}-{time.time_ns()}")


def train(settings: Settings, kind_name: str, params: dict, progress: JobProgress) -> ModelRecord | dict:
    """Run one job of a kind to the end: its first model, or its metrics when it makes none."""
    from transformers.trainer_utils import get_last_checkpoint

    kind = get_kind(kind_name)
    store = settings.store()
    job_id = progress.job_id
    folder = output_dir(settings, kind.name, job_id)
    ctx = JobContext(
        settings=settings, params=kind.params.from_dict(params), progress=progress, job_id=job_id,
        output_dir=folder, resume_from=get_last_checkpoint(str(folder)) if folder.is_dir() else None, store=store,
    )
    recorded = job_rows.recorded_results(store.db, job_id) if job_id is not None else None
    if recorded is None:
        result = kind.run(ctx)
    else:
        result = JobResult(metrics=job_rows.get_job(store.db, job_id)["metrics"] or {},
                           message="results already recorded by an earlier run of this job")
    if not is_main_process():
        return {}
    records = _record(ctx, result) if recorded is None else [models.get_model(store.db, i) for i in recorded]
    if kind.evaluate is not None and records:
        records[0] = models.update_metrics(store.db, records[0].id, kind.evaluate(ctx, records))
    for checkpoint in folder.glob("checkpoint-*"):  # only a resume needs them
        shutil.rmtree(checkpoint, ignore_errors=True)
    progress(1.0, result.message or (f"registered #{records[0].id} {records[0].name}" if records else "done"))
    return records[0] if records else result.metrics


def _record(ctx: JobContext, result: JobResult) -> list[ModelRecord]:
    """Register every model of the result, its store writes and the job's result, at once."""
    db = ctx.store.db
    with write_transaction(db):
        registered: dict[int, ModelRecord] = {}
        for spec in result.models:
            parent = registered[id(spec.parent)] if isinstance(spec.parent, ModelSpec) else spec.parent
            registered[id(spec)] = _register(ctx.store, ctx.settings, spec, ctx.job_id, parent)
        if result.writes is not None:
            result.writes(ctx.store)
        records = list(registered.values())
        if ctx.job_id is not None:
            job_rows.record_results(db, ctx.job_id, [r.id for r in records],
                                    records[0].metrics if records and not result.metrics else result.metrics)
    return records


def _register(store: Store, settings: Settings, spec: ModelSpec, job_id: int | None,
              parent: ModelRecord | None) -> ModelRecord:
    from rlhf.training import register_checkpoint

    return register_checkpoint(
        store, settings, name=spec.name, kind=spec.kind, path=spec.path, parent=parent, job_id=job_id,
        metrics=spec.metrics, policy=spec.policy, decoding=spec.decoding,
    )
