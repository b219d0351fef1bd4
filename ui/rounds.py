"""Rounds tab: the loop that runs itself (rlhf.rounds). Everyone sees the rounds and the
champion's strength over them; researchers set the recipe, start and cancel rounds."""

from __future__ import annotations

import html
import json
import time

import gradio as gr
import matplotlib.pyplot as plt

from rlhf import rounds
from rlhf.params import documented_fields
from rlhf.settings import Settings
from storage import rounds as round_rows
from storage.db import Store
from ui.common import require_researcher, row_id
from ui.train import field_input, model_choices, param_value

RECIPE_FIELDS = documented_fields(rounds.RoundRecipe)
MODEL_FIELDS = {"starting_policy": "base policy"}
REFRESH_S = 3.0


def recipe_input(f, store: Store) -> gr.components.Component:
    """The form input of one recipe field (steps: a multi-choice of the policy kinds)."""
    if f.name == "steps":
        return gr.Dropdown(list(rounds.POLICY_STEPS), value=list(f.default), multiselect=True, label="steps",
                           info=f.metadata["help"])
    return field_input(MODEL_FIELDS, f, store)


def recipe_values(form_values: list) -> dict:
    """The recipe the form's raw values give (fields left at their defaults are left out)."""
    given = {f.name: param_value(f, value) for f, value in zip(RECIPE_FIELDS, form_values, strict=True)}
    return {name: value for name, value in given.items() if value is not None}


def form_value(f, value):
    """A stored recipe value as its form input shows it."""
    if f.name == "steps":
        return list(value)
    if f.name in MODEL_FIELDS or isinstance(value, int | float) and f.default is not None:
        return value
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, dict) else str(value)


def recipe_markdown(store: Store) -> str:
    stored = round_rows.get_recipe(store.db)
    if stored is None:
        return "No recipe yet: rounds start only once a researcher sets one."
    recipe = rounds.RoundRecipe.from_dict(stored["recipe"])
    who = stored["set_by_name"] or "the command line"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stored["set_at"]))
    return (f"**Recipe v{stored['version']}** (set by {html.escape(who)}, {when}): rounds start "
            f"{html.escape(recipe.trigger)}; steps reward then {html.escape(', '.join(recipe.steps))}; a child is "
            f"judged after {recipe.min_votes} votes against its parent (retired at {recipe.vote_cap} unless its "
            f"interval clears 0.5). Champion now: #{rounds.champion(store, recipe)}.")


def _interval(value: float | None, ci: list | None) -> str:
    return "" if value is None else f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def rounds_html(store: Store, who: dict | None = None) -> str:
    """The rounds table, newest first, every text cell escaped. A failed step's error can
    name server paths, so only researchers see the reason of a failed round."""
    researcher = bool(who) and who.get("role") in ("researcher", "admin")
    rows = []
    for r in reversed(rounds.rounds_report(store)):
        children = "<br>".join(
            f"{html.escape(c['name'])}: {_interval(c['win_rate'], c['ci95'])} over {c['votes']} votes, "
            f"{html.escape(c['decision'])}" for c in r["children"])
        reward = r["reward_model"]
        if reward and reward["heldout_accuracy"] is not None:
            best = reward["best_baseline"] or {}
            accuracy = _interval(reward["heldout_accuracy"], reward["ci95"])
            reward_cell = (f"{html.escape(reward['name'] or '')}: {accuracy}"
                           f" on {reward['heldout_prompts']} held-out prompts; best baseline "
                           f"{html.escape(str(best.get('name', '')))} {best.get('accuracy', 0):.2f}")
        else:
            reward_cell = html.escape(reward["name"] or "") + " (no held-out pairs)" if reward else ""
        votes = f"{r['votes_used']} ({html.escape(r['votes_hash'] or '')})" if r["votes_used"] is not None else ""
        jobs = ", ".join(f"{html.escape(j['step'])} #{j['job_id']} {html.escape(j['status'])}" for j in r["jobs"])
        reason = r["reason"] or ""
        if r["status"] == "failed" and not researcher:
            reason = "(the error is shown to researchers)"
        rows.append(
            f"<tr><td>{r['id']}</td><td>{html.escape(r['status'])}<br><small>{html.escape(r['trigger'])}</small></td>"
            f"<td>{html.escape(r['parent']['name'] or '')}</td><td>{jobs}</td><td>{votes}</td><td>{reward_cell}</td>"
            f"<td>{children}</td><td>{html.escape(reason)}</td></tr>")
    head = ("<tr><th>round</th><th>status</th><th>parent</th><th>steps</th><th>votes used (hash)</th>"
            "<th>reward model: held-out accuracy</th><th>children: win rate vs parent</th><th>decision</th></tr>")
    return f'<table class="jobs">{head}{"".join(rows)}</table>'


def champion_plot(store: Store):
    figure = rounds.champion_figure(rounds.champion_history(store))
    plt.close(figure)
    return figure


def build_rounds_tab(settings: Settings, store: Store, session: gr.State):
    gr.Markdown(
        "A round trains a reward model on the votes so far, then the recipe's policy kinds from the champion "
        "with it; the children meet their parent in the arena. A child is promoted (the new champion) when the "
        "95% interval of its win rate against its parent, from human votes (ties half), lies above 0.5 after "
        "the recipe's minimum votes; otherwise it is retired from the arena at the vote cap. Steps are ordinary "
        "jobs (Jobs tab); a failed step ends the round with nothing promoted.")
    recipe_md = gr.Markdown(elem_id="round-recipe")
    with gr.Group(visible=False) as tools:
        with gr.Row():
            inputs = [recipe_input(f, store) for f in RECIPE_FIELDS]
        with gr.Row():
            save = gr.Button("Save recipe", variant="primary", elem_id="round-save")
            start = gr.Button("Start a round now", elem_id="round-start")
            round_id = gr.Number(label="Round id", precision=0)
            cancel = gr.Button("Cancel round", variant="stop")
        action = gr.Markdown(elem_id="round-action")
    table = gr.HTML(elem_id="rounds-table")
    plot = gr.Plot(label="Champion strength over rounds")
    timer = gr.Timer(REFRESH_S)

    def set_recipe(who, *values):
        """Replace the round recipe (researchers only); unset fields take their defaults."""
        who = require_researcher(who)
        try:
            stored = rounds.set_recipe(store, recipe_values(list(values)), who["id"])
        except (ValueError, LookupError) as exc:
            raise gr.Error(str(exc)) from exc
        return recipe_markdown(store), f"Recipe v{stored['version']} saved."

    def start_now(who):
        """Start a round now with the recipe (researchers only)."""
        who = require_researcher(who)
        try:
            started = rounds.start_round(store, created_by=who["id"])
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        rounds.tick(store)
        return rounds_html(store, who), f"Round {started['id']} started."

    def cancel_now(who, value):
        who = require_researcher(who)
        try:
            cancelled = rounds.cancel_round(store, row_id(value, "Round id"))
        except (ValueError, LookupError) as exc:
            raise gr.Error(str(exc)) from exc
        return rounds_html(store, who), f"Round {cancelled['id']} cancelled."

    def load(who):
        """The table, the plot, the recipe, and the form filled with the recipe as it is."""
        stored = round_rows.get_recipe(store.db)
        values = stored["recipe"] if stored else {}
        filled = [gr.update(value=form_value(f, values.get(f.name, f.default))) for f in RECIPE_FIELDS]
        filled[[f.name for f in RECIPE_FIELDS].index("starting_policy")] = gr.Dropdown(
            choices=model_choices(store, "base policy"), value=values.get("starting_policy"))
        return rounds_html(store, who), champion_plot(store), recipe_markdown(store), *filled

    save.click(set_recipe, [session, *inputs], [recipe_md, action], api_name="set_round_recipe")
    start.click(start_now, session, [table, action], api_name="start_round")
    cancel.click(cancel_now, [session, round_id], [table, action], api_name="cancel_round")
    timer.tick(lambda who: rounds_html(store, who), session, table, api_visibility="private", show_progress="hidden")
    return load, [table, plot, recipe_md, *inputs], tools
