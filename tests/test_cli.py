"""`python -m rlhf`: the command line contract, plus `init`'s idempotence (in process).

Subprocesses are few on purpose (each one pays the torch/transformers imports again): `--help`
and `generate`, the command that loads a model and so is likeliest to print on stdout. The
other commands run through the same `main()` in process, with stdout read at the fd level.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from rlhf import arena
from rlhf.prepare import prepare
from rlhf.starters import STARTER_POLICIES, needs_prepare
from storage import completions, models, prompts
from storage import jobs as job_rows
from tests.conftest import run_cli

COMMANDS = ("init", "models", "generate", "leaderboard", "export", "jobs")


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)  # the whole of stdout is one JSON document


def _snapshot(store) -> dict:
    db = store.db
    return {
        "prompts": [(p["id"], p["text"]) for p in prompts.list_prompts(db)],
        "models": [(m.id, m.name, m.path) for m in models.list_models(db)],
        "stories": list(db.query("SELECT id, prompt_id, model_id, text FROM completions ORDER BY id")),
    }


def test_help_lists_the_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    listed = re.search(r"\{([a-z,_-]+)\}", proc.stdout)  # argparse's {cmd1,cmd2,...}
    assert listed is not None, proc.stdout
    assert set(COMMANDS) <= set(listed.group(1).split(","))
    for command in COMMANDS:  # each with its own help line
        assert re.search(rf"^\s+{command}\s+\S", proc.stdout, re.MULTILINE), command


@pytest.fixture
def cli_main(capfd, monkeypatch):
    """`python -m rlhf ...` in this process (the same main(), without paying the imports
    again); returns (exit code, stdout, stderr) as seen on the file descriptors."""
    from rlhf.__main__ import main
    from rlhf.settings import ENV_VARS

    for name in ENV_VARS.values():
        monkeypatch.delenv(name, raising=False)

    def run(*args: str):
        capfd.readouterr()
        code = main(list(args))
        out, err = capfd.readouterr()
        return code, out, err

    return run


@pytest.fixture
def voted_arena(arena_dir):
    """The arena with 5 decided votes, all won by tiny-t0.7, and one tie."""
    settings, store = arena_dir
    ann = arena.sign_in(store, settings, "Ann")["id"]
    winner = models.get_model_by_name(store.db, "tiny-t0.7")
    rng = random.Random(1)
    for i in range(6):
        view = arena.next_pair(store, ann, rng)
        choice = "tie" if i == 5 else ("a" if view.pair.model_a == winner.id else "b")
        arena.submit_vote(store, settings, ann, view, choice)
    return settings, store


def test_models_json(voted_arena, cli_main):
    settings, store = voted_arena
    db = store.db
    code, out, _ = cli_main("models", "--data-dir", str(settings.data_dir), "--json")
    assert code == 0
    listed = json.loads(out)["models"]
    sizes = completions.pool_sizes(db)
    assert {(m["id"], m["name"], m["stories"]) for m in listed} == {
        (m.id, m.name, sizes.get(m.id, 0)) for m in models.list_models(db)}
    assert all(m["stories"] == settings.pool_prompts for m in listed)
    assert all(m["kind"] == "starter" and m["active"] is True for m in listed)


def test_leaderboard_json(voted_arena, cli_main):
    settings, store = voted_arena
    code, out, _ = cli_main("leaderboard", "--data-dir", str(settings.data_dir), "--json")
    assert code == 0
    board = json.loads(out)["leaderboard"]
    assert [row["rank"] for row in board] == list(range(1, len(board) + 1))
    assert {row["policy"] for row in board} == {m.name for m in models.list_models(store.db)}
    top, bottom = board[0], board[-1]
    assert top["policy"] == "tiny-t0.7" and (top["wins"], top["losses"], top["ties"]) == (5, 0, 1)
    assert (bottom["wins"], bottom["losses"], bottom["ties"]) == (0, 5, 1)
    assert top["score"] > bottom["score"]


def test_export_json(voted_arena, cli_main):
    settings, store = voted_arena
    code, out, _ = cli_main("export", "--data-dir", str(settings.data_dir), "--json")
    assert code == 0
    result = json.loads(out)
    path = settings.exports_dir / "preferences.jsonl"  # the documented default
    assert result == {"path": str(path.resolve()), "records": 5}
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 5 and all({"prompt", "chosen", "rejected"} <= set(r) for r in lines)

    code, out, _ = cli_main("export", "--data-dir", str(settings.data_dir), "--json",
                            "--include-undecided", "--out", str(settings.data_dir / "all.jsonl"))
    assert code == 0 and json.loads(out)["records"] == 6


def test_unknown_model_is_a_usage_error_with_json(arena_dir, cli_main):
    settings, store = arena_dir
    code, out, err = cli_main("generate", "--data-dir", str(settings.data_dir), "--model", "9999", "--json")
    assert code == 2
    assert "9999" in json.loads(out)["error"]
    assert "9999" in err
    assert job_rows.list_jobs(store.db) == []  # nothing was queued or run for it


def test_generate_writes_stories_for_a_new_policy(arena_dir):
    settings, store = arena_dir
    db = store.db
    starter = models.list_models(db)[0]
    new = models.add_model(db, "tiny-short", "local", path=starter.path,
                           decoding={"temperature": 0.9, "max_new_tokens": 12})
    assert completions.pool_sizes(db).get(new.id, 0) == 0

    result = _json(run_cli("generate", "--data-dir", str(settings.data_dir), "--model", str(new.id),
                           "--prompts", "2", "--json", "--starter", "tiny", "--device", "cpu"))
    assert result["status"] == "succeeded" and result["error"] is None
    assert result["stories"] == 2
    first_two = [p["id"] for p in prompts.list_prompts(db, limit=2)]
    rows = list(db.query("SELECT prompt_id, text, tokens, gen_params FROM completions WHERE model_id = ?", [new.id]))
    assert sorted(r["prompt_id"] for r in rows) == first_two  # the oldest prompts first
    assert all(r["text"].strip() and 1 <= r["tokens"] <= 12 for r in rows)
    assert all(json.loads(r["gen_params"])["max_new_tokens"] == 12 for r in rows)
    job = job_rows.get_job(db, result["job_id"])
    assert (job["kind"], job["status"], job["params"]["model_ids"]) == ("generate", "succeeded", [new.id])


def test_prepare_again_adds_nothing(arena_dir):
    settings, store = arena_dir
    before = _snapshot(store)
    assert len(before["stories"]) == settings.pool_prompts * len(STARTER_POLICIES["tiny"])
    reports = []
    policies = prepare(store, settings, lambda f, m: reports.append((f, m)))
    assert [p.id for p in policies] == [m[0] for m in before["models"]]
    assert reports[-1][0] == pytest.approx(1.0)
    assert _snapshot(store) == before


def test_prepare_again_keeps_prompts_policies_and_existing_stories(arena_dir):
    settings, store = arena_dir
    before = _snapshot(store)
    prepare(store, settings, lambda f, m: None)
    after = _snapshot(store)
    assert after["prompts"] == before["prompts"] and after["models"] == before["models"]
    assert after["stories"][:len(before["stories"])] == before["stories"]


def test_needs_prepare_until_the_pool_is_full(arena_dir, store):
    settings, arena_store = arena_dir
    assert needs_prepare(store, settings) is True  # empty database
    assert needs_prepare(arena_store, settings) is False  # prepared

    # A missing story (say, a crash mid-pool) makes it needed again, until prepare ran.
    db = arena_store.db
    db.execute("DELETE FROM completions WHERE id = (SELECT max(id) FROM completions)")
    assert needs_prepare(arena_store, settings) is True
    prepare(arena_store, settings, lambda f, m: None)
    assert needs_prepare(arena_store, settings) is False

    # While a prepare job is queued or running nobody should start another; a cancelled one
    # no longer counts.
    db.execute("DELETE FROM completions WHERE model_id = (SELECT min(id) FROM models)")
    assert needs_prepare(arena_store, settings) is True
    job_id = job_rows.create_job(db, "prepare", {})
    assert needs_prepare(arena_store, settings) is False
    job_rows.claim_next_job(db)
    assert needs_prepare(arena_store, settings) is False
    job_rows.request_cancel(db, job_id)
    job_rows.finish_job(db, job_id, "cancelled")
    assert needs_prepare(arena_store, settings) is True


def test_prepare_fills_only_the_gap(arena_dir):
    settings, store = arena_dir
    db = store.db
    victim = next(db.query("SELECT id, prompt_id, model_id FROM completions ORDER BY id DESC LIMIT 1"))
    db.execute("DELETE FROM completions WHERE id = ?", [victim["id"]])
    kept = _snapshot(store)["stories"]
    prepare(store, settings, lambda f, m: None)
    after = _snapshot(store)["stories"]
    assert len(after) == len(kept) + 1
    assert after[:-1] == kept
    assert (after[-1]["prompt_id"], after[-1]["model_id"]) == (victim["prompt_id"], victim["model_id"])


def test_json_stdout_carries_only_the_document(arena_dir, cli_main, monkeypatch):
    """Libraries that print (transformers' Trainer logs dicts to stdout) must not break --json."""
    import rlhf.__main__ as cli

    settings, _ = arena_dir
    original = cli.cmd_models

    def noisy_models(settings, args):
        print({"loss": 1.0})
        return original(settings, args)

    monkeypatch.setattr(cli, "cmd_models", noisy_models)
    code, out, err = cli_main("models", "--data-dir", str(settings.data_dir), "--json")
    assert code == 0
    assert json.loads(out)["models"]
    assert "'loss': 1.0" in err
