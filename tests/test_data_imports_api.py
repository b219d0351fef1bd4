"""The import, content and report endpoints of a running app, through gradio_client: only
researchers may import prompts or preference data, edit themes or review reports (checked
on the server); a researcher's paste and upload are stored; an annotator's report works."""

from __future__ import annotations

import json

import pytest

from bench.app_server import TINY_ARGS, query, running_app, wait_for_pool

gradio_client = pytest.importorskip("gradio_client")
AppError = pytest.importorskip("gradio_client.exceptions").AppError

RESEARCHER = "rita"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("imports-arena")
    with running_app(data_dir, env={"STORY_ARENA_RESEARCHERS": RESEARCHER}, extra_args=TINY_ARGS) as (url, _):
        wait_for_pool(data_dir)
        yield url, data_dir


def signed_in(url: str, name: str):
    client = gradio_client.Client(url, verbose=False)
    client.predict(name, "", api_name="/sign_in")
    return client


def test_imports_themes_and_reviews_are_for_researchers_only(app, tmp_path):
    url, data_dir = app
    db = data_dir / "arena.db"
    before = query(db,
                   "SELECT (SELECT count(*) FROM prompts), (SELECT count(*) FROM votes),"
                   " (SELECT count(*) FROM content_themes)")
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "A story.", "chosen": "Good.", "rejected": "Bad."}) + "\n")
    for client in (gradio_client.Client(url, verbose=False), signed_in(url, "Nora")):  # never signed in; an annotator
        with pytest.raises(AppError, match="researcher role|Sign in"):
            client.predict("mine", None, "Write a story about a cat.", "all", api_name="/add_prompts")
        with pytest.raises(AppError, match="researcher role|Sign in"):
            client.predict("mine", gradio_client.handle_file(str(prefs)), "", "train", api_name="/import_preferences")
        with pytest.raises(AppError, match="researcher role|Sign in"):
            client.predict("nothing", api_name="/save_themes")
        with pytest.raises(AppError, match="researcher role|Sign in"):
            client.predict(1, api_name="/confirm_report")
    assert query(db,
                 "SELECT (SELECT count(*) FROM prompts), (SELECT count(*) FROM votes),"
                 " (SELECT count(*) FROM content_themes)") == before


def test_a_researcher_pastes_prompts_and_uploads_preferences(app, tmp_path):
    url, data_dir = app
    db = data_dir / "arena.db"
    researcher = signed_in(url, RESEARCHER)
    summary, _, _, table = researcher.predict(
        "pasted", None, "Write a story about a <b>bold</b> snail.\nWrite a story about a corpse.", "user",
        api_name="/add_prompts")
    assert "2 new prompts" in summary and "theme: corpse" in summary
    assert "&lt;b&gt;bold&lt;/b&gt;" in table and "<b>bold</b>" not in table
    assert query(db,
                 "SELECT source, collection, blocked_reason FROM prompts WHERE collection = 'pasted' ORDER BY id") == [
        ("user", "pasted", None), ("user", "pasted", "theme: corpse")]
    prompts_file = tmp_path / "upload.txt"
    prompts_file.write_text("Write a story about a tidy badger.\n")
    summary = researcher.predict("uploaded", gradio_client.handle_file(str(prompts_file)), "", "all",
                                 api_name="/add_prompts")[0]
    assert "1 new prompts" in summary
    with pytest.raises(AppError, match="line 1: over"):
        researcher.predict("long", None, "x" * 600, "all", api_name="/add_prompts")
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "A story.", "chosen": "Good.", "rejected": "Bad."}) + "\n")
    result = researcher.predict("uploaded-prefs", gradio_client.handle_file(str(prefs)), "", "train",
                                api_name="/import_preferences")
    assert "1 pairs" in result and "uploaded-prefs" in result
    assert query(db, "SELECT source, dataset FROM votes WHERE source = 'import'") == [("import", "uploaded-prefs")]


def test_an_annotator_reports_a_story_and_a_researcher_confirms(app):
    url, data_dir = app
    db = data_dir / "arena.db"
    annotator = gradio_client.Client(url, verbose=False)
    out = annotator.predict("Reporter", "", api_name="/sign_in")
    assert out[2]  # a story is on screen
    reveal = annotator.predict(api_name="/report_a")[-1]
    assert "reported the story A" in reveal
    [(report_id, completion_id)] = query(db, "SELECT id, completion_id FROM reports")
    researcher = signed_in(url, RESEARCHER)
    themes, reports, _ = researcher.predict(api_name="/content_review")
    assert "corpse" in themes and f"story #{completion_id}" in reports
    researcher.predict(report_id, api_name="/confirm_report")
    assert query(db, "SELECT blocked_reason FROM completions WHERE id = ?", [completion_id]) == [
        ("reported: confirmed by a researcher",)]
