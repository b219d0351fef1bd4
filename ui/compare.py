"""Compare tab: every policy's story for one prompt, side by side."""

from __future__ import annotations

import html

import gradio as gr

from storage import completions
from storage.db import Store
from ui.common import story_html


def _choices(store: Store) -> list[tuple[str, int]]:
    rows = completions.prompts_with_completions(store.db, min_policies=1)
    return [(f"#{r['id']} ({r['stories']} stories) {r['text'][:90]}", r["id"]) for r in rows]


def build_compare_tab(store: Store):
    picker = gr.Dropdown(label="Prompt", choices=[], elem_id="compare-prompt")
    reload = gr.Button("Reload prompt list", size="sm")
    grid = gr.HTML(elem_id="compare-grid")

    def show(prompt_id):
        if prompt_id is None:
            return ""
        stories = completions.completions_for_prompt(store.db, int(prompt_id))
        cells = "".join(
            f'<div class="compare-cell"><h4>{html.escape(s["model_name"])}</h4>{story_html(s["text"])}</div>'
            for s in stories
        )
        return f'<div class="compare-grid">{cells}</div>'

    def refresh():
        return gr.Dropdown(choices=_choices(store))

    picker.change(show, picker, grid, api_name="compare")
    reload.click(refresh, None, picker, api_visibility="private")
    return refresh, picker
