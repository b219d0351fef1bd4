"""The kind contract and the runner, with a toy kind declared here (jobs.py untouched):
the re-run guard, resume, atomic saving, one registering transaction, checkpoint clean-up,
and registering on the main process only."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from rlhf import jobs, runner
from rlhf.params import check_whole, given_params
from rlhf.runner import JobContext, JobResult, Kind, ModelSpec
from storage import jobs as job_rows
from storage import models
from tests.conftest import tiny_settings

RUNS: list[dict] = []


@dataclass(frozen=True)
class ToyParams:
    steps: int = 3
    fail_in_writes: bool = False

    @classmethod
    def from_dict(cls, params) -> ToyParams:
        given = given_params("toy", params, ["steps", "fail_in_writes"])
        return cls(steps=check_whole("steps", given.get("steps", 3), 1, 100),
                   fail_in_writes=bool(given.get("fail_in_writes", False)))

    def to_dict(self) -> dict:
        return asdict(self)


def toy_run(ctx: JobContext) -> JobResult:
    """'Trains' by writing checkpoint-N folders; the model is a folder of the four files
    save_atomically checks, holding the step it reached."""
    RUNS.append({"resume_from": ctx.resume_from, "resumed_step": ctx.resumed_step})
    for step in range(ctx.resumed_step + 1, ctx.params.steps + 1):
        (ctx.output_dir / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)

    def write(folder: Path) -> None:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_text(json.dumps({"step": ctx.params.steps, "run": len(RUNS)}))

    folder = ctx.save_model(write)
    policy = ModelSpec(name="toy", kind="sft", path=folder, metrics={"steps": ctx.params.steps})
    scorer = ModelSpec(name="toy-scorer", kind="reward", path=folder, parent=policy, policy=False)

    def writes(store) -> None:
        if ctx.params.fail_in_writes:
            raise RuntimeError("the process died while registering")

    return JobResult(models=[policy, scorer], writes=writes, message="toy done")


def toy_evaluate(ctx: JobContext, records) -> dict:
    return {"evaluated_models": [r.name for r in records]}


TOY = runner.declare(Kind(name="toy", params=ToyParams, run=toy_run, evaluate=toy_evaluate,
                          help="A kind for tests."))


@pytest.fixture
def settings(tmp_path):
    RUNS.clear()
    return tiny_settings(tmp_path / "data")


def test_a_declared_kind_runs_as_a_job_and_registers_its_models_once(settings):
    job = jobs.run_inline(settings, "toy", {"steps": 3})
    assert job["status"] == "succeeded", job["error"]
    db = settings.store().db
    policy, scorer = (m for m in models.list_models(db) if m.job_id == job["id"])
    assert (policy.name, policy.kind, policy.active, policy.parent_id) == ("toy", "sft", True, None)
    assert (scorer.kind, scorer.active, scorer.parent_id) == ("reward", False, policy.id)
    assert job["result_model_id"] == policy.id and job["result_model_ids"] == [policy.id, scorer.id]
    assert job["metrics"] == {"steps": 3, "evaluated_models": ["toy", "toy-scorer"]}
    assert policy.path == str(runner.output_dir(settings, "toy", job["id"]) / "model")
    assert not list(runner.output_dir(settings, "toy", job["id"]).glob("checkpoint-*"))  # cleaned up
    assert "toy" in runner.kind_names() and runner.get_kind("toy").help == "A kind for tests."

    # Re-queued after its models were registered: no training, nothing twice, nothing overwritten.
    saved = (Path(policy.path) / "config.json").read_text()
    job_rows.update_job(db, job["id"], status="running")
    assert jobs.execute(settings, job["id"])["status"] == "succeeded"
    assert len(RUNS) == 1
    assert [m.id for m in models.list_models(db) if m.job_id == job["id"]] == [policy.id, scorer.id]
    assert (Path(policy.path) / "config.json").read_text() == saved
    assert job_rows.get_job(db, job["id"])["metrics"]["evaluated_models"] == ["toy", "toy-scorer"]


def test_a_requeued_job_resumes_from_its_last_checkpoint_and_registers_atomically(settings):
    job = jobs.run_inline(settings, "toy", {"steps": 4, "fail_in_writes": True})
    assert job["status"] == "failed" and "died while registering" in job["error"]
    db = settings.store().db
    assert models.list_models(db) == []  # the transaction took both models back
    folder = runner.output_dir(settings, "toy", job["id"])
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == [f"checkpoint-{i}" for i in range(1, 5)]
    assert job_rows.get_job(db, job["id"])["result_model_ids"] is None

    # The re-run (with the failure gone) resumes from checkpoint-4 and keeps the saved model.
    job_rows.update_job(db, job["id"], params={"steps": 4})
    job_rows.requeue(db, job["id"])
    job_rows.update_job(db, job["id"], status="running")
    assert jobs.execute(settings, job["id"])["status"] == "succeeded"
    assert RUNS[-1] == {"resume_from": str(folder / "checkpoint-4"), "resumed_step": 4}
    assert json.loads((folder / "model" / "config.json").read_text())["run"] == 1  # written once
    assert [m.name for m in models.list_models(db)] == ["toy", "toy-scorer"]


def test_only_the_main_process_registers(settings, monkeypatch):
    monkeypatch.setattr(runner, "is_main_process", lambda: False)
    db = settings.store().db
    job_id = job_rows.create_job(db, "toy", {})
    job_rows.update_job(db, job_id, status="running")
    assert runner.train(settings, "toy", {}, jobs.JobProgress(settings, job_id)) == {}
    assert models.list_models(db) == [] and job_rows.get_job(db, job_id)["result_model_ids"] is None
    assert list(runner.output_dir(settings, "toy", job_id).glob("checkpoint-*"))  # the main process cleans up


def test_check_params_names_the_bad_field(settings):
    with pytest.raises(ValueError, match="steps must be between 1 and 100"):
        runner.check_params(settings.store(), "toy", {"steps": 0})
    with pytest.raises(ValueError, match="Unknown training kind 'nope'"):
        runner.check_params(settings.store(), "nope", {})


def test_a_job_process_gets_the_settings_whole_and_secrets_only_by_environment(settings, monkeypatch):
    from dataclasses import replace

    from rlhf.settings import JOB_SETTINGS_ENV, job_environment, job_settings

    full = replace(settings, hub_token="hf_secret", researcher_key="key-secret", researchers=frozenset({"ann"}),
                   pair_prompt_sources=("seed",), generation_batch_size=3, metrics_corpus=Path("/c.txt"))
    env = job_environment(full)
    assert "secret" not in env[JOB_SETTINGS_ENV]
    assert job_settings(env) == full and job_settings({}) is None

    started = {}

    class Recorded:
        pid = 12345

        def __init__(self, command, **kwargs):
            started.update(command=command, env=kwargs["env"])

    monkeypatch.setattr(jobs.subprocess, "Popen", Recorded)
    db = full.store().db
    job_id = job_rows.create_job(db, "toy", {})
    jobs.JobWorker(full)._spawn(job_rows.get_job(db, job_id))
    assert not any("secret" in part for part in started["command"])
    assert job_settings(started["env"]) == full


def test_the_readme_parameter_tables_come_from_the_params_dataclasses():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- parameters:start -->\n", 1)[1].split("\n<!-- parameters:end -->", 1)[0]
    assert section == runner.parameter_tables()
    assert "| `beta` | `0.1` | (0, 10] | strength of the pull towards the reference (IPO: tau) |" in section


def test_a_policys_decoding_names_its_best_of_k_and_the_reward_model_that_reranks(arena_dir, monkeypatch):
    from rlhf import scoring
    from rlhf.pool import fill_pool

    settings, store = arena_dir
    db = store.db
    starter = models.list_models(db)[0]
    judge = models.add_model(db, "judge", "reward", path=starter.path, active=False)
    policy = models.add_model(db, "reranked", "local", path=starter.path,
                              decoding={"max_new_tokens": 8, "best_of": 3, "reranker": judge.id})
    scored = []

    def length_scorer(record, device):
        assert record.id == judge.id
        return lambda prompts, stories: scored.extend(stories) or [len(s) for s in stories]

    monkeypatch.setattr(scoring, "load_reward_scorer", length_scorer)
    assert fill_pool(store, settings, [policy.id], 2, lambda f, m: None) == 2
    rows = [json.loads(r["gen_params"]) for r in db.query("SELECT gen_params FROM completions WHERE model_id = ?",
                                                          [policy.id])]
    assert len(scored) == 6 and all(r["best_of"] == 3 and "reranker" not in r for r in rows)


def test_train_kind_help_lists_that_kinds_parameters(capsys):
    from rlhf.__main__ import main

    with pytest.raises(SystemExit):
        main(["train", "dpo", "--help"])
    out = capsys.readouterr().out
    assert "--set KEY=VALUE" in out and "dpo parameters" in out
    assert "  beta: strength of the pull towards the reference (IPO: tau) ((0, 10]; default 0.1)" in out
    assert "  base: the policy to start from (and the reference) (a model id; required)" in out
