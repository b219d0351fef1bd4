"""Metrics tab: every policy's automatic metrics, reward scores and rubric ratings with 95%
intervals, and a policy beside its parent (did RLOO / DPO / DPH move a metric, which way)."""

from __future__ import annotations

import html
import math

import gradio as gr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf.metrics import (
    PolicyMetrics,
    Summary,
    measure_new_stories,
    metric_info,
    metric_keys,
    parent_comparison,
    policy_table,
)
from storage.db import Store

PLOT_COLUMNS = 4
EXPLANATION = (
    "Means over each policy's stories with 95% t intervals (`mean [low, high]`). Automatic metrics are "
    "computed as stories are written (*cut*: the share of stories that hit the token budget and lost "
    "their unfinished last sentence); *score by ...* are reward-model (or DPH-head) scores; *rated ...* are "
    "the optional 1-5 ratings annotators give after a vote; perplexity is measured on the corpus set with "
    "`--metrics-corpus` (absent when none is set). Hover a heading for its definition."
)


def _cell(summary: Summary | None, digits: int) -> str:
    if summary is None:
        return ""
    text = f"{summary.mean:.{digits}f}"
    if summary.low is not None:
        text += f" [{summary.low:.{digits}f}, {summary.high:.{digits}f}]"
    return html.escape(text)


def table_html(rows: list[PolicyMetrics]) -> str:
    """The per-policy table as escaped HTML: names and reward-model names are untrusted."""
    if not rows:
        return "<p>No policy has stories yet.</p>"
    keys = metric_keys(rows)
    infos = {k: metric_info(k) for k in keys}
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("policy", "kind", "parent", "stories"))
    head += "".join(f'<th title="{html.escape(infos[k].description)}">{html.escape(infos[k].label)}</th>' for k in keys)
    body = []
    for row in rows:
        cells = [html.escape(row.name), html.escape(row.kind), html.escape(row.parent), str(row.stories)]
        cells += [_cell(row.metrics.get(k), infos[k].digits) for k in keys]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<table class="jobs metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def comparison_figure(points: list[dict]) -> Figure:
    """One small panel per metric: the parent's and the policy's mean with interval bars."""
    metrics = list(dict.fromkeys(p["metric"] for p in points))
    columns = min(PLOT_COLUMNS, max(1, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / columns))
    fig = Figure(figsize=(3.2 * columns, 2.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    if not metrics:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "Pick a policy with a parent (both with stories)", ha="center", va="center")
        ax.set_axis_off()
        return fig
    for index, metric in enumerate(metrics, start=1):
        ax = fig.add_subplot(rows, columns, index)
        pair = [p for p in points if p["metric"] == metric]
        means = [p["mean"] for p in pair]
        errors = [[p["mean"] - p["low"] if p["low"] is not None else 0 for p in pair],
                  [p["high"] - p["mean"] if p["high"] is not None else 0 for p in pair]]
        ax.bar([p["role"] for p in pair], means, yerr=errors, capsize=4, color=["#9e9e9e", "#1f77b4"])
        better = metric_info(metric).higher_is_better
        hint = "" if better is None else (" (higher better)" if better else " (lower better)")
        ax.set_title(pair[0]["label"] + hint, fontsize=9)
        ax.tick_params(labelsize=8)
    return fig


def build_metrics_tab(store: Store) -> tuple:
    gr.Markdown(EXPLANATION)
    table = gr.HTML(elem_id="metrics-table")
    picker = gr.Dropdown(label="Policy to compare with its parent", choices=[], elem_id="metrics-policy")
    plot = gr.Plot(label="Parent (grey) and policy (blue): mean and 95% interval")
    refresh = gr.Button("Refresh", size="sm", elem_id="metrics-refresh")

    def load(selected=None):
        measure_new_stories(store)  # stories written before metrics existed, or by hand
        rows = policy_table(store)
        children = [(f"{r.name} (parent {r.parent})", r.model_id) for r in rows if r.parent]
        ids = [value for _, value in children]
        chosen = selected if selected in ids else (ids[-1] if ids else None)
        figure = comparison_figure(parent_comparison(rows, chosen) if chosen is not None else [])
        return table_html(rows), gr.Dropdown(choices=children, value=chosen), figure

    def compare(selected):
        return comparison_figure(parent_comparison(policy_table(store), selected) if selected is not None else [])

    refresh.click(load, picker, [table, picker, plot], api_name="metrics")
    picker.input(compare, picker, plot, api_visibility="private")
    return load, [table, picker, plot]
