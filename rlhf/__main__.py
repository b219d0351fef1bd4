"""Command line: `python -m rlhf COMMAND --data-dir DIR [--json]`.

With --json, stdout carries one JSON document and logs go to stderr, so scripts and
benchmarks can parse the output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from rlhf import jobs
from rlhf.runner import kind_names
from rlhf.settings import PROMPT_SOURCES, Settings, add_arguments, from_args


def _progress_to_stderr(fraction: float, message: str) -> None:
    print(f"[{fraction:6.1%}] {message}", file=sys.stderr, flush=True)


def cmd_init(settings: Settings, args) -> dict:
    job = jobs.run_inline(settings, "prepare", {})
    from storage import completions, models, prompts

    db = settings.store().db
    return {
        "job_id": job["id"], "status": job["status"], "error": job["error"],
        "prompts": prompts.prompt_count(db),
        "policies": [{"id": m.id, "name": m.name, "stories": completions.pool_sizes(db).get(m.id, 0)}
                     for m in models.list_models(db)],
    }


def cmd_models(settings: Settings, args) -> dict:
    from storage import completions, models

    db = settings.store().db
    sizes = completions.pool_sizes(db)
    return {"models": [{**asdict(m), "stories": sizes.get(m.id, 0)} for m in models.list_models(db)]}


def cmd_generate(settings: Settings, args) -> dict:
    from storage import completions, models

    db = settings.store().db
    models.get_model(db, args.model)
    job = jobs.run_inline(settings, "generate", {"model_ids": [args.model], "prompts": args.prompts})
    return {"job_id": job["id"], "status": job["status"], "error": job["error"],
            "stories": completions.pool_sizes(db).get(args.model, 0)}


def cmd_leaderboard(settings: Settings, args) -> dict:
    from rlhf.leaderboard import standings

    return {"leaderboard": standings(settings.store())}


def cmd_export(settings: Settings, args) -> dict:
    from rlhf.export import preference_records, write_jsonl
    from storage.votes import SOURCES

    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    if not sources or set(sources) - set(SOURCES):
        raise ValueError(f"--sources takes vote sources of {', '.join(SOURCES)}, got {args.sources!r}.")
    out = args.out or settings.exports_dir / "preferences.jsonl"
    records = preference_records(settings.store(), sources, include_undecided=args.include_undecided,
                                 datasets=args.dataset)
    count = write_jsonl(records, out)
    return {"path": str(Path(out).resolve()), "records": count}


def cmd_jobs(settings: Settings, args) -> dict:
    from storage import jobs as job_rows

    return {"jobs": job_rows.list_jobs(settings.store().db, limit=args.limit)}


def cmd_gold(settings: Settings, args) -> dict:
    from rlhf import quality
    from storage import quality as quality_rows

    store = settings.store()
    if args.action == "add":
        if args.prompt is None or not args.better or not args.worse:
            raise ValueError("gold add needs --prompt, --better and --worse.")
        gold_id = quality.add_gold_pair(store, args.prompt, args.better, args.worse)
        return {"gold_pair": next(g for g in quality_rows.list_gold_pairs(store.db) if g["id"] == gold_id)}
    return {"gold_pairs": quality_rows.list_gold_pairs(store.db)}


def cmd_quality(settings: Settings, args) -> dict:
    from rlhf import quality

    store = settings.store()
    result = {}
    if args.exclude:
        quality.set_excluded(store, args.exclude, excluded=True)
    if args.include:
        quality.set_excluded(store, args.include, excluded=False)
    if args.exclude_below_threshold:
        result["newly_excluded"] = quality.exclude_below_threshold(store, settings)
    return {**result, "annotators": quality.report(store, settings)}


def cmd_prompts(settings: Settings, args) -> dict:
    from rlhf import prompts as prompt_import
    from storage import prompts

    store = settings.store()
    if args.action == "list":
        return {"collections": prompts.collections(store.db),
                "prompts": prompts.list_prompts(store.db, collection=args.collection,
                                                sources=[args.source] if args.source else None)}
    if args.action == "retire":
        if args.target is None or not args.target.isdigit():
            raise ValueError("prompts retire needs the prompt id (see `prompts list`).")
        return {"prompt": prompts.retire_prompt(store.db, int(args.target))}
    if args.hub_dataset_prompts:
        rows = prompt_import.hub_prompt_rows(args.hub_dataset_prompts, args.split, args.column, settings.hub_token)
        collection = args.collection or args.hub_dataset_prompts
    elif args.target:
        rows, collection = prompt_import.prompt_file_rows(Path(args.target)), args.collection or Path(args.target).stem
    else:
        raise ValueError("prompts add needs a FILE (.txt, .csv, .jsonl) or --hub-dataset-prompts owner/name.")
    return prompt_import.import_prompts(store, settings, rows, collection)


def cmd_preferences(settings: Settings, args) -> dict:
    from rlhf import preferences
    from storage import votes

    store = settings.store()
    if args.action == "list":
        return {"datasets": votes.imported_datasets(store.db)}
    if not args.source or not args.name:
        raise ValueError("preferences import needs FILE_OR_HUB_ID and --name.")
    rows = preferences.read_pairs(args.source, args.split, settings.hub_token)
    return preferences.import_preferences(store, settings, rows, args.name, args.source)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def train_params(args) -> dict:
    """Job parameters from --base/--max-steps/--preset/--budget and repeated --set key=value
    (a kind that has no such parameter refuses it, naming it)."""
    params = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}.")
        params[key] = _parse_value(value)
    for key in ("base", "max_steps", "preset", "budget"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    return params


def cmd_train(settings: Settings, args) -> dict:
    job = jobs.run_inline(settings, args.kind, train_params(args))
    return {"job_id": job["id"], "kind": job["kind"], "status": job["status"], "error": job["error"],
            "model_id": job["result_model_id"], "metrics": job["metrics"]}


def cmd_params(settings: Settings, args) -> dict:
    from rlhf.runner import parameter_tables

    return {"markdown": parameter_tables()}


def _hub_job(job: dict) -> dict:
    return {"job_id": job["id"], "status": job["status"], "error": job["error"], **(job["metrics"] or {})}


def cmd_publish(settings: Settings, args) -> dict:
    from rlhf.hub import check_repo_id

    repo = check_repo_id(args.repo or settings.hub_dataset, "--repo (or --hub-dataset)")
    return _hub_job(jobs.run_inline(settings, "publish", {"repo": repo}))


def cmd_push(settings: Settings, args) -> dict:
    from rlhf.hub import check_repo_id

    repo = check_repo_id(args.repo, "--repo")
    return _hub_job(jobs.run_inline(settings, "push", {"model_id": args.model, "repo": repo}))


def cmd_simulate(settings: Settings, args) -> dict:
    from rlhf.simulate import simulate

    return simulate(args.url, args.annotators, args.votes, args.accuracy, args.position_bias, args.seed)


def round_recipe_values(args) -> dict:
    """The recipe from `rounds set` flags: unset flags take the recipe's defaults."""
    values: dict = {"every_votes": args.every_votes, "schedule_minutes": args.schedule_minutes,
                    "min_votes": args.min_votes, "max_votes": args.max_votes, "starting_policy": args.starting_policy}
    if args.steps is not None:
        values["steps"] = [s.strip() for s in args.steps.split(",") if s.strip()]
    step_params: dict = {}
    for item in args.set or []:
        target, sep, value = item.partition("=")
        kind, dot, key = target.partition(".")
        if not sep or not dot or not kind or not key:
            raise ValueError(f"--set expects KIND.KEY=VALUE (e.g. raft.k=4), got {item!r}.")
        step_params.setdefault(kind, {})[key] = _parse_value(value)
    values["step_params"] = step_params or None
    return values


def cmd_rounds(settings: Settings, args) -> dict:
    from rlhf import rounds

    store = settings.store()
    if args.action == "set":
        return {"recipe": rounds.set_recipe(store, round_recipe_values(args))}
    if args.action == "start":
        return {"round": rounds.start_round(store)}
    if args.action == "cancel":
        if args.round_id is None:
            raise ValueError("rounds cancel needs the round id (see `rounds list`).")
        return {"round": rounds.cancel_round(store, args.round_id)}
    from storage import rounds as round_rows

    return {"recipe": round_rows.get_recipe(store.db), "champion": rounds.champion(store),
            "rounds": rounds.rounds_report(store), "champion_history": rounds.champion_history(store)}


class KindHelp(argparse.Action):
    """`train KIND --help`: the usual help, then KIND's parameters (only KIND's module loads)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        if getattr(namespace, "kind", None):
            print(f"\n{namespace.kind} parameters (--set KEY=VALUE):\n{kind_parameters_help(namespace.kind)}")
        parser.exit()


def kind_parameters_help(kind_name: str) -> str:
    from rlhf.params import describe
    from rlhf.runner import get_kind

    kind = get_kind(kind_name)
    lines = [kind.help]
    for p in describe(kind.params):
        default = "required" if "default" not in p else "default unset" if p["default"] is None else \
            f"default {json.dumps(p['default'])}"
        lines.append(f"  {p['name']}: {p['help']} ({p['allowed']}; {default})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlhf",
                                     description="Story Arena: data, models and training from the command line.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, add_help=name != "train")
        add_arguments(sub)
        sub.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        sub.set_defaults(handler=handler)
        return sub

    command("init", cmd_init,
            "prepare the data dir: seed prompts, starter model and policies, their story pool (idempotent)")
    command("models", cmd_models, "list policies with lineage and pool sizes")
    generate = command("generate", cmd_generate, "write a policy's missing stories for the first N prompts")
    generate.add_argument("--model", type=int, required=True, help="policy id (see `models`)")
    generate.add_argument("--prompts", type=int,
                          help="cover the first N prompts (default: all); stories already written are kept")
    command("leaderboard", cmd_leaderboard, "Bradley-Terry standings with 95%% intervals; few votes: preliminary")
    export = command("export", cmd_export, "write human preferences as TRL-format JSON lines")
    export.add_argument("--out", type=Path, help="output file (default <data dir>/exports/preferences.jsonl)")
    export.add_argument("--include-undecided", action="store_true",
                        help="keep ties and both-bad votes, marked with `label`")
    export.add_argument("--sources", default="human",
                        help="comma-separated vote sources to export, e.g. human,import (default human)")
    export.add_argument("--dataset", action="append",
                        help="with source import: only this imported data set (repeatable)")
    train = command("train", cmd_train, "run a training job to completion (the same job the Train tab queues); "
                    "`train KIND --help` lists that kind's parameters")
    train.add_argument("kind", choices=sorted(kind_names()), help="what to train")
    train.add_argument("--kind-help", "--help", "-h", action=KindHelp, nargs=0, help="this help, and KIND's parameters")
    train.add_argument("--base", type=int, help="base policy (or reward model) id")
    train.add_argument("--max-steps", type=int, help="override the preset's step budget")
    train.add_argument("--preset", choices=["quick", "full"], help="step budget (default quick)")
    train.add_argument("--budget", type=int, help="expert queries a teams job may spend (teams only)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="any other parameter (value parsed as JSON when it can be)")
    command("params", cmd_params, "every training kind's parameters as markdown tables (as in the README)")
    sim = command("simulate", cmd_simulate, "simulated annotators voting through a running app's HTTP API")
    sim.add_argument("--url", required=True, help="the app, e.g. http://127.0.0.1:7860/")
    sim.add_argument("--annotators", type=int, default=4)
    sim.add_argument("--votes", type=int, default=10, help="votes per annotator")
    sim.add_argument("--accuracy", type=float, default=0.9, help="chance of voting as the hidden oracle prefers")
    sim.add_argument("--position-bias", type=float, default=0.0, help="chance of picking A regardless")
    sim.add_argument("--seed", type=int, default=0)
    publish = command("publish", cmd_publish,
                      "publish the human preferences (TRL format) and a dataset card to a Hub dataset repo")
    publish.add_argument("--repo", help="dataset repo owner/name (default --hub-dataset)")
    push = command("push", cmd_push,
                   "push a checkpoint and its model card (lineage, kind, data, metrics) to a Hub model repo")
    push.add_argument("--model", type=int, required=True, help="policy id (see `models`)")
    push.add_argument("--repo", required=True, help="model repo owner/name")
    prompt_cmd = command("prompts", cmd_prompts,
                         "add prompt collections (file or Hub dataset), list them, retire a prompt")
    prompt_cmd.add_argument("action", choices=["add", "list", "retire"])
    prompt_cmd.add_argument("target", nargs="?",
                            help="add: a .txt (a prompt a line), .csv or .jsonl file with a `prompt` column; "
                                 "retire: the prompt id")
    prompt_cmd.add_argument("--collection",
                            help="the collection's name (add: default the file or dataset name; list: only this one)")
    prompt_cmd.add_argument("--hub-dataset-prompts", metavar="OWNER/NAME",
                            help="add from a Hub dataset (or a local dataset folder) instead of a file")
    prompt_cmd.add_argument("--split", default="train", help="the dataset split (default train)")
    prompt_cmd.add_argument("--column", default="prompt",
                            help="the dataset column holding the prompts (default prompt)")
    prompt_cmd.add_argument("--source", choices=PROMPT_SOURCES, help="list: only prompts of this source")
    pref_cmd = command("preferences", cmd_preferences,
                       "import a preference data set in TRL's format (prompt/chosen/rejected), "
                       "or list the imported ones")
    pref_cmd.add_argument("action", choices=["import", "list"])
    pref_cmd.add_argument("source", nargs="?", metavar="FILE_OR_HUB_ID",
                          help="a .jsonl file, a Hub dataset id or a local dataset folder")
    pref_cmd.add_argument("--name", help="the data set's name (training can select it)")
    pref_cmd.add_argument("--split", default="train", help="the dataset split (default train)")
    rounds_cmd = command("rounds", cmd_rounds,
                         "training rounds that run themselves: set the recipe (replaces it), list rounds, "
                         "start one now, cancel one")
    rounds_cmd.add_argument("action", choices=["set", "list", "start", "cancel"])
    rounds_cmd.add_argument("round_id", nargs="?", type=int, help="cancel: the round id")
    rounds_cmd.add_argument("--every-votes", type=int, help="start a round after N new decided human votes")
    rounds_cmd.add_argument("--schedule-minutes", type=float, help="start a round M minutes after the last one")
    rounds_cmd.add_argument("--steps", help="policy kinds after the reward job, comma-separated (default raft)")
    rounds_cmd.add_argument("--min-votes", type=int, help="votes a child needs against its parent to be judged")
    rounds_cmd.add_argument("--max-votes", type=int, help="votes after which an undecided child is retired")
    rounds_cmd.add_argument("--starting-policy", type=int, help="the first champion (default the first starter)")
    rounds_cmd.add_argument("--set", action="append", metavar="KIND.KEY=VALUE",
                            help="a step's job parameter, e.g. raft.k=4 or reward.max_steps=20 (repeatable)")
    job_list = command("jobs", cmd_jobs, "list background jobs")
    job_list.add_argument("--limit", type=int, default=50)
    gold = command("gold", cmd_gold, "gold pairs (two stories of one prompt with a known answer) mixed into the arena")
    gold.add_argument("action", choices=["add", "list"])
    gold.add_argument("--prompt", type=int, help="prompt id (the Compare tab shows them as #id)")
    gold.add_argument("--better", help="policy (name or id) whose story is the known better one")
    gold.add_argument("--worse", help="policy (name or id) whose story is the known worse one")
    quality = command("quality", cmd_quality,
                      "per-annotator gold accuracy and agreement (Cohen's kappa); exclude annotators")
    quality.add_argument("--exclude", metavar="NAME",
                         help="leave this annotator's votes out of training data and the leaderboard")
    quality.add_argument("--include", metavar="NAME", help="count this annotator's votes again")
    quality.add_argument("--exclude-below-threshold", action="store_true",
                         help="exclude everyone under --min-gold-accuracy with at least --min-gold-votes gold votes")
    return parser


def _print_human(result: dict) -> None:
    for key, value in result.items():
        if isinstance(value, list):
            print(f"{key}:")
            for item in value:
                print("  " + ", ".join(f"{k}={v}" for k, v in item.items() if not isinstance(v, dict | list)))
        else:
            print(f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Libraries print too (transformers' Trainer logs to stdout): with --json only the
    # final document may reach stdout, so everything else goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with quiet:
            settings = from_args(args, os.environ)
            result = args.handler(settings, args)
    except (ValueError, LookupError) as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_human(result)
    failed = result.get("status") not in (None, "succeeded")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
