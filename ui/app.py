"""Builds the whole page: sign-in row and the tabs, wired to one session state."""

from __future__ import annotations

import html
import secrets

import gradio as gr

from rlhf import arena
from rlhf.quality import VoteRateLimiter
from rlhf.settings import Settings
from storage.db import Store
from ui.arena import KEYBOARD_JS, RUBRIC_JS, build_arena_tab
from ui.compare import build_compare_tab
from ui.data import build_data_tab
from ui.leaderboard import build_leaderboard_tab
from ui.metrics import build_metrics_tab
from ui.models import build_models_tab
from ui.prompts import build_prompts_tab
from ui.rounds import build_rounds_tab
from ui.train import build_jobs_tab, build_train_tab

CSS = """
.story, .prompt { white-space: pre-wrap; line-height: 1.5; padding: 0.75rem; border-radius: 8px;
  background: var(--block-background-fill); border: 1px solid var(--border-color-primary); }
.prompt { font-weight: 600; }
.story { min-height: 12rem; }
table.jobs { width: 100%; border-collapse: collapse; }
table.jobs td, table.jobs th {
  padding: 0.25rem 0.5rem; border-bottom: 1px solid var(--border-color-primary); text-align: left;
}
.compare-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(18rem, 1fr)); gap: 0.75rem; }
#story-row > div { justify-content: flex-start; }
/* A phone: no keyboard, so no key hints on the first screen; the vote buttons stay at the
   bottom of the screen while the annotator scrolls through both stacked stories. */
@media (max-width: 640px) {
  #arena-help { display: none; }
  #vote-bar { position: fixed; left: 0; right: 0; bottom: 0; z-index: 50; margin: 0; padding: 0.4rem;
    background: var(--background-fill-primary); border-top: 1px solid var(--border-color-primary);
    display: grid; grid-template-columns: 1fr 1fr; gap: 0.4rem; }
  #vote-bar > * { min-width: 0 !important; }
  .gradio-container { padding-bottom: 9rem !important; }
}
"""
# The browser's secret for the names it claims (rlhf.arena.sign_in): read from localStorage
# into the sign-in call, and stored there once the server has answered with it.
TOKEN_STORAGE_KEY = "story-arena-token"
SEND_TOKEN_JS = f"(name, key, token) => [name, key, localStorage.getItem('{TOKEN_STORAGE_KEY}') || '']"
KEEP_TOKEN_JS = f"(token) => {{ if (token) localStorage.setItem('{TOKEN_STORAGE_KEY}', token); }}"
# Temporary files (uploads, downloads) are deleted hourly once an hour old.
DELETE_CACHE = (3600, 3600)


def build_ui(settings: Settings, store: Store) -> tuple[gr.Blocks, dict]:
    """The Blocks app and the keyword arguments its launch() needs (CSS, keyboard script,
    upload and session limits)."""
    name_limiter = VoteRateLimiter.for_new_names(settings)
    with gr.Blocks(title="Story Arena", delete_cache=DELETE_CACHE) as demo:
        # Gradio drops the value this long after sign-in: an idle session holds nothing.
        session = gr.State(None, time_to_live=settings.session_idle_minutes * 60)
        gr.Markdown("# Story Arena\nWhich story is better? Your votes train the next storytellers.")
        with gr.Accordion("Sign in", open=True, elem_id="sign-in-box") as sign_in_box, gr.Row(equal_height=True):
            name = gr.Textbox(label="Your name", max_length=settings.max_name_chars, elem_id="annotator-name", scale=3)
            key = gr.Textbox(label="Researcher key (researchers only)", type="password", max_length=200, scale=2)
            sign_in = gr.Button("Sign in", variant="primary", elem_id="sign-in", scale=1)
            if settings.hub_oauth:
                gr.LoginButton(scale=1)
        token = gr.Textbox(visible=False, elem_id="browser-token")
        who_md = gr.Markdown(elem_id="who")
        with gr.Tabs():
            with gr.Tab("Arena", id="arena"):
                arena_tab = build_arena_tab(settings, store, session)
            with gr.Tab("Leaderboard", id="leaderboard") as board_tab:
                load_board, board_outputs = build_leaderboard_tab(store)
            with gr.Tab("Metrics", id="metrics") as metrics_tab:
                load_metrics, metrics_outputs = build_metrics_tab(store)
            with gr.Tab("Compare", id="compare") as compare_tab:
                load_prompts, prompt_picker = build_compare_tab(store)
            with gr.Tab("Prompts", id="prompts") as prompts_tab:
                show_prompts, prompt_source, prompt_table, prompt_tools = build_prompts_tab(settings, store, session)
            with gr.Tab("Models", id="models") as models_tab:
                load_models, models_table, model_tools = build_models_tab(settings, store, session)
            with gr.Tab("Data", id="data") as data_tab:
                load_counts, count_outputs, data_tools = build_data_tab(settings, store, session)
            with gr.Tab("Train", id="train") as train_tab:
                load_bases, base_picker, train_tools = build_train_tab(settings, store, session)
            with gr.Tab("Jobs", id="jobs") as jobs_tab:
                load_jobs, jobs_table, job_tools = build_jobs_tab(settings, store, session)
            with gr.Tab("Rounds", id="rounds") as rounds_tab:
                load_rounds, rounds_outputs, round_tools = build_rounds_tab(settings, store, session)
        researcher_groups = [model_tools, data_tools, train_tools, job_tools, prompt_tools, round_tools]

        def signed_in(who, browser_token):
            researcher = who["role"] in ("researcher", "admin")
            welcome = f"Signed in as **{html.escape(who['name'])}** ({who['role']})."
            # Collapsed once signed in (it took a phone's first screen); open it to switch names.
            return (
                who, welcome, gr.Accordion(open=False, label="Sign in with another name"),
                *[gr.Group(visible=researcher) for _ in researcher_groups],
                *arena_tab["load_pair"](who, None), *load_counts(who), browser_token,
            )

        def do_sign_in(name_text, key_text, token_text=None, request: gr.Request = None):
            """A client without a token (a first visit, an API client) gets a new one back."""
            browser_token = token_text or secrets.token_hex(16)
            address = request.client.host if request.client else None
            try:
                who = arena.sign_in(store, settings, name_text, key_text, browser_token, name_limiter, address)
            except arena.ArenaError as exc:
                raise gr.Error(str(exc)) from exc
            return signed_in(who, browser_token)

        def do_hub_sign_in(profile: gr.OAuthProfile | None):
            """After "Sign in with Hugging Face" the page reloads: Gradio injects the verified
            profile (never a client's claim), and that username signs in."""
            if profile is None:
                return tuple(gr.skip() for _ in sign_in_outputs)
            try:
                return signed_in(arena.sign_in_hub(store, settings, profile.username), gr.skip())
            except arena.ArenaError as exc:
                raise gr.Error(str(exc)) from exc

        sign_in_outputs = [session, who_md, sign_in_box, *researcher_groups, *arena_tab["outputs"], *count_outputs,
                           token]
        if settings.hub_oauth:
            demo.load(do_hub_sign_in, None, sign_in_outputs, api_visibility="private")
        sign_in.click(do_sign_in, [name, key, token], sign_in_outputs, api_name="sign_in", js=SEND_TOKEN_JS).success(
            None, token, None, js=KEEP_TOKEN_JS)
        name.submit(
            do_sign_in, [name, key, token], sign_in_outputs, api_visibility="private", js=SEND_TOKEN_JS,
        ).success(None, token, None, js=KEEP_TOKEN_JS)
        # Each tab is filled when the page loads and again whenever it is opened, so what it
        # shows is never older than the click that brought it up (the first start fills the
        # database while the page is already open).
        tab_contents = [
            (board_tab, load_board, None, board_outputs),
            (metrics_tab, load_metrics, None, metrics_outputs),
            (compare_tab, load_prompts, None, prompt_picker),
            (prompts_tab, show_prompts, prompt_source, prompt_table),
            (models_tab, load_models, None, models_table),
            (train_tab, load_bases, None, base_picker),
            (jobs_tab, load_jobs, session, jobs_table),
            (rounds_tab, load_rounds, session, rounds_outputs),
        ]
        tab_contents.append((data_tab, load_counts, session, count_outputs))
        for tab, load, inputs, outputs in tab_contents:
            demo.load(load, inputs, outputs, api_visibility="private")
            tab.select(load, inputs, outputs, api_visibility="private", show_progress="hidden")
    return demo, {
        "css": CSS, "head": KEYBOARD_JS + RUBRIC_JS,
        "max_file_size": int(settings.max_upload_mb * 1024 * 1024),
        "state_session_capacity": settings.session_capacity,
    }
