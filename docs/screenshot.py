"""Refresh docs/arena.png, the README's screenshot, from a running app.

    python docs/screenshot.py http://127.0.0.1:7860

Signs in as "reader", waits for a pair (the pool may still be filling) and captures the
page in Debian's Chromium, as the browser tests do.
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
STORIES_SHOWN = "() => ['#story-a', '#story-b'].every(id => document.querySelector(id + ' .story'))"


def main(url: str) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.locator("#annotator-name").get_by_role("textbox").fill("reader")
        page.click("#sign-in")
        page.wait_for_function(STORIES_SHOWN, timeout=600_000)
        page.screenshot(path=str(Path(__file__).with_name("arena.png")), full_page=True)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:7860")
