"""In a real browser: an annotator reports story A with one key (`Z`) and gets the next pair;
the report names the story that was on screen. Reuses tests/test_browser.py's app and browser."""

from __future__ import annotations

from bench.app_server import query
from tests.test_browser import arena, browser, expect, page, press_on_body, sign_in  # noqa: F401  (fixtures)


def test_one_key_reports_the_story_on_screen(arena, page):  # noqa: F811
    url, data_dir = arena
    sign_in(page, url, "Rory Reporter")
    story_a = page.locator("#story-a .story").inner_text()
    press_on_body(page, "z")
    expect(page.locator("#reveal")).to_contain_text("you reported the story A")
    rows = query(data_dir / "arena.db",
                 "SELECT c.text, r.completion_id FROM reports r JOIN completions c ON c.id = r.completion_id"
                 " JOIN annotators a ON a.id = r.annotator_id WHERE a.name = 'Rory Reporter'")
    # The browser reads a carriage return as a line break: compare words, not whitespace.
    assert len(rows) == 1 and rows[0][0].split() == story_a.split()
    # The next pair is on screen (or arrives with the 2-second poll while the pool is written).
    page.wait_for_function("() => document.querySelector('#story-a .story')", timeout=30_000)
    press_on_body(page, "p")
    expect(page.locator("#reveal")).to_contain_text("you reported the prompt")
    assert query(data_dir / "arena.db", "SELECT count(*) FROM reports WHERE completion_id IS NULL") == [(1,)]
