"""Arena tab: a prompt, two anonymous stories, four choices, skip and undo."""

from __future__ import annotations

import html
import time

import gradio as gr

from rlhf import arena
from rlhf.metrics import rate_vote, rubric_pair
from rlhf.quality import VoteRateLimiter
from rlhf.settings import Settings
from storage import ratings
from storage.db import Store
from ui.common import require_signed_in, story_html

CHOICE_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both bad"}
SHORTCUTS = {"a": "1", "b": "2", "tie": "3", "both_bad": "4"}
REPORT_LABELS = {"prompt": ("Report prompt", "P"), "a": ("Report story A", "Z"), "b": ("Report story B", "X")}

# Keyboard shortcuts click the buttons, so a key press takes exactly the path of a click.
KEYBOARD_JS = """
<script>
document.addEventListener('keydown', (event) => {
  const target = event.target;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (target && (target.tagName === 'TEXTAREA' || target.tagName === 'INPUT' || target.isContentEditable)) return;
  const ids = {'1': 'vote-a', '2': 'vote-b', '3': 'vote-tie', '4': 'vote-both_bad', 's': 'skip-pair', 'u': 'undo-vote',
               'p': 'report-prompt', 'z': 'report-a', 'x': 'report-b'};
  const id = ids[event.key.toLowerCase()];
  const button = id && document.getElementById(id);
  if (button && !button.disabled) { event.preventDefault(); button.click(); }
});
</script>
"""

HELP = (
    "Read the prompt and both stories, then choose. **Keys:** `1` A is better · `2` B is better · "
    "`3` tie · `4` both bad · `S` skip · `U` undo the last vote (within {undo:.0f} s). "
    "The policies' names are shown after you vote. Not fit for a young child? Report it: "
    "`P` the prompt · `Z` story A · `X` story B."
)


def build_arena_tab(settings: Settings, store: Store, session: gr.State) -> dict:
    """Lay out the tab and wire its events; returns components other tabs hook into."""
    gr.Markdown(HELP.format(undo=settings.undo_window_s), elem_id="arena-help")
    status = gr.Markdown("Sign in with a name (top of the page) to start voting.", elem_id="arena-status")
    with gr.Accordion("Ask for a story: type your own prompt", open=False, elem_id="ask-story"):
        with gr.Row(equal_height=True):
            own_prompt = gr.Textbox(show_label=False, placeholder="A story about a hedgehog who learns to whistle",
                                    max_length=settings.max_prompt_chars, elem_id="own-prompt", scale=4)
            ask = gr.Button("Write two stories", elem_id="ask-story-button", scale=1)
    prompt = gr.HTML(elem_id="arena-prompt")
    with gr.Row(equal_height=True, elem_id="story-row"):
        with gr.Column():
            gr.Markdown("### Story A")
            story_a = gr.HTML(elem_id="story-a")
        with gr.Column():
            gr.Markdown("### Story B")
            story_b = gr.HTML(elem_id="story-b")
    with gr.Row(elem_id="vote-bar"):
        buttons = {c: gr.Button(f"{label} ({SHORTCUTS[c]})", elem_id=f"vote-{c}",
                                variant="primary" if c in "ab" else "secondary")
                   for c, label in CHOICE_LABELS.items()}
        skip = gr.Button("Skip (S)", elem_id="skip-pair")
    with gr.Row():
        reports = {t: gr.Button(f"{label} ({key})", elem_id=f"report-{t}", size="sm")
                   for t, (label, key) in REPORT_LABELS.items()}
    rationale = gr.Textbox(label="Why? (optional)", max_lines=4, max_length=settings.max_rationale_chars,
                           elem_id="rationale")
    with gr.Row():
        reveal = gr.HTML(elem_id="reveal")
        undo = gr.Button("Undo last vote (U)", elem_id="undo-vote", size="sm")
    client_key = gr.Textbox(visible=False, elem_id="client-key")
    pair_state = gr.State(None)
    last_vote = gr.State(None)
    limiter = VoteRateLimiter.from_settings(settings)
    poll = gr.Timer(2.0, active=True)
    build_rubric(store, session, last_vote)

    outputs = [status, prompt, story_a, story_b, pair_state, client_key, poll]

    def show(view: arena.PairView | None, who: dict | None):
        if who is None:
            return ("Sign in with a name (top of the page) to start voting.", "", "", "", None, "",
                    gr.Timer(active=False))
        count = arena.vote_count(store, who["id"])
        if view is None:
            waiting = arena.preparing_message(store) or (
                "No new pairs for you right now: more stories are being written. "
                "This page checks again every few seconds.")
            return (f"**{html.escape(waiting)}** · your votes: {count}", "", "", "", None, "", gr.Timer(active=True))
        return (
            f"Which story is better? · your votes: **{count}**",
            story_html(view.prompt, "prompt"), story_html(view.story_a), story_html(view.story_b),
            view, view.client_key, gr.Timer(active=False),
        )

    def next_for(who: dict) -> arena.PairView | None:
        return arena.next_pair(store, who["id"], gold_rate=settings.gold_rate,
                               prompt_sources=settings.pair_prompt_sources,
                               collections=settings.pair_prompt_collections)

    def load_pair(who: dict | None, current: arena.PairView | None):
        if current is not None:
            return show(current, who)
        return show(next_for(who) if who else None, who)

    def poll_for_pair(who: dict | None, current: arena.PairView | None):
        if who is None or current is not None:
            return (gr.skip(),) * (len(outputs) - 1) + (gr.Timer(active=False),)
        return load_pair(who, current)

    def ask_for_story(who, text):
        """Stream both policies' stories as they are written, then show the pair to vote on."""
        who = require_signed_in(who)
        try:
            for update in arena.live_battle(store, settings, who["id"], text):
                if update.view is not None:
                    yield (*show(update.view, who), "")
                    return
                yield ("**Two storytellers are writing for you…**", story_html(text.strip(), "prompt"),
                       story_html(update.story_a), story_html(update.story_b), None, "", gr.Timer(active=False),
                       gr.skip())
        except arena.ArenaError as exc:
            raise gr.Error(str(exc)) from exc

    def make_vote(choice: str):
        def vote(who, current, key, reason, previous, request: gr.Request):
            who = require_signed_in(who)
            if current is None:
                raise gr.Error("There is no pair on screen to vote on.")
            if key != current.client_key:
                # A double click or a retry of a vote already counted: change nothing.
                return (gr.skip(),) * (len(outputs) + 3)
            try:
                vote_id, _ = arena.submit_vote(store, settings, who["id"], current, choice, reason, key,
                                               limiter=limiter, address=request.client.host if request.client else None)
            except arena.ArenaError as exc:
                raise gr.Error(str(exc)) from exc
            revealed = (
                f"You chose <b>{CHOICE_LABELS[choice]}</b>. A was <b>{html.escape(current.name_a)}</b>, "
                f"B was <b>{html.escape(current.name_b)}</b>."
            )
            return (*show(next_for(who), who), "", revealed, (vote_id, time.time()))
        return vote

    def skip_pair(who, current):
        who = require_signed_in(who)
        if current is not None:
            arena.skip_pair(store, who["id"], current)
        return (*show(next_for(who), who), "Skipped.")

    def make_report(target: str):
        def report(who, current):
            who = require_signed_in(who)
            if current is None:
                raise gr.Error("There is no pair on screen to report.")
            hidden = arena.report_item(store, settings, who["id"], current, target)
            what = REPORT_LABELS[target][0].removeprefix("Report ")
            note = " It has left the arena." if hidden else " A researcher will review it."
            return (*show(next_for(who), who), f"Thank you: you reported the {what}.{note}")
        return report

    def undo_last(who, previous):
        who = require_signed_in(who)
        view = arena.undo_vote(store, settings, who["id"], previous[0]) if previous else None
        if view is None:
            raise gr.Error(f"Nothing to undo: votes can be taken back for {settings.undo_window_s:.0f} s.")
        return (*show(view, who), "Vote undone: choose again.", None)

    for choice, button in buttons.items():
        button.click(
            make_vote(choice), [session, pair_state, client_key, rationale, last_vote],
            [*outputs, rationale, reveal, last_vote], api_name=f"vote_{choice}", trigger_mode="once",
        )
    skip.click(skip_pair, [session, pair_state], [*outputs, reveal], api_name="skip", trigger_mode="once")
    for target, button in reports.items():
        button.click(make_report(target), [session, pair_state], [*outputs, reveal], api_name=f"report_{target}",
                     trigger_mode="once")
    ask.click(ask_for_story, [session, own_prompt], [*outputs, own_prompt], api_name="ask_for_story",
              concurrency_limit=1, show_progress="minimal")
    undo.click(undo_last, [session, last_vote], [*outputs, reveal, last_vote], api_name="undo", trigger_mode="once")
    poll.tick(poll_for_pair, [session, pair_state], outputs, api_visibility="private", show_progress="hidden")
    return {"load_pair": load_pair, "outputs": outputs}


# --- Rubric: optional 1-5 ratings of the two stories just judged --------------------------
# Its own block, fed only by the last_vote state: the vote path above does not know it exists.

RUBRIC_SCALE = ["1", "2", "3", "4", "5"]
RUBRIC_EXCERPT_CHARS = 300

# Enter anywhere in the rubric (a focused radio) saves it; the vote keys ignore inputs, so
# digits pressed on a radio never vote.
RUBRIC_JS = """
<script>
document.addEventListener('keydown', (event) => {
  if (event.key !== 'Enter' || event.shiftKey || event.ctrlKey || event.metaKey || event.altKey) return;
  const rubric = document.getElementById('rubric');
  const target = event.target;
  if (!rubric || !target || !rubric.contains(target) || target.tagName === 'BUTTON') return;
  const button = document.getElementById('rate-submit');
  if (button && !button.disabled) { event.preventDefault(); button.click(); }
});
</script>
"""


def _excerpt(text: str) -> str:
    return text if len(text) <= RUBRIC_EXCERPT_CHARS else text[:RUBRIC_EXCERPT_CHARS].rstrip() + " …"


def build_rubric(store: Store, session: gr.State, last_vote: gr.State) -> None:
    """After each vote, offer 1-5 ratings of its two stories (policies named, as revealed).

    Skippable by doing nothing: the next pair is already on screen and nothing is stored
    until Save. Tab reaches the radios, arrow keys pick a value, Enter saves. Save rates the
    session's last vote as the vote handler keeps it on the server, so the `rate` API works
    without the page (only the change event that shows the rubric comes from the page).
    """
    with gr.Group(visible=False, elem_id="rubric") as group:
        gr.Markdown("**Rate the two stories you just judged** (optional: skip it by voting on the next pair; "
                    "Tab to a row, arrow keys to pick, Enter saves).")
        headings, radios = {}, {}
        with gr.Row():
            for side in ("a", "b"):
                with gr.Column():
                    headings[side] = gr.HTML(elem_id=f"rubric-story-{side}")
                    for criterion in ratings.CRITERIA:
                        radios[side, criterion] = gr.Radio(
                            RUBRIC_SCALE, label=f"Story {side.upper()}: {criterion.replace('_', ' ')}",
                            elem_id=f"rate-{side}-{criterion}",
                        )
        save = gr.Button("Save ratings (Enter)", elem_id="rate-submit", size="sm")
    rubric_status = gr.Markdown(elem_id="rubric-status")
    outputs = [group, rubric_status, *headings.values(), *radios.values()]

    def offer(who: dict | None, previous):
        pair = rubric_pair(store, who["id"], previous[0]) if who and previous else None
        if pair is None:
            return (gr.Group(visible=False), "", "", "", *[None] * len(radios))
        heading = {
            side: f"<b>Story {side.upper()}</b> ({html.escape(name)}){story_html(_excerpt(text))}"
            for side, name, text in (("a", pair.name_a, pair.story_a), ("b", pair.name_b, pair.story_b))
        }
        return (gr.Group(visible=True), "", heading["a"], heading["b"], *[None] * len(radios))

    def rate(who, previous, *values):
        who = require_signed_in(who)
        if not previous:
            raise gr.Error("There is no judged pair to rate: vote first.")
        by_side: dict[str, dict[str, int]] = {"a": {}, "b": {}}
        try:
            for (side, criterion), value in zip(radios, values):
                if value:
                    by_side[side][criterion] = int(value)
            saved = rate_vote(store, who["id"], previous[0], by_side)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return (gr.Group(visible=False), f"Saved {saved} rating{'s' if saved != 1 else ''}. Thank you!",
                gr.skip(), gr.skip(), *[None] * len(radios))

    last_vote.change(offer, [session, last_vote], outputs, api_visibility="private", show_progress="hidden")
    save.click(rate, [session, last_vote, *radios.values()], outputs, api_name="rate", trigger_mode="once")
