"""rlhf/hub.py and the Hub sign-in: publishing, pushing, schedule, token hygiene, OAuth roles.

No test touches the network. `FakeHub` is an in-process stand-in for HfApi that takes its
own signatures (each call is bound to the real method's signature, so a wrong argument fails
here as it would against the Hub) and writes every commit's files under a temp dir;
`HubServer` is a fake Hub over HTTP on 127.0.0.1 for the real client (and for the CLI, via
HF_ENDPOINT). Login uses a constructed gr.OAuthProfile, injected by Gradio's own machinery.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import inspect
import json
import random
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import CommitInfo, DatasetCard, HfApi, ModelCard, RepoUrl

from rlhf import arena, hub, jobs
from rlhf.heldout import heldout_markdown, pairwise_report
from rlhf.settings import Settings, add_arguments, from_args
from storage import jobs as job_rows
from storage import models
from tests.conftest import REPO_ROOT, clean_env, run_cli, tiny_settings

TOKEN = "hf_SecretTokenForTests1234567890"
# What a Space with `hf_oauth: true` sets (OAUTH_SCOPES too, which only Gradio reads).
SPACE_OAUTH_ENV = {"SYSTEM": "spaces", "SPACE_ID": "arena/space", "OAUTH_CLIENT_ID": "client",
                   "OAUTH_CLIENT_SECRET": "secret", "OPENID_PROVIDER_URL": "https://huggingface.co",
                   "OAUTH_SCOPES": "openid profile"}


class FakeHub:
    """create_repo / create_commit as the Hub would take them; commits land in root."""

    def __init__(self, root: Path, fail_with: str | None = None):
        self.root, self.fail_with = root, fail_with
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []

    def create_repo(self, *args, **kwargs) -> RepoUrl:
        call = inspect.signature(HfApi.create_repo).bind(self, *args, **kwargs).arguments
        if self.fail_with:
            raise RuntimeError(self.fail_with)
        repo_type = call.get("repo_type") or "model"
        self.repos.setdefault(call["repo_id"], {"type": repo_type, "private": call.get("private")})
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return RepoUrl(f"https://huggingface.co/{prefix}{call['repo_id']}")

    def create_commit(self, *args, **kwargs) -> CommitInfo:
        call = inspect.signature(HfApi.create_commit).bind(self, *args, **kwargs).arguments
        repo_id = call["repo_id"]
        assert self.repos[repo_id]["type"] == (call.get("repo_type") or "model"), "commit to a repo never created"
        folder = self.root / repo_id / str(len(self.commits))
        for op in call["operations"]:
            target = folder / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            with op.as_file() as source:
                target.write_bytes(source.read())
        oid = hashlib.sha1(str(folder).encode()).hexdigest()
        self.commits.append({"repo": repo_id, "folder": folder, "message": call["commit_message"],
                             "files": sorted(op.path_in_repo for op in call["operations"])})
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
                          commit_message=call["commit_message"], commit_description="", oid=oid)


class HubServer:
    """A fake Hub over HTTP on 127.0.0.1, for the real HfApi client: repo creation, the
    README metadata check, preupload (every file "regular") and NDJSON commits, written
    under root. `status` set to an HTTP code makes every call fail with it."""

    def __init__(self, root: Path):
        self.root, self.status = root, 200
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.authorizations: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.authorizations.add(self.headers.get("Authorization", ""))
                if server.status != 200:
                    return self._reply({"error": "Invalid credentials in Authorization header"}, server.status)
                self._reply(server.answer(self.path, body))

            def _reply(self, payload: dict, status: int = 200):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def answer(self, path: str, body: bytes) -> dict:
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            self.repos[repo_id] = {"type": request.get("type") or "model", "visibility": request.get("visibility")}
            prefix = "" if self.repos[repo_id]["type"] == "model" else f"{request['type']}s/"
            return {"url": f"{self.url}/{prefix}{repo_id}"}
        if path == "/api/validate-yaml":
            return {"errors": [], "warnings": []}
        kind, repo_id, action = re.fullmatch(r"/api/(\w+)s/([^/]+/[^/]+)/(preupload|commit)/main", path).groups()
        assert self.repos[repo_id]["type"] == kind, "commit to a repo never created"
        if action == "preupload":
            return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                              for f in json.loads(body)["files"]]}
        lines = [json.loads(line) for line in body.splitlines()]
        folder = self.root / repo_id / str(len(self.commits))
        for line in lines[1:]:
            target = folder / line["value"]["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(line["value"]["content"]))
        oid = hashlib.sha1(str(folder).encode()).hexdigest()
        self.commits.append({"repo": repo_id, "folder": folder, "message": lines[0]["value"]["summary"],
                             "files": sorted(line["value"]["path"] for line in lines[1:])})
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid}

    def __enter__(self) -> "HubServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _vote(settings, store, name: str, count: int, seed: int) -> None:
    who = arena.sign_in(store, settings, name)["id"]
    rng = random.Random(seed)
    for i in range(count):
        view = arena.next_pair(store, who, rng)
        arena.submit_vote(store, settings, who, view, "a" if i % 2 else "b")


@pytest.fixture
def voted(arena_dir):
    settings, store = arena_dir
    settings = Settings(**{**settings.__dict__, "hub_token": TOKEN, "hub_dataset": "arena/prefs"})
    _vote(settings, store, "Ann", 3, seed=1)
    _vote(settings, store, "Bob", 2, seed=2)
    return settings, store


# --- publishing ---------------------------------------------------------------------------

def test_publish_commits_trl_rows_and_a_dataset_card(voted, tmp_path):
    settings, store = voted
    fake = FakeHub(tmp_path / "hub")
    result = hub.publish_preferences(store, settings, "arena/prefs", api=fake)

    assert fake.repos["arena/prefs"] == {"type": "dataset", "private": True}
    (commit,) = fake.commits
    assert commit["files"] == ["README.md", "data/train.jsonl"]
    rows = [json.loads(line) for line in (commit["folder"] / "data/train.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all({"prompt", "chosen", "rejected"} <= set(r) for r in rows)
    assert all(r["chosen"] != r["rejected"] for r in rows)

    card = DatasetCard.load(commit["folder"] / "README.md")
    assert card.data.license == hub.DATASET_LICENSE
    assert card.data.configs[0]["data_files"][0]["path"] == hub.DATA_FILE
    for line in ("preferences: 5", "annotators: 2", f"`{result['data_hash']}`", "| `chosen` |"):
        assert line in card.text
    assert "Ann" not in card.text and "Bob" not in (commit["folder"] / "data/train.jsonl").read_text()
    assert result["commit"] and result["records"] == 5 and result["annotators"] == 2


def test_the_real_client_publishes_to_a_hub_over_http(voted, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # 127.0.0.1 only
    settings, store = voted
    with HubServer(tmp_path / "hub") as server:
        api = HfApi(endpoint=server.url, token=TOKEN)
        result = hub.publish_preferences(store, settings, "arena/prefs", api=api)
        server.status = 401
        _vote(settings, store, "Cy", 1, seed=3)
        with pytest.raises(hub.HubError, match="401") as caught:
            hub.publish_preferences(store, settings, "arena/prefs", api=api)
    assert server.repos["arena/prefs"] == {"type": "dataset", "visibility": "private"}
    (commit,) = server.commits
    assert commit["files"] == ["README.md", "data/train.jsonl"] and result["commit"] in result["url"]
    assert len((commit["folder"] / "data/train.jsonl").read_text().splitlines()) == 5
    assert server.authorizations == {f"Bearer {TOKEN}"}  # sent to the Hub, and only there
    assert TOKEN not in str(caught.value)


def test_publish_skips_unchanged_votes_and_commits_new_ones(voted, tmp_path):
    settings, store = voted
    fake = FakeHub(tmp_path / "hub")
    hub.publish_preferences(store, settings, "arena/prefs", api=fake)
    again = hub.publish_preferences(store, settings, "arena/prefs", api=fake)
    assert again["skipped"] and len(fake.commits) == 1
    _vote(settings, store, "Cy", 1, seed=3)
    newer = hub.publish_preferences(store, settings, "arena/prefs", api=fake)
    assert len(fake.commits) == 2 and newer["records"] == 6 and newer["annotators"] == 3


def test_publish_job_runs_through_the_job_runner_and_records_the_commit(voted, tmp_path, monkeypatch):
    settings, store = voted
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "make_api", lambda s: fake)
    job = jobs.run_inline(settings, "publish", {"repo": "arena/prefs"})
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["repo"] == "arena/prefs" and len(fake.commits) == 1
    assert job["metrics"]["records"] == 5 and job["metrics"]["url"].endswith(job["metrics"]["commit"])


def test_a_failing_hub_never_shows_the_token(voted, tmp_path, monkeypatch, capsys):
    settings, store = voted
    fake = FakeHub(tmp_path / "hub", fail_with=f"401 Unauthorized for token {TOKEN} (Authorization: Bearer {TOKEN})")
    with pytest.raises(hub.HubError) as caught:
        hub.publish_preferences(store, settings, "arena/prefs", api=fake)
    assert TOKEN not in str(caught.value) and "401 Unauthorized" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no unscrubbed chain

    monkeypatch.setattr(hub, "make_api", lambda s: fake)
    job = jobs.run_inline(settings, "publish", {"repo": "arena/prefs"})
    out = capsys.readouterr()
    assert job["status"] == "failed" and "401" in job["error"]
    assert TOKEN not in job["error"] + out.out + out.err
    assert TOKEN not in repr(settings)


def test_scrub_blanks_the_token_and_anything_shaped_like_one():
    assert hub.scrub(f"bad {TOKEN} and hf_abcdefghijkl", TOKEN) == "bad *** and hf_***"


def test_queueing_needs_a_repo_and_a_token(voted):
    settings, store = voted
    with pytest.raises(ValueError, match="--hub-dataset"):
        hub.queue_publish(store, Settings(**{**settings.__dict__, "hub_dataset": None}))
    with pytest.raises(ValueError, match="HF_TOKEN"):
        hub.queue_publish(store, Settings(**{**settings.__dict__, "hub_token": None}))
    with pytest.raises(ValueError, match="owner/name"):
        hub.queue_push(store, settings, 1, "not a repo")
    job = job_rows.get_job(store.db, hub.queue_publish(store, settings, created_by=None))
    assert (job["kind"], job["params"], job["status"]) == ("publish", {"repo": "arena/prefs"}, "queued")


def test_schedule_queues_one_publish_per_interval(voted):
    settings, store = voted
    settings = Settings(**{**settings.__dict__, "hub_publish_minutes": 10})
    now = [1_000_000.0]
    schedule = hub.PublishSchedule(settings, clock=lambda: now[0])
    first = schedule.tick(store)
    assert first is not None and schedule.tick(store) is None
    now[0] += 60  # next check, but the first job is still queued
    assert schedule.tick(store) is None
    job_rows.update_job(store.db, first, status="succeeded", created_at=now[0] - 60)
    now[0] += 60  # finished, but only two minutes since it was queued
    assert schedule.tick(store) is None
    now[0] += 600
    second = schedule.tick(store)
    assert second not in (None, first) and job_rows.get_job(store.db, second)["kind"] == "publish"
    off = hub.PublishSchedule(Settings(**{**settings.__dict__, "hub_publish_minutes": 0}))
    assert not off.enabled and off.tick(store) is None


def test_cli_publish_and_push_through_hf_endpoint(voted, tmp_path):
    """`python -m rlhf publish|push --json` as a user runs them, against HF_ENDPOINT."""
    settings, store = voted
    starter = models.list_models(store.db)[0]
    with HubServer(tmp_path / "hub") as server:
        env = {**clean_env(), "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN,
               "STORY_ARENA_HUB_DATASET": "arena/prefs"}
        common = ["--data-dir", str(settings.data_dir), "--starter", "tiny", "--json"]
        runs = [subprocess.run([sys.executable, "-m", "rlhf", *command, *common], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
                for command in (["publish"], ["push", "--model", str(starter.id), "--repo", "arena/tiny"])]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert TOKEN not in run.stdout + run.stderr
    published, pushed = (json.loads(run.stdout) for run in runs)
    assert published["status"] == "succeeded" and published["records"] == 5 and published["repo"] == "arena/prefs"
    assert pushed["repo"] == "arena/tiny" and pushed["model_id"] == starter.id
    assert [c["repo"] for c in server.commits] == ["arena/prefs", "arena/tiny"]
    assert "config.json" in server.commits[1]["files"]


def test_cli_publish_without_a_repo_names_the_setting(tmp_path):
    result = run_cli("publish", "--data-dir", str(tmp_path / "data"), "--starter", "tiny", "--json")
    assert result.returncode == 2
    assert "--hub-dataset" in json.loads(result.stdout)["error"]


# --- pushing checkpoints ------------------------------------------------------------------

def test_push_uploads_the_checkpoint_with_a_model_card(voted, tmp_path):
    settings, store = voted
    starter = models.list_models(store.db)[0]
    folder = Path(starter.path)
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "optimizer.pt").write_bytes(b"resume only")
    job_id = job_rows.create_job(store.db, "dpo", {})
    child = models.add_model(store.db, "dpo-1", "dpo", path=str(folder), parent_id=starter.id, job_id=job_id,
                             metrics={"data_hash": "abc123", "votes_used": 5, "eval_accuracy": 0.75})
    fake = FakeHub(tmp_path / "hub")
    result = hub.push_model(store, settings, child.id, "arena/dpo-1", api=fake)

    (commit,) = fake.commits
    assert fake.repos["arena/dpo-1"]["type"] == "model"
    assert "config.json" in commit["files"] and "README.md" in commit["files"]
    assert not any(f.startswith("checkpoint-") for f in commit["files"])
    card = ModelCard.load(commit["folder"] / "README.md")
    assert "dpo" in card.data.tags and card.data.datasets == ["arena/prefs"]
    text = card.text
    assert f"**dpo-1** (arena id {child.id}, kind `dpo`, job {job_id})" in text
    assert f"**{starter.name}** (arena id {starter.id}" in text  # the parent, in the lineage
    assert "5 votes, snapshot `abc123`" in text and '"eval_accuracy": 0.75' in text
    assert result["files"] == len(commit["files"])


def test_model_card_shows_the_held_out_evaluation_and_says_when_a_baseline_wins(voted):
    settings, store = voted
    starter = models.list_models(store.db)[0]
    held_out = [{"prompt": f"Prompt {i}.", "chosen": "A long story about a cat who found a hat and smiled.",
                 "rejected": "A cat."} for i in range(6)]
    losing = pairwise_report(held_out, [-1.0] * 6)  # "longer story wins" gets every pair right
    reward = models.add_model(store.db, "rm-1", "reward", path=starter.path, parent_id=starter.id,
                              metrics={"data_hash": "abc", "votes_used": 30, "heldout": losing}, active=False)
    text = hub.model_card(store, settings, reward, "arena/rm-1").text
    assert "## Held-out evaluation" in text and heldout_markdown(losing) in text
    assert "6 pairs from 6 held-out prompts" in text and "longer story wins 1.00" in text
    assert 'The model does not beat the best trivial baseline, "longer story wins"' in text
    assert "Held-out evaluation" not in hub.model_card(store, settings, starter, "arena/starter").text


def test_push_refuses_a_policy_without_a_local_folder(store):
    settings = tiny_settings(store.path.parent, hub_token=TOKEN)
    remote = models.add_model(store.db, "remote", "hub", hub_id="someone/model")
    with pytest.raises(ValueError, match="someone/model"):
        hub.queue_push(store, settings, remote.id, "arena/remote")
    with pytest.raises(LookupError):
        hub.queue_push(store, settings, 999, "arena/remote")


# --- settings and sign-in -----------------------------------------------------------------

def _settings_from(env: dict, *argv: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(list(argv)), env)


def test_hub_settings_come_from_flags_and_environment(tmp_path):
    env = {"STORY_ARENA_ADMINS": "ada, root", "STORY_ARENA_HUB_DATASET": "arena/prefs",
           "STORY_ARENA_HUB_PUBLISH_MINUTES": "15", "HF_TOKEN": TOKEN,
           **SPACE_OAUTH_ENV}
    settings = _settings_from(env, "--data-dir", str(tmp_path))
    assert settings.admins == {"ada", "root"} and settings.hub_dataset == "arena/prefs"
    assert settings.hub_publish_minutes == 15 and settings.hub_oauth and TOKEN not in repr(settings)
    assert not _settings_from({}, "--data-dir", str(tmp_path)).hub_oauth
    assert not _settings_from({**SPACE_OAUTH_ENV, "SYSTEM": "local"}, "--data-dir", str(tmp_path)).hub_oauth
    with pytest.raises(ValueError, match="--hub-publish-minutes needs --hub-dataset"):
        _settings_from({}, "--hub-publish-minutes", "5")
    with pytest.raises(ValueError, match="--hub-publish-minutes"):
        _settings_from({}, "--hub-dataset", "a/b", "--hub-publish-minutes", "-1")


def _space_settings(data_dir: Path, key: str | None = None) -> Settings:
    return tiny_settings(data_dir, hub_oauth=True, researchers=frozenset({"rita"}),
                         admins=frozenset({"ada"}), researcher_key=key)


def test_hub_login_roles_come_from_the_username_lists(store):
    settings = _space_settings(store.path.parent, key="sesame")
    ada = arena.sign_in_hub(store, settings, "ada")
    rita = arena.sign_in_hub(store, settings, "rita")
    zoe = arena.sign_in_hub(store, settings, "zoe")
    assert [(w["name"], w["role"]) for w in (ada, rita, zoe)] == [
        ("@ada", "admin"), ("@rita", "researcher"), ("@zoe", "annotator")]
    assert arena.sign_in_hub(store, settings, "rita")["id"] == rita["id"]  # same person next time


def test_the_name_form_cannot_claim_a_hub_identity_or_role(store):
    settings = _space_settings(store.path.parent)
    arena.sign_in_hub(store, settings, "zoe")
    with pytest.raises(arena.ArenaError, match="Hugging Face accounts"):
        arena.sign_in(store, settings, "@zoe")
    with pytest.raises(arena.ArenaError, match="sign in with Hugging Face"):
        arena.sign_in(store, settings, "rita")  # no key configured: only the Hub login grants it
    keyed = _space_settings(store.path.parent, key="sesame")
    with pytest.raises(arena.ArenaError, match="researcher key"):
        arena.sign_in(store, keyed, "rita", "guess")
    assert arena.sign_in(store, keyed, "rita", "sesame")["role"] == "researcher"
    assert arena.sign_in(store, settings, "zoe")["hub_username"] is None  # a different person


def _handler(demo, name: str):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name)


def test_login_button_and_profile_sign_in_on_a_space(arena_dir, monkeypatch):
    import gradio as gr
    import gradio.oauth
    from gradio.helpers import special_args

    from ui.app import build_ui

    for name, value in SPACE_OAUTH_ENV.items():  # Gradio reads some at import, some at launch
        monkeypatch.setenv(name, value)
        monkeypatch.setattr(gradio.oauth, name, value, raising=False)
    settings, store = arena_dir
    local_demo, _ = build_ui(settings, store)
    assert not local_demo.expects_oauth  # no Hub login (and no mocked whoami call) off a Space

    settings = Settings(**{**_space_settings(settings.data_dir).__dict__, "hub_token": TOKEN,
                           "hub_dataset": "arena/prefs"})
    demo, _ = build_ui(settings, store)
    assert demo.expects_oauth
    sign_in = _handler(demo, "do_hub_sign_in")
    userinfo = {"preferred_username": "rita", "name": "Rita", "profile": "https://huggingface.co/rita",
                "picture": ""}
    request = SimpleNamespace(session={"oauth_info": {"userinfo": userinfo, "expires_at": time.time() + 60}})
    inputs, *_ = special_args(sign_in, [], request)
    assert isinstance(inputs[0], gr.OAuthProfile) and inputs[0].username == "rita"
    session, welcome, models_group, *_ = sign_in(*inputs)
    assert (session["name"], session["role"]) == ("@rita", "researcher")
    assert "@rita" in welcome and models_group.visible

    anonymous, *_ = special_args(sign_in, [], SimpleNamespace(session={}))
    assert anonymous == [None] and all(isinstance(o, dict) and o.get("__type__") == "update"
                                       for o in sign_in(None))

    publish = _handler(demo, "publish_to_hub")
    zoe = arena.sign_in_hub(store, settings, "zoe")
    with pytest.raises(gr.Error, match="researcher role"):
        publish(zoe)
    with pytest.raises(gr.Error, match="researcher role"):
        _handler(demo, "push_to_hub")(zoe, 1, "arena/model")
    assert "Publishing as job" in publish(session)
    assert job_rows.list_jobs(store.db, limit=1)[0]["kind"] == "publish"


def test_a_pushed_checkpoint_comes_back_as_a_hub_policy(voted, tmp_path, monkeypatch):
    """Push, then add the repo id on the Models tab's path, read from a Hub cache laid out
    from the fake's commit (offline mode: the same files a download would have stored)."""
    import shutil

    import huggingface_hub.constants

    from rlhf import policies

    settings, store = voted
    starter = models.list_models(store.db)[0]
    fake = FakeHub(tmp_path / "hub")
    oid = hub.push_model(store, settings, starter.id, "arena/tiny-pushed", api=fake)["commit"]
    cache = tmp_path / "cache" / "models--arena--tiny-pushed"
    shutil.copytree(fake.commits[0]["folder"], cache / "snapshots" / oid)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(oid)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    record = policies.add_policy(store, settings, "tiny-from-hub", "arena/tiny-pushed", {"temperature": 0.8})
    assert (record.kind, record.hub_id, record.path) == ("hub", "arena/tiny-pushed", None)
    assert job_rows.list_jobs(store.db, limit=1)[0]["params"]["model_ids"] == [record.id]
