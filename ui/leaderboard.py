"""Leaderboard tab: Bradley-Terry scores with intervals and the win-rate heatmap."""

from __future__ import annotations

import threading

import gradio as gr
import matplotlib.pyplot as plt
import pandas as pd

from rlhf.leaderboard import standings, win_rates
from rlhf.ranking import PRELIMINARY_VOTES, heatmap_figure
from storage import models, quality, votes
from storage.db import Store

COLUMNS = ["rank", "policy", "score", "ci_low", "ci_high", "preliminary", "votes", "wins", "losses", "ties", "both_bad",
           "kind", "parent"]
REFRESH_S = 10.0


class _Cached:
    """Recompute only when the votes or the policy list changed: many viewers, one fit."""

    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()
        self._key = None
        self._value = None

    def get(self):
        db = self.store.db
        key = (votes.human_vote_total(db), tuple((m.id, m.active) for m in models.list_models(db)),
               quality.excluded_annotator_ids(db))
        with self._lock:
            if key != self._key:
                rows = [{**row, "preliminary": "yes" if row["preliminary"] else ""} for row in standings(self.store)]
                table = pd.DataFrame(rows, columns=COLUMNS).round({"score": 1, "ci_low": 1, "ci_high": 1})
                matrix, labels = win_rates(self.store)
                figure = heatmap_figure(matrix, labels)
                plt.close(figure)
                self._key, self._value = key, (table, figure, f"Human votes: **{key[0]}**")
            return self._value


def build_leaderboard_tab(store: Store) -> gr.Tab:
    cached = _Cached(store)
    gr.Markdown(
        "Scores are Bradley-Terry ratings on an Elo-like scale (mean 1000) fitted to human votes; "
        "ties count as half a win for each side, *both bad* votes are kept out of the fit and counted "
        "separately. Intervals are 95% posterior intervals of the fit (wide until votes narrow them); "
        f"a policy with fewer than {PRELIMINARY_VOTES} votes in the fit is marked *preliminary*: its rank may "
        "still change a lot."
    )
    summary = gr.Markdown()
    table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="leaderboard-table")
    heatmap = gr.Plot(label="Win rate of the row policy against the column policy")
    refresh = gr.Button("Refresh", size="sm")
    timer = gr.Timer(REFRESH_S)

    def load():
        table_value, figure, text = cached.get()
        return text, table_value, figure

    refresh.click(load, None, [summary, table, heatmap], api_name="leaderboard")
    timer.tick(load, None, [summary, table, heatmap], api_visibility="private", show_progress="hidden")
    return load, [summary, table, heatmap]
