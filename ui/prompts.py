"""Prompts tab: the prompt set with where each prompt came from (seed, user, or evolved by
the teams job from a parent with an operation), filterable by source, and one prompt's lineage."""

from __future__ import annotations

import html

import gradio as gr

from storage import prompts
from storage.db import Store

ALL_SOURCES = "all"
MAX_ROWS = 200


def prompts_html(store: Store, source: str | None) -> str:
    """The newest prompts of a source (or all) as an escaped table with their parents."""
    chosen = None if source in (None, "", ALL_SOURCES) else source
    if chosen is not None and chosen not in prompts.SOURCES:
        raise gr.Error(f"Unknown prompt source {chosen!r}.")
    rows = prompts.prompts_with_parents(store.db, chosen, MAX_ROWS)
    if not rows:
        return "<p>No prompts of this source yet.</p>"
    body = "".join(
        "<tr>"
        f"<td>#{r['id']}</td><td>{html.escape(r['source'])}</td><td>{html.escape(r['operation'] or '')}</td>"
        f"<td>{html.escape(_parent_cell(r))}</td><td>{html.escape(r['text'])}</td>"
        "</tr>"
        for r in rows
    )
    return ('<table class="jobs"><tr><th>id</th><th>source</th><th>operation</th><th>parent</th>'
            f"<th>prompt</th></tr>{body}</table>")


def _parent_cell(row: dict) -> str:
    if row["parent_id"] is None:
        return ""
    text = row["parent_text"] or ""
    return f"#{row['parent_id']} {text[:80]}{'…' if len(text) > 80 else ''}"


def lineage_html(store: Store, prompt_id) -> str:
    """A prompt's chain from its root, each step with the operation that made it."""
    if prompt_id in (None, ""):
        return ""
    try:
        chain = prompts.lineage(store.db, int(prompt_id))
    except (LookupError, ValueError, TypeError):
        return f"<p>No prompt with id {html.escape(str(prompt_id))}.</p>"
    steps = "".join(
        f"<li><b>#{p['id']}</b> ({html.escape(p['source'])}"
        f"{', ' + html.escape(p['operation']) if p['operation'] else ''}): {html.escape(p['text'])}</li>"
        for p in chain
    )
    return f"<ol>{steps}</ol>"


def build_prompts_tab(store: Store):
    """Lay out the tab; returns (show, source, table) so the page can refresh the table for
    the chosen source on load and whenever the tab is opened."""
    with gr.Row():
        source = gr.Dropdown(label="Source", choices=[ALL_SOURCES, *prompts.SOURCES], value=ALL_SOURCES,
                             elem_id="prompts-source", scale=2)
        prompt_id = gr.Number(label="Lineage of prompt #", precision=0, scale=1)
        refresh = gr.Button("Refresh", size="sm", scale=1)
    chain = gr.HTML(elem_id="prompt-lineage")
    table = gr.HTML(elem_id="prompts-table")

    def show(source_value):
        return prompts_html(store, source_value)

    source.change(show, source, table, api_name="prompts")
    refresh.click(show, source, table, api_visibility="private")
    prompt_id.change(lambda value: lineage_html(store, value), prompt_id, chain, api_visibility="private")
    return show, source, table
