"""Rounds: the loop runs itself. Votes arrive, a reward model is trained on them, the
champion's children are trained with it, they meet the champion in the arena, and the
better one carries on.

A researcher sets one `RoundRecipe` (the Rounds tab, or `python -m rlhf rounds set`):
when a round starts (every N new decided human votes since the last round started, on
a schedule, or on demand), its steps (a `reward` job on the votes so far, then one job
per policy kind, each from the champion with that reward model) and the acceptance rule.

A round is a small state machine kept in SQLite (storage.rounds):

    queued -> training -> collecting -> decided | failed | cancelled

- training: its steps are ordinary jobs, queued one after the other through the job
  queue (so they show in the Jobs tab, run in the heavy lane one at a time and can be
  cancelled there). A step that fails, is cancelled or is interrupted (the app stopped)
  ends the round as failed, with nothing promoted; the children of earlier steps stay in
  the arena as ordinary policies.
- collecting: the children are in the arena (the runner queued their story pools, and
  pair selection favours child-vs-parent pairs: rlhf.pairing). Each child is judged on
  the human votes between it and its parent: its win rate (ties count half, both-bad
  votes left out) with a 95% interval over prompts (rlhf.heldout.rate_interval, never
  zero-width). Once it has `min_votes`, it is promoted when the interval lies above 0.5;
  otherwise, when it reaches `max_votes` (default `min_votes`), it is retired (made
  inactive: it leaves the arena, its votes stay). Among several promoted children the one
  with the highest lower bound becomes the champion; the others stay in the arena.
- The champion is the recipe's starting policy (default: the first starter policy) until
  a round promotes a child; then the newest promoted child.

`tick(store)` advances the active round one state, or starts one when the trigger fires;
the job worker calls it on every pass. It is idempotent and restart-safe: the state is in
the database, and every transition is a compare-and-set on the state it was read in, so a
restarted worker resumes where the last one stopped and a round is never decided twice.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rlhf.heldout import rate_interval
from rlhf.params import MODEL_ID_RANGE, JobParams, param
from storage import jobs as job_rows
from storage import models
from storage import rounds as round_rows
from storage.db import Store

POLICY_STEPS = ("raft", "rloo", "dpo", "dph")
REWARD_STEP = "reward"
# Set by the round for each step, never by the recipe: the champion and this round's reward model.
ROUND_PARAMS = ("base", "reward_model")
FAILED_JOB = ("failed", "cancelled", "interrupted")


@dataclass(frozen=True)
class RoundRecipe(JobParams):
    """When a round starts, what it trains and when a child is promoted."""

    LABEL: ClassVar[str] = "round recipe"

    every_votes: int | None = param(None, "start a round after this many new decided human votes since the last "
                                    "round started (unset: no vote trigger)", low=1, high=10_000_000)
    schedule_minutes: float | None = param(None, "start a round this many minutes after the last one started "
                                           "(unset: no schedule)", low=0.0, high=525_600.0, low_open=True)
    steps: tuple[str, ...] = param(("raft",), "policy kinds trained from the champion with the round's reward "
                                   f"model, in order (any of {', '.join(POLICY_STEPS)})")
    step_params: dict | None = param(None, 'parameters per step, e.g. {"reward": {"max_steps": 20}, "raft": '
                                     '{"k": 4}}; base and reward_model are the round\'s')
    min_votes: int = param(50, "human votes a child needs against its parent before it is judged", low=1,
                           high=100_000)
    max_votes: int | None = param(None, "votes after which a child whose interval does not clear 0.5 is retired "
                                  "(unset: min_votes)", low=1, high=1_000_000)
    starting_policy: int | None = param(None, "the first champion (unset: the first starter policy)", low=1,
                                        high=MODEL_ID_RANGE[1])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.every_votes is not None and self.schedule_minutes is not None:
            raise ValueError("schedule_minutes: choose one trigger, every_votes or schedule_minutes (or neither: "
                             "on demand only).")
        if isinstance(self.steps, str) or not self.steps or any(s not in POLICY_STEPS for s in self.steps):
            raise ValueError(f"steps must be a list of one or more of {', '.join(POLICY_STEPS)}, got {self.steps!r}.")
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"steps: each kind at most once, got {', '.join(self.steps)}.")
        if self.max_votes is not None and self.max_votes < self.min_votes:
            raise ValueError(f"max_votes must be at least min_votes ({self.min_votes}), got {self.max_votes}.")
        self._check_step_params()

    def _check_step_params(self) -> None:
        """Each step's parameters are checked by its kind's Params (with placeholder model ids)."""
        from rlhf.runner import get_kind

        given = self.step_params or {}
        if not isinstance(given, Mapping):
            raise ValueError(f"step_params must be a JSON object of step -> parameters, got {given!r}.")
        for step, params in given.items():
            if step not in (REWARD_STEP, *self.steps):
                raise ValueError(f"step_params.{step}: not a step of this recipe ({REWARD_STEP}, "
                                 f"{', '.join(self.steps)}).")
            if not isinstance(params, Mapping):
                raise ValueError(f"step_params.{step} must be a JSON object, got {params!r}.")
            for name in ROUND_PARAMS:
                if name in params:
                    raise ValueError(f"step_params.{step}.{name}: set by the round (the champion and its reward "
                                     "model), leave it out.")
            try:
                get_kind(step).params.from_dict(step_job_params(step, params, 1, 1))
            except ValueError as exc:
                raise ValueError(f"step_params.{step}: {exc}") from None

    @classmethod
    def from_dict(cls, values: Mapping | None) -> RoundRecipe:
        """As every kind's; steps given as a JSON list are kept as a tuple."""
        if isinstance(values, Mapping) and isinstance(values.get("steps"), list):
            values = {**values, "steps": tuple(values["steps"])}
        return super().from_dict(values)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "steps": list(self.steps)}

    @property
    def vote_cap(self) -> int:
        return self.max_votes or self.min_votes

    @property
    def trigger(self) -> str:
        if self.every_votes is not None:
            return f"every {self.every_votes} new decided votes"
        if self.schedule_minutes is not None:
            return f"every {self.schedule_minutes:g} minutes"
        return "on demand"


def step_job_params(kind: str, params: Mapping | None, base: int, reward_model: int | None) -> dict:
    """A step's job parameters: the recipe's, plus the champion as base and, for kinds that
    take one, the round's reward model."""
    from rlhf.runner import get_kind

    job = {**(params or {}), "base": base}
    if "reward_model" in get_kind(kind).model_params:
        job["reward_model"] = reward_model
    return job


def set_recipe(store: Store, values: Mapping | None, set_by: int | None = None) -> dict:
    """Validate and store the recipe (it replaces the last one: unset fields take defaults)."""
    recipe = RoundRecipe.from_dict(values)
    if recipe.starting_policy is not None:
        from rlhf.training import chosen_model

        chosen_model(store, recipe.starting_policy, "starting_policy")
    return round_rows.set_recipe(store.db, recipe.to_dict(), set_by)


def current_recipe(store: Store) -> RoundRecipe | None:
    stored = round_rows.get_recipe(store.db)
    return RoundRecipe.from_dict(stored["recipe"]) if stored else None


def champion(store: Store, recipe: RoundRecipe | None = None) -> int:
    """The newest promoted child, else the recipe's starting policy, else the first starter."""
    promoted = round_rows.last_promoted(store.db)
    if promoted is not None:
        return promoted
    recipe = recipe or current_recipe(store)
    if recipe is not None and recipe.starting_policy is not None:
        return recipe.starting_policy
    starters = [m.id for m in models.list_models(store.db) if m.kind == "starter"]
    if not starters:
        raise ValueError("No champion yet: prepare the starter policies first (python -m rlhf init).")
    return starters[0]


def start_round(store: Store, trigger: str = "on demand", created_by: int | None = None) -> dict:
    """Queue a round now with the current recipe (one at a time); tick queues its first step."""
    stored = round_rows.get_recipe(store.db)
    if stored is None:
        raise ValueError("Set a round recipe first (Rounds tab, or python -m rlhf rounds set).")
    recipe = RoundRecipe.from_dict(stored["recipe"])
    _, newest = round_rows.decided_votes_after(store.db, 0)
    round_id = round_rows.create_round(store.db, trigger=trigger, recipe=recipe.to_dict(),
                                       parent_id=champion(store, recipe), votes_after=newest,
                                       created_by=created_by if created_by is not None else stored["set_by"])
    if round_id is None:
        raise ValueError(f"Round {round_rows.active_round(store.db)['id']} is still running: one round at a time.")
    return round_rows.get_round(store.db, round_id)


def cancel_round(store: Store, round_id: int) -> dict:
    """End an active round as cancelled (its running step job is cancelled too); nothing is
    promoted, and children already in the arena stay there as ordinary policies."""
    current = round_rows.get_round(store.db, round_id)
    if current["status"] not in round_rows.ACTIVE:
        raise ValueError(f"Round {round_id} is {current['status']}; only a queued, training or collecting "
                         "round can be cancelled.")
    if not round_rows.advance(store.db, round_id, current["status"], status="cancelled",
                              reason="cancelled by a researcher"):
        raise ValueError(f"Round {round_id} moved on while cancelling it; look again.")
    for job_id in current["job_ids"]:
        if job_rows.get_job(store.db, job_id)["status"] in job_rows.ACTIVE:
            job_rows.request_cancel(store.db, job_id)
    return round_rows.get_round(store.db, round_id)


def trigger_fired(store: Store, recipe: RoundRecipe) -> str | None:
    """Why a round should start now, or None."""
    last, stored = round_rows.last_round(store.db), round_rows.get_recipe(store.db)
    if recipe.every_votes is not None:
        new_votes, _ = round_rows.decided_votes_after(store.db, last["votes_after"] if last else 0)
        return f"{new_votes} new votes" if new_votes >= recipe.every_votes else None
    if recipe.schedule_minutes is not None:
        since = last["created_at"] if last else stored["set_at"]
        return "schedule" if time.time() - since >= recipe.schedule_minutes * 60 else None
    return None


def tick(store: Store) -> dict | None:
    """Advance the active round by what has happened, or start one when the trigger fires;
    the active round afterwards (None when there is none)."""
    active = round_rows.active_round(store.db)
    if active is None:
        recipe = current_recipe(store)
        reason = trigger_fired(store, recipe) if recipe is not None else None
        if reason is None:
            return None
        active = start_round(store, trigger=reason)
    _advance(store, active)
    return round_rows.active_round(store.db)


def _advance(store: Store, current: dict) -> None:
    db, recipe = store.db, RoundRecipe.from_dict(current["recipe"])
    steps = [REWARD_STEP, *recipe.steps]
    params = recipe.step_params or {}
    if current["status"] == "queued":
        round_rows.queue_step(db, current["id"], 0, REWARD_STEP,
                              step_job_params(REWARD_STEP, params.get(REWARD_STEP), current["parent_id"], None))
        return
    if current["status"] == "collecting":
        _judge(store, current, recipe)
        return
    done = len(current["job_ids"])
    job = job_rows.get_job(db, current["job_ids"][-1])
    if job["status"] in job_rows.ACTIVE:
        return
    step = steps[done - 1]
    if job["status"] in FAILED_JOB:
        round_rows.advance(db, current["id"], "training", status="failed", decision="failed",
                           reason=f"the {step} step (job {job['id']}) {job['status']}"
                                  + (f": {job['error']}" if job["error"] else ""))
        return
    found: dict = {}
    if step == REWARD_STEP:
        snapshot = job["metrics"] or {}
        found = {"reward_model_id": job["result_model_id"], "votes_used": snapshot.get("votes_used"),
                 "votes_hash": snapshot.get("data_hash")}
    else:
        made = [i for i in job["result_model_ids"] or [] if models.get_model(db, i).kind != "reward"]
        if not made:
            round_rows.advance(db, current["id"], "training", status="failed", decision="failed",
                               reason=f"the {step} step (job {job['id']}) registered no policy")
            return
        found = {"child_ids": [*current["child_ids"], *made]}
    if done < len(steps):
        reward_model = found.get("reward_model_id", current["reward_model_id"])
        round_rows.queue_step(db, current["id"], done, steps[done],
                              step_job_params(steps[done], params.get(steps[done]), current["parent_id"],
                                              reward_model), **found)
    else:
        round_rows.advance(db, current["id"], "training", status="collecting", **found)


def child_record(store: Store, child: int, parent: int, recipe: RoundRecipe) -> dict:
    """A child's human votes against its parent, win rate, 95% interval and decision so far
    (promoted, retired, or collecting)."""
    votes = round_rows.head_to_head(store.db, child, parent)
    record = {"votes": len(votes), "wins": sum(v["outcome"] == 1.0 for v in votes),
              "losses": sum(v["outcome"] == 0.0 for v in votes), "ties": sum(v["outcome"] == 0.5 for v in votes),
              "win_rate": None, "ci95": None, "decision": "collecting"}
    if votes:
        outcomes = np.array([v["outcome"] for v in votes])
        low, high = rate_interval(outcomes, [v["prompt_id"] for v in votes])
        record.update(win_rate=round(float(outcomes.mean()), 3), ci95=[round(low, 3), round(high, 3)])
        if len(votes) >= recipe.min_votes and low > 0.5:
            record["decision"] = "promoted"
        elif len(votes) >= recipe.vote_cap:
            record["decision"] = "retired"
    if record["decision"] == "collecting" and not models.get_model(store.db, child).active:
        record["decision"] = "retired"  # taken out of the arena by hand: it gets no more votes
    return record


def _judge(store: Store, current: dict, recipe: RoundRecipe) -> None:
    """Decide the round once every child is decided: promote the best, retire the losers."""
    records = {child: child_record(store, child, current["parent_id"], recipe) for child in current["child_ids"]}
    if any(r["decision"] == "collecting" for r in records.values()):
        return
    promoted = [c for c, r in records.items() if r["decision"] == "promoted"]
    best = max(promoted, key=lambda c: records[c]["ci95"][0]) if promoted else None
    for child in promoted:
        if child != best:
            records[child]["decision"] = "kept"
    names = {c: models.get_model(store.db, c).name for c in records}
    parent = models.get_model(store.db, current["parent_id"]).name
    summary = "; ".join(f"{names[c]} {r['win_rate']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] over {r['votes']} "
                        f"votes: {r['decision']}" if r["ci95"] else f"{names[c]}: {r['decision']} (no votes)"
                        for c, r in records.items())
    reason = (f"{names[best]} beat {parent} (interval above 0.5) and is the champion. {summary}" if best
              else f"No child beat {parent}; it stays the champion. {summary}")
    round_rows.decide(store.db, current["id"], retire=[c for c, r in records.items() if r["decision"] == "retired"],
                      results={str(c): r for c, r in records.items()}, promoted_id=best,
                      decision="promoted" if best else "retired", reason=reason)


def rounds_report(store: Store) -> list[dict]:
    """Every round as the Rounds tab and `rounds list` show it: parent, step jobs, the
    reward model's held-out accuracy beside its best baseline, the votes it used (count and
    hash), each child's win rate against the parent with its interval and votes (live while
    collecting), and the decision."""
    db = store.db
    names = {m.id: m.name for m in models.list_models(db)}
    report = []
    for row in round_rows.list_rounds(db):
        recipe = RoundRecipe.from_dict(row["recipe"])
        steps = [REWARD_STEP, *recipe.steps]
        children = []
        for child in row["child_ids"]:
            judged = row["results"].get(str(child)) or child_record(store, child, row["parent_id"], recipe)
            children.append({"id": child, "name": names.get(child, f"#{child}"), **judged})
        reward = None
        if row["reward_model_id"] is not None:
            heldout = models.get_model(db, row["reward_model_id"]).metrics.get("heldout") or {}
            reward = {"id": row["reward_model_id"], "name": names.get(row["reward_model_id"]),
                      "heldout_accuracy": heldout.get("accuracy"), "ci95": heldout.get("ci95"),
                      "heldout_prompts": heldout.get("prompts"), "best_baseline": heldout.get("best_baseline"),
                      "verdict": heldout.get("verdict")}
        report.append({
            "id": row["id"], "status": row["status"], "trigger": row["trigger"],
            "parent": {"id": row["parent_id"], "name": names.get(row["parent_id"])},
            "jobs": [{"step": step, "job_id": job_id, "status": job_rows.get_job(db, job_id)["status"]}
                     for step, job_id in zip(steps, row["job_ids"])],
            "reward_model": reward, "votes_used": row["votes_used"], "votes_hash": row["votes_hash"],
            "children": children, "decision": row["decision"], "reason": row["reason"],
            "promoted": ({"id": row["promoted_id"], "name": names.get(row["promoted_id"])}
                         if row["promoted_id"] else None),
            "recipe": row["recipe"], "created_at": row["created_at"], "finished_at": row["finished_at"],
        })
    return report


def champion_history(store: Store) -> list[dict]:
    """The champion before the first round and after each decided round, with its
    Bradley-Terry score and 95% interval as the leaderboard has them now."""
    from rlhf.leaderboard import standings

    decided = [r for r in round_rows.list_rounds(store.db) if r["status"] == "decided"]
    if not decided:
        return []
    by_id = {s["model_id"]: s for s in standings(store)}
    points = [(0, decided[0]["parent_id"])] + [(r["id"], r["promoted_id"] or r["parent_id"]) for r in decided]
    return [{"after_round": after, "champion": by_id[m]["policy"], "model_id": m, "score": round(by_id[m]["score"], 1),
             "ci_low": round(by_id[m]["ci_low"], 1), "ci_high": round(by_id[m]["ci_high"], 1),
             "votes": by_id[m]["votes"], "preliminary": by_id[m]["preliminary"]} for after, m in points]


def champion_figure(history: list[dict]):
    """The champion's Bradley-Terry score over rounds with its 95% interval (bare Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if not history:
        ax.text(0.5, 0.5, "No decided round yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    x = np.arange(len(history))
    scores = np.array([p["score"] for p in history])
    errors = np.array([[p["score"] - p["ci_low"] for p in history], [p["ci_high"] - p["score"] for p in history]])
    ax.errorbar(x, scores, yerr=errors, fmt="o-", capsize=4)
    ax.set_xticks(x, ["start" if p["after_round"] == 0 else f"round {p['after_round']}" for p in history])
    for i, p in enumerate(history):
        ax.annotate(p["champion"], (i, p["score"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_ylabel("Bradley-Terry score")
    ax.set_title("The champion after each round (95% interval)")
    return fig
