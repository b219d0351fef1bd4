"""Train and Jobs tabs: researchers queue training jobs and watch, cancel or resume them."""

from __future__ import annotations

import html
import json
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from rlhf.heldout import heldout_markdown
from rlhf.jobs import job_lane, log_path
from rlhf.params import allowed_values, documented_fields, json_object
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


# The choice that leaves an optional choice (or true/false) field unset: the kind's default.
UNSET = "(default)"
CORPUS_FIELD = "corpus"  # a kind with this parameter gets the corpus upload


@dataclass(frozen=True)
class FormField:
    """One parameter of one kind and the form input that edits it."""

    kind: str
    field: Field
    input: gr.components.Component


def field_type(f: Field) -> tuple[str, bool]:
    """A Params field's type without None ("int", "float", "bool", "str", "dict", ...) and
    whether it may be None (unset)."""
    parts = [part.strip() for part in str(f.type).split("|")]
    return next((part for part in parts if part != "None"), "None"), "None" in parts


def model_choices(store: Store, what: str) -> list[tuple[str, int]]:
    """The stored models a model parameter may name: reward models for a "reward model",
    story policies otherwise (the rule check_params applies)."""
    reward = what == "reward model"
    return [(f"#{m.id} {m.name} ({m.kind})", m.id) for m in models.list_models(store.db)
            if (m.kind == "reward") == reward]


def field_input(model_params: Mapping[str, str], f: Field, store: Store) -> gr.components.Component:
    """The input for one Params field, from its metadata: a model dropdown for model ids
    (the fields named in model_params, e.g. a kind's: param -> "base policy"), a
    dropdown for choices (and optional true/false), a checkbox for true/false, a number with
    the field's range and default, text for the rest (JSON where the value is not a string,
    and numbers without a default: Gradio's number box cannot be empty). An input left at
    its default is not sent, so the kind's preset decides it."""
    meta, (base_type, optional) = f.metadata, field_type(f)
    default = None if f.default is MISSING else f.default
    info = f"{meta['help']} ({allowed_values(f)})"
    if f.name in model_params:
        what = model_params[f.name]
        return gr.Dropdown(model_choices(store, what), value=None, label=f"{f.name}: {what}", info=info)
    if meta["choices"] is not None or (base_type == "bool" and optional):
        options = list(meta["choices"] or ("true", "false"))
        shown = default if default is None or isinstance(default, str) else json.dumps(default)
        if optional:
            options, shown = [UNSET, *options], shown or UNSET
        return gr.Dropdown(options, value=shown, label=f.name, info=info)
    if base_type == "bool":
        return gr.Checkbox(value=bool(default), label=f.name, info=info)
    if base_type in ("int", "float") and default is not None:
        return gr.Number(value=default, label=f.name, info=info, minimum=meta["low"], maximum=meta["high"],
                         precision=0 if base_type == "int" else None)
    placeholder = ("required" if f.default is MISSING else "empty: unset" if default is None
                   else f"default: {json.dumps(default)}")
    if f.name == CORPUS_FIELD:
        placeholder = "JSON, or empty and upload a file below"
    elif base_type not in ("str", "int", "float"):
        placeholder = f"JSON, {placeholder}"
    return gr.Textbox(value="", label=f.name, info=info, placeholder=placeholder, max_length=2000)


def param_value(f: Field, value):
    """The job parameter a form input's raw value gives, or None where the input is left at
    its default (empty text, the default choice or number, an unchanged checkbox)."""
    base_type, _ = field_type(f)
    if value is None or value == "" or value == UNSET:
        return None
    if base_type == "bool" and isinstance(value, str):
        value = value == "true"
    elif base_type in ("int", "float") and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{f.name} must be a number, got {value!r}.") from None
    if base_type == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    elif base_type == "float" and type(value) is int:  # a browser sends 1.0 as 1
        value = float(value)
    if f.default is not MISSING and value == f.default and type(value) is type(f.default):
        return None
    if base_type in ("int", "float", "bool", "str") or not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{f.name} must be JSON: {exc.msg}.") from None


def form_params(fields: list[FormField], kind_name: str, values: list) -> dict:
    """The chosen kind's parameters from the form's raw values (one per field, all kinds);
    fields left at their defaults are left out. check_params validates the result."""
    if kind_name not in kind_names():
        raise ValueError(f"Choose what to train: {', '.join(kind_names())}.")
    given = {form.field.name: param_value(form.field, value)
             for form, value in zip(fields, values, strict=True) if form.kind == kind_name}
    return {name: value for name, value in given.items() if value is not None}


def takes_corpus(kind_name: str) -> bool:
    return kind_name in kind_names() and CORPUS_FIELD in {f.name for f in documented_fields(get_kind(kind_name).params)}


def queued_params(settings: Settings, kind_name: str, params_text: str, upload: str | None) -> dict:
    """A job's parameters from the train endpoint: its JSON object, with an uploaded corpus
    copied into the data dir, and a corpus file named in the JSON only from there."""
    params = json_object(params_text, "Parameters", '{"base": 1, "beta": 0.1}')
    if upload and CORPUS_FIELD not in params and takes_corpus(kind_name):
        params[CORPUS_FIELD] = {"file": save_upload(settings, upload)}
    corpus = params.get(CORPUS_FIELD)
    if isinstance(corpus, dict) and "file" in corpus:
        corpus["file"] = str(settings.data_file(corpus["file"], "corpus file"))
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
    """One group of inputs per kind, built from its Params (only the chosen kind's is shown);
    queuing reads the chosen kind's inputs into a JSON object for the `train` endpoint."""
    gr.Markdown("Researchers only. Training jobs run one at a time in the background (publishing and story "
                "pools run beside them); the result enters the arena by itself.")
    names = kind_names()
    fields: list[FormField] = []
    groups = []
    with gr.Group(visible=False) as tools:
        gr.Markdown(training_processes_text(settings))
        kind = gr.Dropdown(names, value=names[0], label="Kind", elem_id="train-kind")
        for name in names:
            declared = get_kind(name)
            # Columns, not Groups: a Group Gradio shows again after hiding it is drawn twice.
            with gr.Column(visible=name == names[0], elem_id=f"train-{name}") as group:
                gr.Markdown(declared.help)
                with gr.Row():
                    fields.extend(FormField(name, f, field_input(declared.model_params, f, store))
                                  for f in documented_fields(declared.params))
            groups.append(group)
        corpus = gr.File(label="Corpus (.txt: stories separated by blank lines, or .jsonl with a \"text\" field)",
                         file_types=list(UPLOAD_SUFFIXES), type="filepath", visible=takes_corpus(names[0]),
                         elem_id="train-corpus")
        params_text = gr.Textbox(visible=False)
        launch = gr.Button("Queue training job", variant="primary", elem_id="queue-job")
        launched = gr.Markdown(elem_id="queued")

    def read_form(kind_name, *values):
        """The chosen kind's inputs as the JSON the train endpoint takes (raw values: every
        range is checked on the server, with the field's name in the message)."""
        try:
            return json.dumps(form_params(fields, kind_name, list(values)))
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc

    def queue_job(who, kind_name, params_json, upload):
        """Queue a training job (researchers only).

        Args:
            kind_name: the kind to train (`python -m rlhf params` lists each kind's parameters).
            params_json: the job's parameters as a JSON object, e.g. {"base": 1, "beta": 0.1};
                unset keys take the kind's defaults and its preset's budget.
            upload: a corpus file (.txt or .jsonl) for kinds with a corpus parameter (pretrain).
        """
        who = require_researcher(who)
        try:
            params = queued_params(settings, kind_name, params_json, upload)
            check_params(store, kind_name, params)
            job_id = job_rows.create_job(store.db, kind_name, params, who["id"], max_queued=settings.max_queued_jobs)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return f"Queued job **{job_id}** ({html.escape(kind_name)}). Follow it in the Jobs tab."

    def show_kind(name):
        return *[gr.Column(visible=name == n) for n in names], gr.File(visible=takes_corpus(name))

    kind.change(show_kind, kind, [*groups, corpus], api_visibility="private", show_progress="hidden")
    launch.click(read_form, [kind, *[f.input for f in fields]], params_text, api_visibility="private",
                 preprocess=False).success(queue_job, [session, kind, params_text, corpus], launched, api_name="train")
    model_fields = [f for f in fields if f.field.name in get_kind(f.kind).model_params]

    def refresh_models():
        """Model choices as they are now (the tab is filled on load and whenever it is opened)."""
        return [gr.Dropdown(choices=model_choices(store, get_kind(f.kind).model_params[f.field.name]))
                for f in model_fields]

    return refresh_models, [f.input for f in model_fields], tools


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
