"""Data tab: vote counts, and (researchers) the TRL-format export as a download and the
weak-supervision analysis: each labeling function's coverage, overlap and conflict on
the pool (Snorkel's LFAnalysis) and accuracy against human votes, and the label model's."""

from __future__ import annotations

import html
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from rlhf import hub, preferences, quality, safety
from rlhf.export import jsonl_line, preference_records
from rlhf.settings import Settings
from rlhf.weak import WeakParams, label_pool
from storage import content, scores, votes
from storage import quality as quality_rows
from storage.db import Store
from ui.common import require_researcher, row_id

# The export reaches the browser only as the answer to the researcher's own click (the
# handler checks the role): no file URL exists that anyone else could fetch.
DOWNLOAD_JS = """(text) => {
  if (!text) return;
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([text], {type: 'application/jsonl'}));
  link.download = 'preferences-' + new Date().toISOString().slice(0, 19).replace(/[:T]/g, '-') + '.jsonl';
  link.click();
  URL.revokeObjectURL(link.href);
}"""

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
        agreement = gr.Dataframe(label="Reward models vs people: on decided human votes, how often the model's "
                                       "prediction (stored at vote time) picked the same side",
                                 interactive=False)
        include_undecided = gr.Checkbox(label="Include ties and both-bad votes (marked with `label`)", value=False)
        export = gr.Button("Export preferences (JSONL, TRL format)", variant="primary")
        exported = gr.Textbox(visible=False, elem_id="export-jsonl")
        target = settings.hub_dataset or "no dataset repo set (--hub-dataset)"
        publish = gr.Button(f"Publish preferences to the Hub ({target})")
        published = gr.Markdown()
        with gr.Accordion("Weak supervision: labeling functions and label model", open=False):
            analyse = gr.Button("Analyse labeling functions on the pool")
            weak_summary = gr.Markdown()
            weak_table = gr.Dataframe(label="Labeling functions: coverage, overlap and conflict on the pool pairs; "
                                            "accuracy on the decided human votes each one voted on", interactive=False)
        build_quality_block(settings, store, session)
        build_imports_block(settings, store, session)
        build_content_block(store, session)
    refresh = gr.Button("Refresh", size="sm")

    def counts(who):
        sources = pd.DataFrame(votes.votes_per_source(store.db),
                               columns=["source", "votes", "decided", "ties", "both_bad"])
        researcher = who and who.get("role") in ("researcher", "admin")
        annotators = pd.DataFrame(votes.votes_per_annotator(store.db) if researcher else [],
                                  columns=["annotator", "role", "votes", "ties", "both_bad"])
        agreed = pd.DataFrame(scores.agreement(store.db)["by_model"] if researcher else [],
                              columns=["reward_model_id", "reward_model", "decided", "agreed", "agreement"])
        return sources, annotators, agreed

    def export_jsonl(who, undecided):
        """The preferences as JSON lines, which the browser saves as a file (DOWNLOAD_JS)."""
        require_researcher(who)
        text = "".join(map(jsonl_line, preference_records(store, include_undecided=bool(undecided))))
        if not text:
            gr.Warning("No votes to export yet.")
        return text

    def weak_analysis(who):
        require_researcher(who)
        try:
            report = label_pool(store, WeakParams()).report
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return _weak_summary(report), pd.DataFrame(report["lfs"], columns=WEAK_COLUMNS)

    refresh.click(counts, session, [by_source, by_annotator, agreement], api_name="vote_counts")
    analyse.click(weak_analysis, session, [weak_summary, weak_table], api_name="weak_analysis")
    def publish_to_hub(who):
        who = require_researcher(who)
        try:
            job_id = hub.queue_publish(store, settings, who["id"])
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return f"Publishing as job {job_id} (see the Jobs tab); voting goes on meanwhile."

    export.click(export_jsonl, [session, include_undecided], exported, api_name="export").success(
        None, exported, None, js=DOWNLOAD_JS)
    publish.click(publish_to_hub, session, published, api_name="publish")
    return counts, [by_source, by_annotator, agreement], researcher_tools


# --- Annotator quality: gold accuracy, agreement, exclusion, gold pairs (researchers) --------

QUALITY_HEAD = ("annotator", "role", "human votes", "gold votes", "gold accuracy", "shared pairs",
                "kappa vs others", "status")


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if isinstance(value, float) else html.escape(str(value))


def quality_html(rows: list[dict]) -> str:
    """The per-annotator table; names and reasons are untrusted and escaped."""
    body = []
    for r in rows:
        status = (f"excluded: {r['excluded_reason'] or ''}" if r["excluded"]
                  else "below threshold" if r["below_threshold"] else "counted")
        cells = (r["annotator"], r["role"], r["votes"], r["gold_votes"], r["gold_accuracy"],
                 r["shared_pairs"], r["kappa"], status)
        body.append("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in QUALITY_HEAD) + "</tr>"
    return f'<table class="jobs">{head}{"".join(body)}</table>'


def gold_html(rows: list[dict]) -> str:
    body = [
        f"<tr><td>{g['id']}</td><td>#{g['prompt_id']} {html.escape(g['prompt'][:80])}</td>"
        f"<td>{html.escape(g['better_policy'])}</td><td>{html.escape(g['worse_policy'])}</td>"
        f"<td>{g['votes']}</td><td>{g['correct']}</td></tr>"
        for g in rows
    ]
    head = "<tr><th>id</th><th>prompt</th><th>better</th><th>worse</th><th>votes</th><th>right</th></tr>"
    return f'<table class="jobs">{head}{"".join(body)}</table>'


def build_quality_block(settings: Settings, store: Store, session: gr.State) -> None:
    """Gold accuracy and Cohen's kappa per annotator, exclusion, and gold pairs (rlhf.quality)."""
    with gr.Accordion("Annotator quality: gold pairs, agreement, exclusion", open=False):
        gr.Markdown(
            f"Gold pairs (two stories of one prompt with a known answer) are shown in {settings.gold_rate:.0%} "
            f"of pairs until an annotator has seen them all; their votes count only here. Kappa: Cohen's kappa "
            f"against the majority of the other annotators on shared story pairs. Flagged: gold accuracy under "
            f"{settings.min_gold_accuracy:.0%} on at least {settings.min_gold_votes} gold votes. Excluded annotators' "
            f"votes stay stored but leave the training data and the leaderboard."
        )
        show = gr.Button("Show annotator quality")
        table = gr.HTML(elem_id="annotator-quality")
        with gr.Row():
            name = gr.Textbox(label="Annotator name", max_length=settings.max_name_chars)
            exclude = gr.Button("Exclude")
            include = gr.Button("Include again")
            exclude_flagged = gr.Button("Exclude everyone flagged")
        with gr.Row():
            prompt_id = gr.Number(label="Prompt id (#id in the Compare tab)", precision=0)
            better = gr.Textbox(label="Better policy (name or id)")
            worse = gr.Textbox(label="Worse policy (name or id)")
            add = gr.Button("Add gold pair")
        message = gr.Markdown()
        gold_table = gr.HTML(elem_id="gold-pairs")

    def refreshed(who, note: str = ""):
        require_researcher(who)
        return quality_html(quality.report(store, settings)), gold_html(quality_rows.list_gold_pairs(store.db)), note

    def set_excluded(excluded: bool):
        def act(who, annotator):
            require_researcher(who)
            try:
                quality.set_excluded(store, annotator, excluded)
            except LookupError as exc:
                raise gr.Error(str(exc)) from exc
            return refreshed(who, f"{html.escape(annotator.strip())} is {'excluded' if excluded else 'counted again'}.")
        return act

    def exclude_below(who):
        require_researcher(who)
        names = quality.exclude_below_threshold(store, settings)
        return refreshed(who, f"Excluded: {html.escape(', '.join(names)) or 'nobody'}.")

    def add_gold(who, prompt, better_policy, worse_policy):
        who = require_researcher(who)
        if prompt is None:
            raise gr.Error("Enter the prompt id of the gold pair.")
        try:
            gold_id = quality.add_gold_pair(store, row_id(prompt, "Prompt id"), better_policy, worse_policy, who["id"])
        except (ValueError, LookupError) as exc:
            raise gr.Error(str(exc)) from exc
        return refreshed(who, f"Added gold pair {gold_id}.")

    outputs = [table, gold_table, message]
    show.click(refreshed, session, outputs, api_name="annotator_quality")
    exclude.click(set_excluded(True), [session, name], outputs, api_name="exclude_annotator")
    include.click(set_excluded(False), [session, name], outputs, api_name="include_annotator")
    exclude_flagged.click(exclude_below, session, outputs, api_name="exclude_flagged")
    add.click(add_gold, [session, prompt_id, better, worse], outputs, api_name="add_gold_pair")


# --- Imported preference data sets (researchers) ---------------------------------------------

def datasets_html(rows: list[dict]) -> str:
    body = "".join(f"<tr><td>{html.escape(r['dataset'])}</td><td>{r['pairs']}</td>"
                   f"<td>{time.strftime('%Y-%m-%d %H:%M', time.localtime(r['imported_at']))}</td></tr>" for r in rows)
    return f'<table class="jobs"><tr><th>data set</th><th>pairs</th><th>imported</th></tr>{body}</table>'


def build_imports_block(settings: Settings, store: Store, session: gr.State) -> None:
    """Upload a TRL-format preference data set (.jsonl) or name a Hub dataset / local folder."""
    with gr.Accordion("Import preference data (TRL format)", open=False):
        gr.Markdown("Rows with `prompt`, `chosen`, `rejected` (texts, or lists of {role, content} messages). "
                    "Stored as votes with source `import` under the data set's name: never on the leaderboard "
                    "or in annotator statistics; training uses them only when asked. A batch with a bad row is "
                    "refused whole.")
        with gr.Row():
            name = gr.Textbox(label="Data set name", max_length=40, elem_id="pref-name")
            upload = gr.File(label=".jsonl file", file_types=[".jsonl"], elem_id="pref-file")
        with gr.Row():
            hub_id = gr.Textbox(label="or a Hub dataset id / local dataset folder", max_length=300)
            split = gr.Textbox(label="Split", value="train", max_length=60)
        run = gr.Button("Import preferences", variant="primary", elem_id="pref-import")
        result = gr.HTML(elem_id="pref-import-result")

    def import_data(who, dataset_name, file, source, split_name):
        require_researcher(who)
        origin = str(file) if file is not None else (source or "").strip()
        if not origin:
            raise gr.Error("Upload a .jsonl file or give a Hub dataset id.")
        try:
            rows = preferences.read_pairs(origin, (split_name or "train").strip(), settings.hub_token)
            done = preferences.import_preferences(store, settings, rows, dataset_name,
                                                  Path(origin).name if file is not None else origin)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return (f"<p>Imported <b>{html.escape(done['dataset'])}</b>: "
                f"{done['pairs']} pairs on {done['prompts']} prompts "
                f"({done['blocked_texts']} texts flagged by the content check).</p>"
                + datasets_html(votes.imported_datasets(store.db)))

    run.click(import_data, [session, name, upload, hub_id, split], result, api_name="import_preferences",
              trigger_mode="once")


# --- Content fit for children: the theme list and annotators' reports (researchers) -----------

def reports_html(rows: list[dict]) -> str:
    body = "".join(
        f"<tr><td>{r['report_id']}</td><td>{'story #' + str(r['completion_id']) if r['completion_id'] else 'prompt'}"
        f" (prompt #{r['prompt_id']})</td><td>{r['reports']}</td>"
        f"<td>{html.escape(r['blocked_reason'] or 'in the arena')}</td>"
        f"<td>{html.escape(r['text'][:300])}</td></tr>"
        for r in rows
    )
    if not body:
        return "<p>No open reports.</p>"
    return ('<table class="jobs"><tr><th>report</th><th>item</th><th>reports</th><th>status</th><th>text</th></tr>'
            f"{body}</table>")


def build_content_block(store: Store, session: gr.State) -> None:
    """Themes unfit for young children (whole words or phrases, one a line), and the reports
    annotators made, to confirm (the item leaves the arena) or dismiss."""
    with gr.Accordion("Content fit for children: themes and reports", open=False):
        gr.Markdown("Texts mentioning a theme below (whole words, any case), or that the offensive-language "
                    "classifier flags, are kept out of the arena with the reason stored. The list applies to "
                    "texts checked from now on.")
        load = gr.Button("Show themes and reports")
        themes = gr.Textbox(label="Unsuitable themes, one a line", lines=8, elem_id="content-themes")
        save = gr.Button("Save themes")
        reports = gr.HTML(elem_id="content-reports")
        with gr.Row():
            report_id = gr.Number(label="Report id", precision=0)
            confirm = gr.Button("Confirm (leaves the arena)")
            dismiss = gr.Button("Dismiss (back in the arena)")
        message = gr.Markdown()

    def shown(who, note: str = ""):
        require_researcher(who)
        return "\n".join(content.themes(store.db)), reports_html(content.open_reports(store.db)), note

    def save_themes(who, text):
        require_researcher(who)
        try:
            saved = safety.save_themes(store, text)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return shown(who, f"Saved {len(saved)} themes.")

    def reviewer(confirmed: bool):
        def act(who, number):
            who = require_researcher(who)
            try:
                content.review(store.db, int(number), confirmed, who["id"])
            except (LookupError, TypeError, ValueError):
                raise gr.Error(f"No report with id {number}.") from None
            return shown(who, f"Report {int(number)} {'confirmed' if confirmed else 'dismissed'}.")
        return act

    outputs = [themes, reports, message]
    load.click(shown, session, outputs, api_name="content_review")
    save.click(save_themes, [session, themes], outputs, api_name="save_themes")
    confirm.click(reviewer(True), [session, report_id], outputs, api_name="confirm_report")
    dismiss.click(reviewer(False), [session, report_id], outputs, api_name="dismiss_report")
