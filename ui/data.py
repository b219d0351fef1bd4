"""Data tab: vote counts, and (researchers) the TRL-format export as a download."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from rlhf.export import preference_records, write_jsonl
from rlhf.settings import Settings
from storage import scores, votes
from storage.db import Store
from ui.common import require_researcher


def build_data_tab(settings: Settings, store: Store, session: gr.State):
    by_source = gr.Dataframe(label="Votes per source", interactive=False)
    with gr.Group(visible=False) as researcher_tools:
        by_annotator = gr.Dataframe(label="Votes per annotator", interactive=False)
        agreement = gr.Dataframe(label="Reward models vs people: on decided human votes, how often the model's prediction (stored at vote time) picked the same side",
                                 interactive=False)
        include_undecided = gr.Checkbox(label="Include ties and both-bad votes (marked with `label`)", value=False)
        export = gr.Button("Export preferences (JSONL, TRL format)", variant="primary")
        download = gr.File(label="Download", interactive=False)
    refresh = gr.Button("Refresh", size="sm")

    def counts(who):
        sources = pd.DataFrame(votes.votes_per_source(store.db), columns=["source", "votes", "decided", "ties", "both_bad"])
        researcher = who and who.get("role") in ("researcher", "admin")
        annotators = pd.DataFrame(votes.votes_per_annotator(store.db) if researcher else [],
                                  columns=["annotator", "role", "votes", "ties", "both_bad"])
        agreed = pd.DataFrame(scores.agreement(store.db)["by_model"] if researcher else [],
                              columns=["reward_model_id", "reward_model", "decided", "agreed", "agreement"])
        return sources, annotators, agreed

    def export_file(who, undecided):
        require_researcher(who)
        path = settings.exports_dir / f"preferences-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        count = write_jsonl(preference_records(store, include_undecided=bool(undecided)), path)
        if count == 0:
            gr.Warning("No votes to export yet.")
        return str(path)

    refresh.click(counts, session, [by_source, by_annotator, agreement], api_name="vote_counts")
    export.click(export_file, [session, include_undecided], download, api_name="export")
    return counts, [by_source, by_annotator, agreement], researcher_tools
