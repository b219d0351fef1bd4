"""Data tab: vote counts, and (researchers) the TRL-format export as a download and the
weak-supervision analysis: each labeling function's coverage, overlap and conflict on
the pool (Snorkel's LFAnalysis) and accuracy against human votes, and the label model's."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from rlhf.export import preference_records, write_jsonl
from rlhf.settings import Settings
from rlhf.weak import WeakParams, label_pool
from storage import scores, votes
from storage.db import Store
from ui.common import require_researcher


WEAK_COLUMNS = ["lf", "rule", "coverage", "overlap", "conflict", "human_pairs", "accuracy"]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _weak_summary(report: dict) -> str:
    return (
        f"**{report['pool_pairs']}** pool pairs ({report['unvoted_pairs']} without human votes); "
        f"at least one labeling function votes on {_percent(report['coverage'])} of them. "
        f"At confidence {report['threshold']:g} the label model would label **{report['weak_labels']}** "
        f"unvoted pairs (the `weak` job stores them).\n\n"
        f"Label model vs people, on {report['human_pairs']} decided human votes: "
        f"accuracy **{_percent(report['label_model_accuracy'])}** where any labeling function voted "
        f"({_percent(report['label_model_coverage'])} of them); "
        f"{_percent(report['label_model_accuracy_above_threshold'])} on the "
        f"{report['human_pairs_above_threshold']} above the confidence threshold."
    )


def build_data_tab(settings: Settings, store: Store, session: gr.State):
    by_source = gr.Dataframe(label="Votes per source", interactive=False)
    with gr.Group(visible=False) as researcher_tools:
        by_annotator = gr.Dataframe(label="Votes per annotator", interactive=False)
        agreement = gr.Dataframe(label="Reward models vs people: on decided human votes, how often the model's prediction (stored at vote time) picked the same side",
                                 interactive=False)
        include_undecided = gr.Checkbox(label="Include ties and both-bad votes (marked with `label`)", value=False)
        export = gr.Button("Export preferences (JSONL, TRL format)", variant="primary")
        download = gr.File(label="Download", interactive=False)
        with gr.Accordion("Weak supervision: labeling functions and label model", open=False):
            analyse = gr.Button("Analyse labeling functions on the pool")
            weak_summary = gr.Markdown()
            weak_table = gr.Dataframe(label="Labeling functions: coverage, overlap and conflict on the pool pairs; "
                                            "accuracy on the decided human votes each one voted on", interactive=False)
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

    def weak_analysis(who):
        require_researcher(who)
        try:
            report = label_pool(store, WeakParams()).report
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return _weak_summary(report), pd.DataFrame(report["lfs"], columns=WEAK_COLUMNS)

    refresh.click(counts, session, [by_source, by_annotator, agreement], api_name="vote_counts")
    analyse.click(weak_analysis, session, [weak_summary, weak_table], api_name="weak_analysis")
    export.click(export_file, [session, include_undecided], download, api_name="export")
    return counts, [by_source, by_annotator, agreement], researcher_tools
