"""The Hugging Face Space: README front matter and the Dockerfile, checked without a Docker engine.

What a build would do is checked as far as this machine allows: the metadata parses as the
Hub parses it, the port agrees everywhere, the image runs as a non-root user with its data
in /data, every file it copies exists and is not dropped by .dockerignore, it installs with
the same script and pins as a local setup, and the command it runs accepts its flags.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from huggingface_hub import SpaceCard

from rlhf import settings as settings_module
from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCKERFILE = REPO_ROOT / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def arguments(instruction: str) -> list[str]:
    return [args for name, args in dockerfile_instructions() if name == instruction]


def exec_form(args: str) -> list[str]:
    words = json.loads(args)
    assert isinstance(words, list), f"use the exec (JSON) form so signals reach the app: {args}"
    return words


@pytest.fixture(scope="module")
def front_matter() -> dict:
    text = README.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_front_matter_makes_a_docker_space_with_hub_login(front_matter):
    card = SpaceCard.load(README)  # as the Hub reads it
    assert card.data.sdk == "docker" and card.data.app_port == 7860
    assert front_matter["hf_oauth"] is True
    assert {"title", "emoji", "colorFrom", "colorTo", "license"} <= set(front_matter)


def test_the_port_agrees_in_metadata_expose_and_command(front_matter):
    (expose,) = arguments("EXPOSE")
    (cmd,) = arguments("CMD")
    command = exec_form(cmd)
    assert int(expose) == front_matter["app_port"]
    assert command[command.index("--port") + 1] == str(front_matter["app_port"])
    assert command[command.index("--host") + 1] == "0.0.0.0"


def test_the_image_runs_as_a_non_root_user():
    instructions = dockerfile_instructions()
    users = [args for name, args in instructions if name == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_user = max(i for i, (name, _) in enumerate(instructions) if name == "USER")
    assert last_user < next(i for i, (name, _) in enumerate(instructions) if name == "CMD")
    assert all(f"--chown={users[-1]}" in args for args in arguments("COPY"))


def test_data_lives_in_slash_data_owned_by_the_app_user():
    runs = " && ".join(arguments("RUN"))
    user = arguments("USER")[-1]
    assert "mkdir /data" in runs and f"chown {user}:{user} /data" in runs
    env = dict(item.split("=", 1) for args in arguments("ENV") for item in shlex.split(args))
    assert env["HF_HOME"].startswith("/data/")  # downloaded Hub models persist too
    # No proxy is trusted by default: a forged X-Forwarded-For must not pick the client address.
    assert "FORWARDED_ALLOW_IPS" not in env and "STORY_ARENA_TRUSTED_PROXIES" not in env
    assert settings_module.SPACE_DATA_DIR == Path("/data")


def test_default_data_dir_is_slash_data_only_when_it_is_writable(tmp_path, monkeypatch):
    monkeypatch.setattr(settings_module, "SPACE_DATA_DIR", tmp_path)
    assert settings_module.default_data_dir() == tmp_path
    monkeypatch.setattr(settings_module, "SPACE_DATA_DIR", tmp_path / "missing")
    assert settings_module.default_data_dir() == Path("data")


def _ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_every_copied_file_exists_and_survives_dockerignore():
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for args in arguments("COPY"):
        sources = [w for w in shlex.split(args) if not w.startswith("--")][:-1]
        for source in sources:
            if source == ".":
                continue
            assert (REPO_ROOT / source).exists(), f"COPY of a missing file: {source}"
            assert not _ignored(source, patterns), f".dockerignore drops {source}"
    for needed in ("app.py", "install.sh", "requirements.txt", "requirements-starter.txt",
                   "rlhf/__init__.py", "storage/__init__.py", "ui/__init__.py"):
        assert not _ignored(needed, patterns), f".dockerignore drops {needed}, which the app needs"
    assert _ignored(".venv/bin/python", patterns) and _ignored("data/arena.db", patterns)


def test_the_image_installs_with_install_sh_and_its_pins():
    runs = arguments("RUN")
    assert any(re.search(r"\bbash install\.sh\b", run) for run in runs)
    assert not any("pip install" in run for run in runs), "install through install.sh: one source of pins"
    install = (REPO_ROOT / "install.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO_ROOT / "install.sh")]).returncode == 0
    for requirements in ("requirements.txt", "requirements-starter.txt"):
        assert f"-r {requirements}" in install
    pinned = re.search(r"^torch==\S+", (REPO_ROOT / "requirements.txt").read_text(), re.M).group(0)
    assert re.findall(r"install -q (torch==\S+)", install) == [pinned]
    assert "gradio[oauth]" in (REPO_ROOT / "requirements.txt").read_text()  # the Hub login's libraries
    (cmd,) = arguments("CMD")
    assert exec_form(cmd)[0] == ".venv/bin/python"  # the venv install.sh creates


def test_the_command_accepts_its_flags(capsys):
    import app

    (cmd,) = arguments("CMD")
    _, script, *flags = exec_form(cmd)
    assert script == "app.py"
    with pytest.raises(SystemExit) as done:
        app.main(["--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    for flag in (f for f in flags if f.startswith("--")):
        assert flag in usage
