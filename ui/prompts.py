"""Prompts tab: the prompt set with where each prompt came from (seed, a user collection, or
evolved by the teams job from a parent with an operation), filterable by source, one prompt's
lineage, and (researchers) importing a collection by pasting lines or uploading a file."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from rlhf import prompts as prompt_import
from rlhf.records import FILE_SUFFIXES, lines
from rlhf.settings import Settings
from storage import prompts
from storage.db import Store
from ui.common import require_researcher

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
        f"<td>#{r['id']}</td><td>{html.escape(r['source'])}</td><td>{html.escape(r['collection'] or '')}</td>"
        f"<td>{html.escape(_status(r))}</td><td>{html.escape(r['operation'] or '')}</td>"
        f"<td>{html.escape(_parent_cell(r))}</td><td>{html.escape(r['text'])}</td>"
        "</tr>"
        for r in rows
    )
    return ('<table class="jobs"><tr><th>id</th><th>source</th><th>collection</th><th>status</th>'
            f"<th>operation</th><th>parent</th><th>prompt</th></tr>{body}</table>")


def _status(row: dict) -> str:
    if row["blocked_reason"]:
        return f"blocked ({row['blocked_reason']})"
    return "retired" if row["retired_at"] is not None else "in the arena"


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


def import_summary(result: dict) -> str:
    blocked = "".join(f"<li>#{b['id']}: {html.escape(b['reason'])}</li>" for b in result["blocked"])
    return (f"<p>Collection <b>{html.escape(result['collection'])}</b>: {result['added']} new prompts, "
            f"{result['duplicates']} duplicates skipped; stories queued for {len(result['generate_jobs'])} "
            f"active policies.</p>"
            + (f"<p>Kept out of the arena (content check):</p><ul>{blocked}</ul>" if blocked else ""))


def build_prompts_tab(settings: Settings, store: Store, session: gr.State):
    """Lay out the tab; returns (show, source, table, researcher tools) so the page can refresh
    the table for the chosen source on load and whenever the tab is opened."""
    with gr.Row():
        source = gr.Dropdown(label="Source", choices=[ALL_SOURCES, *prompts.SOURCES], value=ALL_SOURCES,
                             elem_id="prompts-source", scale=2)
        prompt_id = gr.Number(label="Lineage of prompt #", precision=0, scale=1)
        refresh = gr.Button("Refresh", size="sm", scale=1)
    with gr.Group(visible=False) as researcher_tools:
        with gr.Accordion("Add prompts (a named collection)", open=False):
            gr.Markdown(f"Paste one prompt a line, or upload a {', '.join(FILE_SUFFIXES)} file "
                        f"(.csv and .jsonl: a `{prompt_import.PROMPT_COLUMN}` column). At most "
                        f"{settings.max_prompt_chars} characters a prompt; a batch with a bad row is refused "
                        "whole; duplicates are skipped; prompts unfit for children are kept out of the arena.")
            with gr.Row():
                collection = gr.Textbox(label="Collection name", max_length=60, elem_id="prompt-collection")
                upload = gr.File(label="File", file_types=list(FILE_SUFFIXES), elem_id="prompt-file")
            pasted = gr.Textbox(label="Prompts, one a line", lines=5, elem_id="prompt-paste")
            add = gr.Button("Add prompts", variant="primary", elem_id="prompt-add")
            added = gr.HTML(elem_id="prompt-import-result")
        with gr.Row():
            retire_id = gr.Number(label="Retire prompt # (leaves the arena, keeps its votes)", precision=0)
            retire = gr.Button("Retire", size="sm")
    chain = gr.HTML(elem_id="prompt-lineage")
    table = gr.HTML(elem_id="prompts-table")

    def show(source_value):
        return prompts_html(store, source_value)

    def add_prompts(who, name, file, text, source_value):
        who = require_researcher(who)
        if file is not None and (text or "").strip():
            raise gr.Error("Paste prompts or upload a file, not both.")
        try:
            if file is not None:
                rows = prompt_import.prompt_file_rows(Path(file))
            else:
                rows = lines(text or "")
            result = prompt_import.import_prompts(store, settings, rows, name, who["id"])
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return import_summary(result), None, "", show(source_value)

    def retire_prompt(who, number, source_value):
        require_researcher(who)
        try:
            prompts.retire_prompt(store.db, int(number))
        except (LookupError, TypeError, ValueError):
            raise gr.Error(f"No prompt with id {number}.") from None
        return show(source_value)

    source.change(show, source, table, api_name="prompts")
    refresh.click(show, source, table, api_visibility="private")
    prompt_id.change(lambda value: lineage_html(store, value), prompt_id, chain, api_visibility="private")
    add.click(add_prompts, [session, collection, upload, pasted, source], [added, upload, pasted, table],
              api_name="add_prompts", trigger_mode="once")
    retire.click(retire_prompt, [session, retire_id, source], table, api_name="retire_prompt")
    return show, source, table, researcher_tools
