"""Models tab: policies with lineage; researchers add models and switch them on or off."""

from __future__ import annotations

import json

import gradio as gr
import pandas as pd

from rlhf import hub, policies
from rlhf.settings import Settings
from storage import completions, models
from storage.db import Store
from ui.common import require_researcher, row_id

COLUMNS = ["id", "name", "kind", "parent", "source", "decoding", "active", "stories"]


def policy_table(store: Store) -> pd.DataFrame:
    db = store.db
    records = models.list_models(db)
    names = {m.id: m.name for m in records}
    sizes = completions.pool_sizes(db)
    return pd.DataFrame(
        [[m.id, m.name, m.kind, names.get(m.parent_id, ""), m.source, json.dumps(m.decoding),
          m.active, sizes.get(m.id, 0)] for m in records],
        columns=COLUMNS,
    )


def build_models_tab(settings: Settings, store: Store, session: gr.State):
    table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="models-table")
    refresh = gr.Button("Refresh", size="sm")
    with gr.Group(visible=False) as researcher_tools:
        gr.Markdown("#### Add a policy (researchers)")
        with gr.Row():
            name = gr.Textbox(label="Policy name", max_length=60)
            source = gr.Textbox(label="Local model folder or Hub id", max_length=300)
            decoding = gr.Textbox(label="Decoding (JSON)", value='{"temperature": 0.8, "top_p": 0.95}', max_length=500)
        add = gr.Button("Add policy", variant="primary")
        gr.Markdown("#### Switch a policy on or off")
        with gr.Row():
            model_id = gr.Number(label="Policy id", precision=0)
            active = gr.Checkbox(label="Active (shown in the arena)", value=True)
            apply = gr.Button("Apply")
        gr.Markdown("#### Push a checkpoint to the Hub (with a model card: lineage, kind, data, metrics)")
        with gr.Row():
            push_id = gr.Number(label="Policy id", precision=0)
            push_repo = gr.Textbox(label="Hub model repo (owner/name)", max_length=200)
            push = gr.Button("Push to the Hub")
        result = gr.Markdown()

    def add_policy(who, name_text, source_text, decoding_text):
        who = require_researcher(who)
        try:
            record = policies.add_policy(store, settings, name_text, source_text,
                                         policies.parse_decoding(decoding_text), who["id"])
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return policy_table(store), f"Added **{record.name}** (id {record.id}); its stories are being written."

    def switch(who, model, on):
        require_researcher(who)
        if model is None:
            raise gr.Error("Enter a policy id.")
        try:
            record = policies.set_active(store, row_id(model, "Policy id"), bool(on))
        except LookupError as exc:
            raise gr.Error(str(exc)) from exc
        return policy_table(store), f"**{record.name}** is now {'active' if record.active else 'inactive'}."

    def push_to_hub(who, model, repo):
        who = require_researcher(who)
        try:
            job_id = hub.queue_push(store, settings, model, repo, who["id"])
        except (ValueError, LookupError) as exc:
            raise gr.Error(str(exc)) from exc
        return f"Pushing as job {job_id} (see the Jobs tab)."

    refresh.click(lambda: policy_table(store), None, table, api_name="models")
    push.click(push_to_hub, [session, push_id, push_repo], result, api_name="push_model")
    add.click(add_policy, [session, name, source, decoding], [table, result], api_name="add_policy")
    apply.click(switch, [session, model_id, active], [table, result], api_name="set_active")
    return (lambda: policy_table(store)), table, researcher_tools
