"""A researcher's whole loop in a real browser: sign in with the key, vote, fill the Train
tab's DPO form (inputs built from DPOParams), queue the job, watch it succeed in Jobs, find
the new policy in Models, and meet it in the arena against its parent.

One app (tiny random GPT-2, six-prompt pool) with researcher `rita` and a researcher key;
Chromium is the Debian build at /usr/bin/chromium driven by Playwright.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.app_server import TINY_ARGS, query, running_app, wait_for, wait_for_pool
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, STORY_WAIT_MS, UI_WAIT_MS, press_on_body

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

RESEARCHER, RESEARCHER_KEY = "rita", "correct horse battery staple"
PARENT = "tiny-t0.7"
# A DPO job of two steps on the tiny starter, then the new policy's story pool: a minute
# on an idle 2-core machine, several when it is busy.
JOB_WAIT_MS = 600_000
# The DPO form: tiny steps, and every vote trains (three votes are enough).
DPO_FORM = {"max_steps": "2", "batch_size": "2", "min_pairs": "2", "eval_fraction": "0", "max_length": "64"}
VOTES_BEFORE_TRAINING = 3
POOL_PROMPTS = int(TINY_ARGS[TINY_ARGS.index("--pool-prompts") + 1])

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Chromium at {CHROMIUM}")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("browser-train")
    env = {"STORY_ARENA_RESEARCHERS": RESEARCHER, "STORY_ARENA_RESEARCHER_KEY": RESEARCHER_KEY}
    with running_app(data_dir, env=env, extra_args=TINY_ARGS) as (url, _):
        wait_for_pool(data_dir)
        yield url, data_dir / "arena.db"


@pytest.fixture
def page(tmp_path):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(UI_WAIT_MS)
        yield page
        browser.close()


def sign_in_as_researcher(page, url: str) -> None:
    """Sign in with the researcher key and wait for the first pair of stories."""
    page.goto(url)
    page.locator("#annotator-name").get_by_role("textbox").fill(RESEARCHER)
    page.get_by_label("Researcher key (researchers only)").fill(RESEARCHER_KEY)
    page.click("#sign-in")
    expect(page.locator("#who")).to_contain_text(f"Signed in as {RESEARCHER} (researcher)")
    page.wait_for_function("() => document.querySelector('#story-a .story')", timeout=STORY_WAIT_MS)


def vote(page) -> str:
    """Vote "A is better" with the keyboard and wait for the vote to be counted; the reveal."""
    status = page.locator("#arena-status")
    done = int(re.search(r"your votes:\s*(\d+)", status.inner_text()).group(1))
    press_on_body(page, "1")
    expect(status).to_contain_text(re.compile(rf"your votes:\s*{done + 1}\b"))
    return page.locator("#reveal").inner_text()


def choose(page, container, label: str, option: str) -> None:
    """Pick an option of a Gradio dropdown: open its list, click the option."""
    container.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option).click()


def test_a_researcher_trains_dpo_from_the_form_and_meets_the_child_in_the_arena(app, page):
    url, db = app
    sign_in_as_researcher(page, url)
    for _ in range(VOTES_BEFORE_TRAINING):
        vote(page)

    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-corpus")).to_be_hidden()  # the upload is pretrain's only
    choose(page, page.locator("#train-kind"), "Kind", "pretrain")
    expect(page.locator("#train-corpus")).to_be_visible()
    choose(page, page.locator("#train-kind"), "Kind", "dpo")
    expect(page.locator("#train-corpus")).to_be_hidden()
    form = page.locator("#train-dpo")
    expect(form).to_be_visible()
    expect(page.locator("#train-reward")).to_be_hidden()
    expect(form).to_contain_text("strength of the pull towards the reference")  # a field's help
    parent_id, parent_kind = query(db, "SELECT id, kind FROM models WHERE name = ?", [PARENT])[0]
    choose(page, form, "base: base policy", f"#{parent_id} {PARENT} ({parent_kind})")
    for name, value in DPO_FORM.items():
        form.get_by_label(name, exact=True).fill(value)
    choose(page, form, "loss_type", "ipo")
    page.click("#queue-job")
    expect(page.locator("#queued")).to_contain_text("Queued job")
    job_id, params = query(db, "SELECT id, params FROM jobs WHERE kind = 'dpo'")[0]
    assert f"Queued job {job_id} (dpo)" in page.locator("#queued").inner_text()
    assert json.loads(params) == {"base": parent_id, "loss_type": "ipo", "max_steps": 2, "batch_size": 2,
                                  "eval_fraction": 0, "min_pairs": 2, "max_length": 64}

    page.get_by_role("tab", name="Jobs").click()
    row = page.locator(f"#jobs-table tr:has(td:first-child:text-is('{job_id}'))")
    expect(row).to_contain_text("succeeded", timeout=JOB_WAIT_MS)
    (child,) = query(db, "SELECT name FROM models WHERE job_id = ? AND parent_id = ?", [job_id, parent_id])[0]

    page.get_by_role("tab", name="Models").click()
    expect(page.locator("#models-table")).to_contain_text(child)

    # The child's stories are written by a light job; then pair selection favours it against its parent.
    wait_for(lambda: query(db, "SELECT count(*) FROM completions c JOIN models m ON m.id = c.model_id"
                               " WHERE m.name = ?", [child])[0][0] >= POOL_PROMPTS, JOB_WAIT_MS / 1000,
             "the new policy's story pool")
    page.get_by_role("tab", name="Arena").click()
    revealed = []
    for _ in range(15):
        revealed.append(vote(page))
        if child in revealed[-1] and PARENT in revealed[-1]:
            break
    assert child in revealed[-1] and PARENT in revealed[-1], revealed
