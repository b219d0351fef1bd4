"""End to end in a real browser: sign in, vote with the keyboard, undo, leaderboard, XSS,
the rubric after a vote (and its `rate` endpoint over HTTP).

One app (tiny random GPT-2, six-prompt pool) serves the whole module; Chromium is the
Debian build at /usr/bin/chromium driven by Playwright.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from bench.app_server import TINY_ARGS, execute, query, running_app, wait_for, wait_for_pool

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
# The first pair exists once the background job has written the pool: ~30 s on an idle
# 2-core machine, several times that when the machine is busy.
STORY_WAIT_MS = 180_000
UI_WAIT_MS = 30_000  # generous: the test machine may be busy
PAYLOAD = "<script>window.__pwned = 1</script><b>bold</b>"
STARTER_NAMES = ("tiny-t0.7", "tiny-t1.0")

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Chromium at {CHROMIUM}")


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("browser-arena")
    with running_app(data_dir, env={"STORY_ARENA_RESEARCHERS": "rita"}, extra_args=TINY_ARGS) as (url, _):
        # The first pair comes before the rest of the pool: these tests vote on several pairs in a row.
        wait_for_pool(data_dir)
        yield url, data_dir


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(UI_WAIT_MS)
    yield page
    context.close()


def db_path(data_dir: Path) -> Path:
    return data_dir / "arena.db"


def sign_in(page, url: str, name: str) -> None:
    """Open the page, type a name, click Sign in, and wait until both stories are on screen."""
    page.goto(url)
    page.locator("#annotator-name").get_by_role("textbox").fill(name)
    page.click("#sign-in")
    expect(page.locator("#who")).to_contain_text(f"Signed in as {name}")
    # Before the pool exists the status says so and a timer asks again every 2 s.
    page.wait_for_function(
        "() => ['#story-a', '#story-b', '#arena-prompt'].every("
        "  id => document.querySelector(id + ' .story, ' + id + ' .prompt'))",
        timeout=STORY_WAIT_MS,
    )


def press_on_body(page, key: str) -> None:
    """A shortcut pressed with nothing focused, as when an annotator just reads and types."""
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    assert page.evaluate("() => document.activeElement.tagName") == "BODY"
    page.keyboard.press(key)


def votes_of(data_dir: Path, annotator_id: int) -> list[dict]:
    rows = query(
        db_path(data_dir),
        "SELECT v.id, v.choice, v.annotator_id, ma.name, mb.name, v.prompt_id, v.completion_a,"
        " v.completion_b, v.rationale FROM votes v JOIN models ma ON ma.id = v.model_a"
        " JOIN models mb ON mb.id = v.model_b WHERE v.annotator_id = ? ORDER BY v.id",
        [annotator_id],
    )
    keys = ("id", "choice", "annotator_id", "name_a", "name_b", "prompt_id", "completion_a", "completion_b",
            "rationale")
    return [dict(zip(keys, row)) for row in rows]


def annotator_id(data_dir: Path, name: str) -> int:
    rows = query(db_path(data_dir), "SELECT id, role FROM annotators WHERE name = ?", [name])
    assert rows, f"no annotator row for {name!r}"
    assert rows[0][1] == "annotator"
    return rows[0][0]


def leaderboard_rows(page) -> list[dict]:
    """The leaderboard Dataframe as dicts keyed by column title, read from the DOM."""
    return page.evaluate(
        """() => {
          const root = document.querySelector('#leaderboard-table');
          const heads = [...root.querySelectorAll('[role=columnheader]')]
            .map(th => th.getAttribute('title') || th.innerText.trim());
          const rows = {};
          for (const cell of root.querySelectorAll('[role=gridcell][data-row][data-col]')) {
            (rows[cell.dataset.row] ||= {})[heads[Number(cell.dataset.col)]] = cell.innerText.trim();
          }
          return Object.values(rows).filter(row => row.policy);
        }"""
    )


def test_keyboard_votes_undo_and_leaderboard(arena, page):
    url, data_dir = arena
    name = "Ada Browser"
    sign_in(page, url, name)
    me = annotator_id(data_dir, name)
    status, reveal = page.locator("#arena-status"), page.locator("#reveal")
    expect(status).to_contain_text(re.compile(r"your votes:\s*0\b"))
    first_prompt = page.inner_text("#arena-prompt").strip()
    assert first_prompt

    # Typing a digit in the rationale box writes the digit; it must not vote.
    page.locator("#rationale").get_by_role("textbox").click()
    page.keyboard.type("Ending 1 was kinder")
    expect(page.locator("#rationale").get_by_role("textbox")).to_have_value("Ending 1 was kinder")

    press_on_body(page, "1")
    expect(reveal).to_contain_text("You chose A is better", timeout=UI_WAIT_MS)
    expect(status).to_contain_text(re.compile(r"your votes:\s*1\b"))
    rows = votes_of(data_dir, me)
    assert len(rows) == 1, rows
    first = rows[0]
    assert first["choice"] == "a" and first["annotator_id"] == me
    assert first["rationale"] == "Ending 1 was kinder"
    assert {first["name_a"], first["name_b"]} == set(STARTER_NAMES)
    # The reveal names the policies in screen order, matching what was stored.
    text = reveal.inner_text()
    assert f"A was {first['name_a']}, B was {first['name_b']}" in text, text
    assert query(db_path(data_dir), "SELECT text FROM prompts WHERE id = ?", [first["prompt_id"]])[0][0] == first_prompt
    # The rationale box is cleared for the next pair.
    expect(page.locator("#rationale").get_by_role("textbox")).to_have_value("")

    second_prompt = page.inner_text("#arena-prompt").strip()
    press_on_body(page, "4")
    expect(reveal).to_contain_text("You chose Both bad")
    expect(status).to_contain_text(re.compile(r"your votes:\s*2\b"))
    rows = votes_of(data_dir, me)
    assert [r["choice"] for r in rows] == ["a", "both_bad"]
    second = rows[1]
    assert second["annotator_id"] == me
    assert {second["completion_a"], second["completion_b"]} != {first["completion_a"], first["completion_b"]}
    stored = query(db_path(data_dir), "SELECT text FROM prompts WHERE id = ?", [second["prompt_id"]])[0][0]
    assert stored == second_prompt

    press_on_body(page, "u")
    expect(reveal).to_contain_text("Vote undone")
    expect(status).to_contain_text(re.compile(r"your votes:\s*1\b"))
    rows = votes_of(data_dir, me)
    assert [r["id"] for r in rows] == [first["id"]], "undo must delete the last vote and only it"
    # The undone pair is back on screen to be judged again.
    expect(page.locator("#arena-prompt")).to_have_text(second_prompt)

    page.get_by_role("tab", name="Leaderboard").click()
    page.get_by_role("button", name="Refresh").filter(visible=True).click()
    expect(page.locator("#leaderboard-table")).to_contain_text(STARTER_NAMES[0])
    expect(page.locator("#leaderboard-table")).to_contain_text(STARTER_NAMES[1])

    def counted():
        by_policy = {row["policy"]: row for row in leaderboard_rows(page)}
        if all(p in by_policy and float(by_policy[p]["votes"] or 0) >= 1 for p in STARTER_NAMES):
            return by_policy
        return None

    # Both policies are listed with the remaining vote counted (the undone one is not).
    by_policy = wait_for(counted, UI_WAIT_MS / 1000, "both policies with a nonzero votes figure",
                         on_timeout=lambda: str(leaderboard_rows(page)))
    board = list(by_policy.values())
    for policy in STARTER_NAMES:
        assert float(by_policy[policy]["votes"]) == 1, by_policy[policy]
        assert float(by_policy[policy]["both_bad"]) == 0, by_policy[policy]
    # One decided vote: its winner outranks its loser.
    winner = first["name_a"]
    loser = first["name_b"]
    assert float(by_policy[winner]["wins"]) == 1 and float(by_policy[loser]["losses"]) == 1, board
    assert float(by_policy[winner]["score"]) > float(by_policy[loser]["score"]), board


def ratings_of(data_dir: Path, annotator_id: int) -> dict[tuple[int, str], int]:
    rows = query(db_path(data_dir), "SELECT completion_id, criterion, rating FROM ratings WHERE annotator_id = ?",
                 [annotator_id])
    return {(completion, criterion): rating for completion, criterion, rating in rows}


def test_rubric_after_a_vote_is_optional_keyboard_friendly_and_stored(arena, page):
    url, data_dir = arena
    name = "Rubric Rater"
    sign_in(page, url, name)
    me = annotator_id(data_dir, name)
    # Gradio 6 renders a Group's elem_id on two nested elements: the outer one is the block.
    rubric, status = page.locator("#rubric").first, page.locator("#arena-status")
    expect(rubric).to_be_hidden()

    press_on_body(page, "2")
    expect(page.locator("#reveal")).to_contain_text("You chose B is better")
    (judged,) = votes_of(data_dir, me)
    # The rubric names the two stories just judged; the next pair is already on screen.
    expect(rubric).to_be_visible()
    expect(page.locator("#rubric-story-a")).to_contain_text(f"Story A ({judged['name_a']})")
    expect(page.locator("#rubric-story-b")).to_contain_text(f"Story B ({judged['name_b']})")
    expect(page.locator("#story-a .story")).to_be_visible()

    page.locator("#rate-a-coherence").get_by_role("radio", name="4").click()
    engagement_b = page.locator("#rate-b-engagement").get_by_role("radio", name="2")
    engagement_b.focus()
    page.keyboard.press("Space")
    expect(engagement_b).to_be_checked()
    # A digit typed on a focused radio is not a vote shortcut.
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    expect(page.locator("#rubric-status")).to_contain_text("Saved 2 ratings")
    expect(rubric).to_be_hidden()
    expect(status).to_contain_text(re.compile(r"your votes:\s*1\b"))
    assert ratings_of(data_dir, me) == {
        (judged["completion_a"], "coherence"): 4, (judged["completion_b"], "engagement"): 2,
    }

    # Skipping it: vote on the next pair and leave the rubric alone; nothing more is stored.
    press_on_body(page, "1")
    expect(status).to_contain_text(re.compile(r"your votes:\s*2\b"))
    expect(rubric).to_be_visible()
    assert len(ratings_of(data_dir, me)) == 2

    # The Metrics tab averages the ratings per policy.
    page.get_by_role("tab", name="Metrics").click()
    page.locator("#metrics-refresh").click()
    expect(page.locator("#metrics-table")).to_contain_text("rated coherence", timeout=UI_WAIT_MS)
    expect(page.locator("#metrics-table")).to_contain_text(judged["name_a"])


def test_rate_api_checks_the_session_and_stores_through_http(arena):
    """The rubric's `rate` endpoint over HTTP: signed-in session, and only one's own last vote."""
    gradio_client = pytest.importorskip("gradio_client")
    from gradio_client.exceptions import AppError

    def client_key(outputs) -> str:
        return next(o for o in outputs if isinstance(o, str) and re.fullmatch(r"[0-9a-f]{32}", o))

    url, data_dir = arena
    wait_for_pool(data_dir)
    no_ratings = (None,) * 6  # A then B, criteria in ratings.CRITERIA order
    stranger = gradio_client.Client(url, verbose=False)
    with pytest.raises(AppError, match="Sign in"):
        stranger.predict("4", *no_ratings[1:], api_name="/rate")
    rater = gradio_client.Client(url, verbose=False)
    key = client_key(rater.predict("Quinn", "", api_name="/sign_in"))
    with pytest.raises(AppError, match="vote first"):
        rater.predict("4", *no_ratings[1:], api_name="/rate")
    rater.predict(key, "", api_name="/vote_a")
    # Another session has not voted on that pair: its rating is refused.
    other = gradio_client.Client(url, verbose=False)
    other.predict("Rex", "", api_name="/sign_in")
    with pytest.raises(AppError, match="vote first"):
        other.predict("1", *no_ratings[1:], api_name="/rate")
    with pytest.raises(AppError, match="at least one rating"):
        rater.predict(*no_ratings, api_name="/rate")
    rater.predict("4", None, "2", None, None, "5", api_name="/rate")
    db = db_path(data_dir)
    (vote,) = query(db, "SELECT v.id, v.completion_a, v.completion_b FROM votes v"
                        " JOIN annotators a ON a.id = v.annotator_id WHERE a.name = 'Quinn'")
    stored = query(db, "SELECT r.completion_id, r.criterion, r.rating, r.vote_id FROM ratings r"
                       " JOIN annotators a ON a.id = r.annotator_id WHERE a.name = 'Quinn' ORDER BY 1, 2")
    assert sorted(stored) == sorted([
        (vote[1], "coherence", 4, vote[0]), (vote[1], "engagement", 2, vote[0]),
        (vote[2], "engagement", 5, vote[0]),
    ])


def test_story_markup_renders_as_text(arena, page):
    url, data_dir = arena
    wait_for_pool(data_dir)
    # A model can write anything: every story now carries a script and a tag.
    changed = execute(db_path(data_dir), "UPDATE completions SET text = 'Story ' || id || ': ' || ?", [PAYLOAD])
    assert changed >= 2

    sign_in(page, url, "Mallory")
    for side in ("#story-a", "#story-b"):
        story = page.locator(f"{side} .story")
        expect(story).to_contain_text(PAYLOAD)
        assert story.locator("script, b").count() == 0
    expect(page.get_by_text("<script>", exact=False).first).to_be_visible()
    assert page.evaluate("() => window.__pwned") is None

    # Voting on it shows the next (equally hostile) pair, still inert.
    press_on_body(page, "2")
    expect(page.locator("#reveal")).to_contain_text("You chose B is better")
    expect(page.locator("#story-a .story")).to_contain_text(PAYLOAD)
    assert page.evaluate("() => window.__pwned") is None


def test_opening_a_tab_shows_what_was_stored_after_the_page_loaded(arena, page):
    url, data_dir = arena
    wait_for_pool(data_dir)
    page.goto(url)
    page.get_by_role("tab", name="Prompts").click()
    expect(page.locator("#prompts-table")).to_contain_text("Write")
    page.get_by_role("tab", name="Arena").click()
    text = "Write a story about a lighthouse that collects lost socks."
    execute(db_path(data_dir), "INSERT INTO prompts (text, source, created_at) VALUES (?, 'user', 0)", [text])
    page.get_by_role("tab", name="Prompts").click()
    expect(page.locator("#prompts-table")).to_contain_text(text)


def test_a_name_belongs_to_the_browser_that_first_used_it(arena, browser, page):
    """The browser's token (localStorage) claims a name; another browser is refused it."""
    url, data_dir = arena
    wait_for_pool(data_dir)
    sign_in(page, url, "Tess")
    token = page.evaluate("() => localStorage.getItem('story-arena-token')")
    assert token and re.fullmatch(r"[0-9a-f]{32}", token)
    stored = query(db_path(data_dir), "SELECT token_hash FROM annotators WHERE name = 'Tess'")
    assert stored == [(hashlib.sha256(token.encode()).hexdigest(),)]

    other_context = browser.new_context(viewport={"width": 1280, "height": 900})
    other = other_context.new_page()
    other.set_default_timeout(UI_WAIT_MS)
    other.goto(url)
    other.locator("#annotator-name").get_by_role("textbox").fill("tess")
    other.click("#sign-in")
    expect(other.get_by_text("is taken").first).to_be_visible()
    expect(other.locator("#who")).not_to_contain_text("Signed in")
    other_context.close()

    # The first browser, after a reload, is still Tess (same token, unchanged).
    sign_in(page, url, "Tess")
    assert page.evaluate("() => localStorage.getItem('story-arena-token')") == token


def test_researchers_export_as_a_download_without_a_file_url(arena, page):
    url, data_dir = arena
    wait_for_pool(data_dir)
    sign_in(page, url, "rita")
    press_on_body(page, "1")  # at least one vote to export
    expect(page.locator("#reveal")).to_contain_text("You chose A is better")
    page.get_by_role("tab", name="Data").click()
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Export preferences (JSONL, TRL format)").click()
    download = download_info.value
    assert download.suggested_filename.startswith("preferences-") and download.suggested_filename.endswith(".jsonl")
    lines = Path(download.path()).read_text(encoding="utf-8").splitlines()
    assert all(json.loads(line)["prompt"] for line in lines)
    assert not (data_dir / "exports").exists()
