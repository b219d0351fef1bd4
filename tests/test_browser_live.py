"""In a real browser: an annotator asks for a story and watches both stream in, then votes and
finds the prompt under source `user`; on a phone (390 px) the sign-in collapses, the key hints
are hidden and the vote buttons stay on screen while reading. Reuses tests/test_browser.py's
app and browser."""

from __future__ import annotations

import re

from bench.app_server import query
from tests.test_browser import (  # noqa: F401  (fixtures)
    UI_WAIT_MS,
    annotator_id,
    arena,
    browser,
    expect,
    page,
    press_on_body,
    sign_in,
    votes_of,
)

# 256 tokens of the tiny model: seconds on an idle machine, minutes on a busy shared one.
STREAM_WAIT_MS = 400_000
OWN_PROMPT = "A story about a hedgehog who learns to whistle at the fair."
# Every distinct text story A shows, recorded by the page itself as it changes.
RECORD_STORY_A_JS = """() => {
  window.__storyA = [];
  new MutationObserver(() => {
    const story = document.querySelector('#story-a .story');
    const text = story ? story.innerText.trim() : '';
    if (text && window.__storyA[window.__storyA.length - 1] !== text) window.__storyA.push(text);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_ask_for_a_story_streams_both_then_votes_and_lists_the_prompt(arena, page):  # noqa: F811
    url, data_dir = arena
    name = "Liv Live"
    sign_in(page, url, name)
    page.get_by_text("Ask for a story").click()
    page.locator("#own-prompt").get_by_role("textbox").fill(OWN_PROMPT)
    page.evaluate(RECORD_STORY_A_JS)
    page.click("#ask-story-button")
    expect(page.locator("#arena-status")).to_contain_text("writing for you", timeout=STREAM_WAIT_MS)
    expect(page.locator("#arena-prompt")).to_have_text(OWN_PROMPT)
    expect(page.locator("#arena-status")).to_contain_text(re.compile(r"your votes:\s*0\b"), timeout=STREAM_WAIT_MS)
    shown = page.evaluate("() => window.__storyA")
    final_a = page.locator("#story-a .story").inner_text().strip()
    assert len(shown) >= 2 and shown[-1] == final_a, shown  # grew on screen before it was done
    assert page.locator("#story-b .story").inner_text().strip()

    press_on_body(page, "1")
    expect(page.locator("#reveal")).to_contain_text("You chose A is better")
    (vote,) = votes_of(data_dir, annotator_id(data_dir, name))
    assert query(data_dir / "arena.db", "SELECT text, source FROM prompts WHERE id = ?",
                 [vote["prompt_id"]]) == [(OWN_PROMPT, "user")]

    page.get_by_role("tab", name="Prompts").click()
    row = page.locator("#prompts-table tr", has_text=OWN_PROMPT)
    expect(row).to_contain_text("user")


def test_a_phone_votes_without_scrolling_back_up(arena, browser):  # noqa: F811
    url, data_dir = arena
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    phone = context.new_page()
    phone.set_default_timeout(UI_WAIT_MS)
    name = "Pia Phone"
    sign_in(phone, url, name)
    expect(phone.locator("#annotator-name").get_by_role("textbox")).to_be_hidden()  # sign-in collapsed
    expect(phone.locator("#arena-help")).to_be_hidden()
    expect(phone.locator("#vote-a")).to_be_in_viewport()  # on the first screen

    # Read to the end of story B (stacked below A), then vote from where the reader is.
    phone.locator("#story-b .story").evaluate("story => story.scrollIntoView({block: 'end'})")
    scrolled = phone.evaluate("() => window.scrollY")
    assert scrolled > 0
    expect(phone.locator("#vote-a")).to_be_in_viewport()
    phone.locator("#vote-a").tap()
    expect(phone.locator("#reveal")).to_contain_text("You chose A is better")
    assert len(votes_of(data_dir, annotator_id(data_dir, name))) == 1
    context.close()
