"""Rounds in a real browser: a researcher sets the round recipe in the Rounds tab, votes in
the arena until the round starts by itself, and, once its reward and RAFT jobs ran and
the child met its parent, sees the decided round in the Rounds view.

The app and browser are tests/test_browser_train.py's (tiny random GPT-2, six-prompt pool,
researcher `rita` with a researcher key, Chromium driven by Playwright).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.app_server import query, wait_for
from tests.test_browser import CHROMIUM
from tests.test_browser_train import (  # noqa: F401  (app and page are fixtures)
    JOB_WAIT_MS,
    RESEARCHER,
    RESEARCHER_KEY,
    app,
    page,
    sign_in_as_researcher,
    vote,
)

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

EVERY_VOTES = 3
# Tiny steps: a two-step reward model, one RAFT step on two prompts; one vote judges the child.
STEP_PARAMS = {"reward": {"max_steps": 2, "min_pairs": 2, "batch_size": 2, "max_length": 64},
               "raft": {"k": 2, "prompts": 2, "max_steps": 1, "batch_size": 2, "max_new_tokens": 8}}
MAX_VOTES_FOR_THE_CHILD = 30

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Chromium at {CHROMIUM}")


def round_status(db: Path) -> str | None:
    rows = query(db, "SELECT status FROM rounds WHERE id = 1")
    return rows[0][0] if rows else None


def test_a_researcher_sets_a_recipe_and_votes_until_a_round_is_decided(app, page):  # noqa: F811
    url, db = app
    sign_in_as_researcher(page, url)

    page.get_by_role("tab", name="Rounds").click()
    expect(page.locator("#round-recipe")).to_contain_text("No recipe yet")
    # A text input's accessible name holds its help too; min_votes is a number input, named exactly.
    page.get_by_label("every_votes").fill(str(EVERY_VOTES))
    page.get_by_label("min_votes", exact=True).fill("1")
    page.get_by_label("step_params").fill(json.dumps(STEP_PARAMS))
    page.click("#round-save")
    expect(page.locator("#round-action")).to_contain_text("Recipe v1 saved.")
    expect(page.locator("#round-recipe")).to_contain_text(f"every {EVERY_VOTES} new decided votes")
    (stored,) = query(db, "SELECT recipe, set_by FROM round_recipe")[0:1]
    assert json.loads(stored[0]) == {"every_votes": EVERY_VOTES, "min_votes": 1, "steps": ["raft"],
                                     "step_params": STEP_PARAMS, "schedule_minutes": None, "max_votes": None,
                                     "starting_policy": None}

    page.get_by_role("tab", name="Arena").click()
    for _ in range(EVERY_VOTES - 1):
        vote(page)
    assert round_status(db) is None  # not before N votes
    vote(page)
    wait_for(lambda: round_status(db), 30, "the round to start")
    wait_for(lambda: round_status(db) == "collecting", JOB_WAIT_MS / 1000, "the round's reward and RAFT jobs")
    (child,) = json.loads(query(db, "SELECT child_ids FROM rounds WHERE id = 1")[0][0])
    wait_for(lambda: query(db, "SELECT count(*) FROM completions WHERE model_id = ?", [child])[0][0] >= 6,
             JOB_WAIT_MS / 1000, "the child's story pool")
    for _ in range(MAX_VOTES_FOR_THE_CHILD):  # pair selection favours the child against its parent
        vote(page)
        if round_status(db) == "decided":
            break
    assert round_status(db) == "decided"

    page.get_by_role("tab", name="Rounds").click()
    (name,) = query(db, "SELECT name FROM models WHERE id = ?", [child])[0]
    first_row = page.locator("#rounds-table tr:has(td:first-child:text-is('1'))")
    expect(first_row).to_contain_text("decided")
    expect(first_row).to_contain_text(name)
    expect(first_row).to_contain_text("tiny-t0.7")  # the parent: the first starter
    expect(first_row).to_contain_text("reward #")
