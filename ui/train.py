"""Train and Jobs tabs: researchers queue training jobs and watch, cancel or resume them."""

from __future__ import annotations

import html
import math
import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from rlhf.heldout import heldout_markdown
from rlhf.jobs import job_lane, log_path
from rlhf.params import json_object, markdown_table
from rlhf.progress import read_metrics
from rlhf.runner import check_params, get_kind, kind_names
from rlhf.settings import Settings
from storage import jobs as job_rows
from storage import models
from storage.db import Store
from ui.common import require_researcher, row_id

UPLOAD_SUFFIXES = (".txt", ".jsonl")
MAX_UPLOAD_BYTES = 200 * 1024 * 1024
LOG_TAIL_LINES = 40


def kind_help(kind: str) -> str:
    """What a kind does and its parameters (from its Params), for the form."""
    declared = get_kind(kind)
    return f"{declared.help}\n\n{markdown_table(declared.params)}"


def _model_choices(store: Store) -> list[tuple[str, int]]:
    return [(f"#{m.id} {m.name} ({m.kind})", m.id) for m in models.list_models(store.db)]


def job_params(
    kind: str, base: int | None, preset: str, max_steps: float | None, extra: str, corpus: str | None,
    min_annotators: float | None = None,
) -> dict:
    """The job's parameters from the form (check_params validates them)."""
    if kind not in kind_names():
        raise ValueError(f"Choose what to train: {', '.join(kind_names())}.")
    declared = get_kind(kind)
    params = json_object(extra, "Extra parameters", '{"beta": 0.1}')
    params["preset"] = preset
    if base not in (None, "") and declared.needs_base_policy:
        try:
            params["base"] = int(base)
        except (TypeError, ValueError):
            raise ValueError(f"Base must be a model id, got {base!r}.") from None
    if max_steps:
        params[declared.steps_param] = int(max_steps)
    if min_annotators and min_annotators > 1 and declared.learns_from_votes:
        params["min_annotators"] = int(min_annotators)
    if kind == "pretrain" and corpus:
        params.setdefault("corpus", {"file": corpus})
    return params


def save_upload(settings: Settings, upload: str | None) -> str | None:
    """Copy an uploaded corpus into the data dir (the temp copy Gradio made goes away)."""
    if not upload:
        return None
    source = Path(upload)
    if source.suffix.lower() not in UPLOAD_SUFFIXES:
        raise ValueError("Upload a .txt (stories separated by blank lines) or .jsonl (a \"text\" field per line) file.")
    if source.stat().st_size > MAX_UPLOAD_BYTES:
        raise ValueError("The corpus is larger than 200 MB.")
    target = settings.data_dir / "uploads" / f"{int(time.time())}-{source.name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return str(target)


def jobs_html(settings: Settings, store: Store, who: dict | None = None) -> str:
    """The jobs table with each job's lane (a light job runs beside training), progress bar and
    training curve; every text cell escaped. Errors can name server paths, so only researchers
    see them."""
    researcher = bool(who) and who.get("role") in ("researcher", "admin")
    rows = []
    for job in job_rows.list_jobs(store.db, limit=30):
        percent = int(round(100 * (job["progress"] or 0)))
        error = job["error"]
        if error and not researcher:
            error = "(the error is shown to researchers)"
        detail = error or job["message"] or ""
        rows.append(
            f"<tr><td>{job['id']}</td><td>{html.escape(job['kind'])}</td><td>{job_lane(job['kind'])}</td>"
            f"<td>{html.escape(job['status'])}</td>"
            f'<td><progress value="{percent}" max="100"></progress> {percent}%</td>'
            f"<td>{curve_svg(*_curve_points(settings, job))}</td>"
            f"<td>{html.escape(detail[:200])}</td><td>{job['result_model_id'] or ''}</td></tr>"
        )
    head = ("<tr><th>id</th><th>kind</th><th>lane</th><th>status</th><th>progress</th><th>curve</th>"
            "<th>message</th><th>model</th></tr>")
    return f'<table class="jobs">{head}{"".join(rows)}</table>'


def _log_tail(settings: Settings, job_id: int) -> str:
    path = log_path(settings, job_id)
    if not path.exists():
        return "(no log yet)"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])


# The curve worth watching per kind: RLOO's loss hovers near zero, its reward rises.
CURVE = {"rloo": "reward"}
CURVE_WIDTH, CURVE_HEIGHT, CURVE_MAX_POINTS = 160, 36, 200


def _curve_points(settings: Settings, job: dict) -> tuple[str, list[tuple[int, float]]]:
    """The job's curve name and its logged (step, value) points, finite values only."""
    name = CURVE.get(job["kind"], "loss")
    points = [(m["step"], m[name]) for m in read_metrics(settings, job["id"])
              if isinstance(m.get(name), int | float) and math.isfinite(m[name])]
    return name, points


def _curve(settings: Settings, job: dict) -> pd.DataFrame:
    name, points = _curve_points(settings, job)
    return pd.DataFrame([(step, value, name) for step, value in points], columns=["step", "value", "metric"])


def curve_svg(name: str, points: list[tuple[int, float]]) -> str:
    """A small inline line plot of a job's curve for its row of the jobs table (empty without
    two points); its tooltip gives the first and last values. Only numbers reach the SVG."""
    if len(points) < 2:
        return ""
    shown = [*points[:-1:-(-len(points) // CURVE_MAX_POINTS)], points[-1]]
    first_step, low = min(s for s, _ in shown), min(v for _, v in shown)
    step_span = (max(s for s, _ in shown) - first_step) or 1
    value_span = (max(v for _, v in shown) - low) or 1
    line = " ".join(
        f"{(s - first_step) / step_span * CURVE_WIDTH:.1f},{(1 - (v - low) / value_span) * CURVE_HEIGHT:.1f}"
        for s, v in shown
    )
    title = f"{name}: {points[0][1]:.4g} at step {points[0][0]} to {points[-1][1]:.4g} at step {points[-1][0]}"
    return (f'<svg class="curve" width="{CURVE_WIDTH}" height="{CURVE_HEIGHT}" overflow="visible" role="img" '
            f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>'
            f'<polyline points="{line}" fill="none" stroke="currentColor" stroke-width="1.5"/></svg>')


def training_processes_text(settings: Settings) -> str:
    """How training jobs are launched: app settings, shown to researchers read-only."""
    if settings.accelerate_config is None and settings.train_processes == 1:
        how = "one process"
    else:
        processes = (f"{settings.train_processes} processes" if settings.train_processes > 1
                     else "the config's processes")
        config = f", config {html.escape(settings.accelerate_config.name)}" if settings.accelerate_config else ""
        how = f"{processes} through accelerate launch{config}"
    return f"Training jobs run in {how} (app settings --train-processes and --accelerate-config)."


def build_train_tab(settings: Settings, store: Store, session: gr.State):
    gr.Markdown("Researchers only. Jobs run one at a time in the background; the result enters the arena by itself.")
    with gr.Group(visible=False) as tools:
        gr.Markdown(training_processes_text(settings))
        kind = gr.Dropdown(label="Kind", choices=kind_names(), value="reward")
        kind_text = gr.Markdown(kind_help("reward"))
        # Choices are refreshed on page load; a custom value lets API clients and pages opened
        # before a model existed name any id, which check_params then checks.
        base = gr.Dropdown(label="Base policy / model", choices=_model_choices(store), allow_custom_value=True)
        preset = gr.Radio(["quick", "full"], value="quick", label="Budget (quick: under 10 minutes on 2 CPU cores for the starter)")
        max_steps = gr.Number(label="Max steps (empty: from the budget)", precision=0)
        min_annotators = gr.Number(
            label="Data filter for reward, DPO and DPH: only story pairs judged by at least this many annotators",
            value=1, precision=0, minimum=1, maximum=1000,
        )
        extra = gr.Textbox(label="Extra parameters (JSON)", value="{}", max_length=2000,
                           placeholder='e.g. {"loss_type": "ipo", "beta": 0.1} or {"reward_model": 3}')
        corpus = gr.File(label="Corpus for pretrain (.txt or .jsonl)", file_types=list(UPLOAD_SUFFIXES), type="filepath")
        launch = gr.Button("Queue training job", variant="primary")
        launched = gr.Markdown()

    def launch_job(who, kind_value, base_value, preset_value, steps, extra_text, upload, judges):
        who = require_researcher(who)
        try:
            corpus_path = save_upload(settings, upload) if kind_value == "pretrain" else None
            params = job_params(kind_value, base_value, preset_value, steps, extra_text, corpus_path, judges)
            if isinstance(params.get("corpus"), dict) and "file" in params["corpus"]:
                params["corpus"]["file"] = str(settings.data_file(params["corpus"]["file"], "corpus file"))
            check_params(store, kind_value, params)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        try:
            job_id = job_rows.create_job(store.db, kind_value, params, who["id"], max_queued=settings.max_queued_jobs)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return f"Queued job **{job_id}** ({html.escape(kind_value)}). Follow it in the Jobs tab."

    kind.change(lambda k: kind_help(k) if k in kind_names() else "", kind, kind_text, api_visibility="private")
    launch.click(
        launch_job, [session, kind, base, preset, max_steps, extra, corpus, min_annotators], launched, api_name="train",
    )
    return (lambda: gr.Dropdown(choices=_model_choices(store))), base, tools


def build_jobs_tab(settings: Settings, store: Store, session: gr.State):
    table = gr.HTML(elem_id="jobs-table")
    with gr.Row():
        job_id = gr.Number(label="Job id", precision=0)
        show = gr.Button("Show log and loss")
    heldout = gr.Markdown(elem_id="job-heldout")
    with gr.Group(visible=False) as tools:
        with gr.Row():
            cancel = gr.Button("Cancel job", variant="stop")
            resume = gr.Button("Resume job")
        action = gr.Markdown()
    loss = gr.LinePlot(x="step", y="value", color="metric", label="Training curve (loss; reward for RLOO)")
    log = gr.Code(label="Log (last lines)", language=None)
    timer = gr.Timer(3.0)

    def details(who, job):
        """Logs can hold tracebacks with server paths: researchers only."""
        require_researcher(who)
        if job is None:
            return gr.skip(), gr.skip(), gr.skip()
        job = row_id(job, "Job id")
        try:
            row = job_rows.get_job(store.db, job)
        except LookupError as exc:
            raise gr.Error(str(exc)) from exc
        held_out = heldout_markdown((row["metrics"] or {}).get("heldout"))
        return _curve(settings, row), _log_tail(settings, job), held_out

    def cancel_job(who, job):
        require_researcher(who)
        job = row_id(job, "Job id")
        try:
            status = job_rows.request_cancel(store.db, job)
        except LookupError as exc:
            raise gr.Error(f"No job {job}.") from exc
        return jobs_html(settings, store, who), f"Job {job}: {status}."

    def resume_job(who, job):
        require_researcher(who)
        job = row_id(job, "Job id")
        try:
            job_rows.requeue(store.db, job)
        except (LookupError, ValueError) as exc:
            raise gr.Error(str(exc)) from exc
        return jobs_html(settings, store, who), f"Job {job} queued again; it resumes from its last checkpoint."

    show.click(details, [session, job_id], [loss, log, heldout], api_name="job_details")
    cancel.click(cancel_job, [session, job_id], [table, action], api_name="cancel_job")
    resume.click(resume_job, [session, job_id], [table, action], api_name="resume_job")
    timer.tick(lambda who: jobs_html(settings, store, who), session, table, api_visibility="private",
               show_progress="hidden")
    return (lambda who: jobs_html(settings, store, who)), table, tools
