"""Bringing your own prompts and preference data: every import path (paste, .txt/.csv/.jsonl
file, CLI, a local Hub-format dataset folder), bad rows named by line with nothing stored,
normalised duplicates, pools queued, retired prompts and collections in pair selection, and
imported votes kept out of every human statistic while training data can ask for them."""

from __future__ import annotations

import json
import random

import datasets
import pytest

from rlhf import arena, leaderboard, preferences, quality
from rlhf import prompts as prompt_import
from rlhf.export import preference_records
from rlhf.records import ImportRejected, lines
from storage import annotators, models, prompts, scores, votes
from storage import jobs as job_rows
from tests.test_cli import cli_main  # noqa: F401  (fixture)


def snapshot(store) -> dict:
    db = store.db
    return {table: db[table].count for table in ("prompts", "completions", "votes", "models", "jobs")}


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


# --- prompts in ------------------------------------------------------------------------------

def test_pasted_prompts_are_added_once_with_normalised_duplicates_skipped(arena_dir):
    settings, store = arena_dir
    pasted = "Write a story about a kind whale.\n\nwrite a story about a KIND whale!\nA tale of two otters.\n"
    result = prompt_import.import_prompts(store, settings, lines(pasted), "sea")
    assert result["added"] == 2 and result["duplicates"] == 1 and result["rows"] == 3
    stored = prompts.list_prompts(store.db, collection="sea")
    assert [p["text"] for p in stored] == ["Write a story about a kind whale.", "A tale of two otters."]
    assert {p["source"] for p in stored} == {"user"}
    # A second import of the same texts (any case or punctuation) adds nothing.
    again = prompt_import.import_prompts(store, settings, lines("A TALE of two otters"), "sea")
    assert again["added"] == 0 and again["duplicates"] == 1 and again["generate_jobs"] == []
    # A seed prompt is a duplicate too.
    seed = prompts.list_prompts(store.db, sources=["seed"], limit=1)[0]["text"]
    assert prompt_import.import_prompts(store, settings, lines(seed.upper()), "x")["duplicates"] == 1


def test_an_import_queues_stories_for_every_active_policy(arena_dir):
    settings, store = arena_dir
    active = [m.id for m in models.list_models(store.db, active_only=True)]
    result = prompt_import.import_prompts(store, settings, lines("A story about a brave snail."), "snails")
    queued = [job_rows.get_job(store.db, j) for j in result["generate_jobs"]]
    assert sorted(j["params"]["model_ids"][0] for j in queued) == sorted(active)
    # The new prompt is among each policy's missing stories although --pool-prompts is 6.
    from storage import completions

    for model_id in active:
        missing = completions.prompts_without_completion(store.db, model_id, settings.pool_prompts)
        assert [p["id"] for p in missing] == result["ids"]


@pytest.mark.parametrize("suffix, content", [
    (".txt", "Write a story about a cat.\nWrite a story about a dog.\n"),
    (".csv", "id,prompt\n1,Write a story about a cat.\n2,\"Write a story about a dog.\"\n"),
    (".jsonl", '{"prompt": "Write a story about a cat."}\n{"prompt": "Write a story about a dog."}\n'),
])
def test_prompt_files_of_each_format(store, tmp_path, suffix, content):
    from tests.conftest import tiny_settings

    settings = tiny_settings(store.path.parent)
    path = tmp_path / f"pets{suffix}"
    path.write_text(content)
    result = prompt_import.import_prompts(store, settings, prompt_import.prompt_file_rows(path), "pets")
    assert result["added"] == 2
    assert [p["text"] for p in prompts.list_prompts(store.db)] == ["Write a story about a cat.",
                                                                   "Write a story about a dog."]


def test_bad_rows_are_named_by_line_and_nothing_is_stored(arena_dir, tmp_path):
    settings, store = arena_dir
    before = snapshot(store)
    too_long = "x" * (settings.max_prompt_chars + 1)
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "Write a story about a good row."}, {"prompt": ""}, {"prompt": 7}, {"prompt": too_long},
        {"title": "no prompt column"},
    ])
    with open(path, "a") as out:
        out.write("this line is not JSON\n")
    with pytest.raises(ImportRejected) as caught:
        prompt_import.import_prompts(store, settings, prompt_import.prompt_file_rows(path), "bad")
    message = str(caught.value)
    for expected in ("line 2: empty", "line 3: not text", f"line 4: over {settings.max_prompt_chars} characters",
                     "line 5: not text", "line 6: not text"):
        assert expected in message
    assert "line 1" not in message
    assert snapshot(store) == before  # the good row was not stored either
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text('prompt\n"A fine prompt."\n""\n')
    with pytest.raises(ImportRejected, match="line 3: empty"):
        prompt_import.import_prompts(store, settings, prompt_import.prompt_file_rows(csv_path), "bad")
    with pytest.raises(ValueError, match="collection"):
        prompt_import.import_prompts(store, settings, lines("A story."), "<b>")
    assert snapshot(store) == before


def test_a_failing_row_rolls_back_the_whole_batch(arena_dir, monkeypatch):
    """Atomicity below validation too: an error while storing leaves no half batch."""
    settings, store = arena_dir
    before = snapshot(store)
    real_insert = type(store.db["prompts"]).insert
    calls = []

    def failing_insert(table, record, *args, **kwargs):
        calls.append(record)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real_insert(table, record, *args, **kwargs)

    monkeypatch.setattr(type(store.db["prompts"]), "insert", failing_insert)
    with pytest.raises(RuntimeError):
        prompt_import.import_prompts(store, settings, lines("A first new prompt.\nA second new prompt."), "half")
    monkeypatch.undo()
    assert snapshot(store) == before and len(calls) == 2


def save_local_dataset(folder, rows: dict, as_parquet: bool) -> str:
    table = datasets.Dataset.from_dict(rows)
    if as_parquet:
        folder.mkdir(parents=True)
        table.to_parquet(str(folder / "train.parquet"))
    else:
        datasets.DatasetDict({"train": table}).save_to_disk(str(folder))
    return str(folder)


@pytest.mark.parametrize("as_parquet", [False, True])
def test_prompts_from_a_local_hub_format_dataset(arena_dir, tmp_path, as_parquet):
    settings, store = arena_dir
    folder = save_local_dataset(tmp_path / "ds", {"text": ["A story about a moon bear.", "A story about a sun fox."],
                                                  "id": [1, 2]}, as_parquet)
    rows = prompt_import.hub_prompt_rows(folder, "train", "text")
    assert prompt_import.import_prompts(store, settings, rows, "hub")["added"] == 2
    with pytest.raises(ValueError, match="no column 'prompt'"):
        list(prompt_import.hub_prompt_rows(folder, "train", "prompt"))
    with pytest.raises(ValueError, match="dataset: cannot load"):
        list(prompt_import.hub_prompt_rows(folder, "nosuchsplit", "text"))


def test_cli_prompts_add_list_retire(arena_dir, tmp_path, cli_main):  # noqa: F811 (cli_main is the fixture)
    settings, _ = arena_dir
    path = tmp_path / "mine.txt"
    path.write_text("Write a story about a red kite.\nWrite a story about a red kite!\n")
    data = ["--data-dir", str(settings.data_dir), "--json"]
    code, out, _ = cli_main("prompts", "add", str(path), "--collection", "kites", *data)
    added = json.loads(out)
    assert code == 0 and added["added"] == 1 and added["duplicates"] == 1 and len(added["generate_jobs"]) == 2
    folder = save_local_dataset(tmp_path / "hub", {"prompt": ["Write a story about a tall giraffe."]}, False)
    code, out, _ = cli_main("prompts", "add", "--hub-dataset-prompts", folder, "--split", "train", "--column", "prompt",
                            "--collection", "giraffes", *data)
    assert code == 0 and json.loads(out)["added"] == 1
    code, out, _ = cli_main("prompts", "list", "--collection", "kites", *data)
    listed = json.loads(out)
    assert [p["text"] for p in listed["prompts"]] == ["Write a story about a red kite."]
    assert {c["collection"]: c["prompts"] for c in listed["collections"]} == {"giraffes": 1, "kites": 1}
    code, out, _ = cli_main("prompts", "retire", str(added["ids"][0]), *data)
    assert code == 0 and json.loads(out)["prompt"]["retired_at"] is not None
    bad = tmp_path / "bad.txt"
    bad.write_text("x" * (settings.max_prompt_chars + 5) + "\n")
    code, out, _ = cli_main("prompts", "add", str(bad), *data)
    assert code == 2 and "line 1: over" in json.loads(out)["error"]


def test_retired_prompts_leave_the_arena_but_keep_their_votes(arena_dir):
    settings, store = arena_dir
    ann = arena.sign_in(store, settings, "Ann")["id"]
    view = arena.next_pair(store, ann, random.Random(0))
    vote_id, _ = arena.submit_vote(store, settings, ann, view, "a")
    every_prompt = {p["id"] for p in prompts.list_prompts(store.db)}
    for prompt_id in every_prompt - {view.pair.prompt_id}:
        prompts.retire_prompt(store.db, prompt_id)
    # Only the voted prompt is left, and Ann has judged its only pair: nothing to serve her.
    assert arena.next_pair(store, ann, random.Random(1), gold_rate=0.0) is None
    bob = arena.sign_in(store, settings, "Bob")["id"]
    assert arena.next_pair(store, bob, random.Random(1)).pair.prompt_id == view.pair.prompt_id
    prompts.retire_prompt(store.db, view.pair.prompt_id)
    assert arena.next_pair(store, bob, random.Random(1)) is None
    assert [r["vote_id"] for r in preference_records(store)] == [vote_id]
    assert votes.human_vote_total(store.db) == 1


def test_pair_selection_keeps_to_the_chosen_collections(arena_dir):
    settings, store = arena_dir
    first = prompts.list_prompts(store.db, sources=["seed"], limit=2)
    store.db.execute("UPDATE prompts SET collection = 'chosen' WHERE id = ?", [first[0]["id"]])
    ann = arena.sign_in(store, settings, "Ann")["id"]
    rng = random.Random(3)
    for _ in range(3):
        view = arena.next_pair(store, ann, rng, collections=["chosen"])
        if view is None:
            break
        assert view.pair.prompt_id == first[0]["id"]
        arena.skip_pair(store, ann, view)
    assert arena.next_pair(store, ann, rng, collections=["chosen"]) is None
    assert arena.next_pair(store, ann, rng) is not None


def test_pair_prompt_collections_setting():
    import argparse

    from rlhf.settings import add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_args(parser.parse_args([]), {}).pair_prompt_collections is None
    chosen = from_args(parser.parse_args(["--pair-prompt-collections", "kites, sea"]), {})
    assert chosen.pair_prompt_collections == ("kites", "sea")


# --- preferences in ---------------------------------------------------------------------------

PAIRS = [
    {"prompt": "Write a story about a fox.", "chosen": "The fox found a friend.", "rejected": "Fox fox fox."},
    {"prompt": "Write a story about a fox.", "chosen": "The fox slept well.", "rejected": "No."},
    {"prompt": [{"role": "user", "content": "Write a story about an owl."}],
     "chosen": [{"role": "assistant", "content": "The owl hooted softly."}],
     "rejected": [{"role": "assistant", "content": "Owl."}]},
    {"chosen": [{"role": "user", "content": "Tell me a tale of a hen."},
                {"role": "assistant", "content": "A hen laid a golden egg."}],
     "rejected": [{"role": "user", "content": "Tell me a tale of a hen."},
                  {"role": "assistant", "content": "Hen hen."}]},
]


def test_preference_file_in_trl_formats_is_stored_as_import_votes(arena_dir, tmp_path):
    settings, store = arena_dir
    path = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    result = preferences.import_preferences(store, settings, preferences.read_pairs(path), "foxes", path)
    # the fox prompt appears twice, so its second pair goes to a second pair of external policies
    assert result["pairs"] == 4 and result["prompts"] == 3 and result["policies"] == 4
    records = list(preference_records(store, sources=("import",)))
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == [
        ("Write a story about a fox.", "The fox found a friend.", "Fox fox fox."),
        ("Write a story about a fox.", "The fox slept well.", "No."),
        ("Write a story about an owl.", "The owl hooted softly.", "Owl."),
        ("Tell me a tale of a hen.", "A hen laid a golden egg.", "Hen hen."),
    ]
    assert {(r["source"], r["dataset"]) for r in records} == {("import", "foxes")}
    external = [m for m in models.list_models(store.db, external=True) if m.kind == "external"]
    assert sorted(m.name for m in external) == ["foxes-a", "foxes-a2", "foxes-b", "foxes-b2"]
    assert not any(m.active for m in external)
    assert not any(m.kind == "external" for m in models.list_models(store.db))
    with pytest.raises(ValueError, match="already imported"):
        preferences.import_preferences(store, settings, preferences.read_pairs(path), "foxes", path)
    assert votes.imported_datasets(store.db)[0]["pairs"] == 4


def test_bad_preference_rows_are_named_and_nothing_is_stored(arena_dir, tmp_path):
    settings, store = arena_dir
    before = snapshot(store)
    path = write_jsonl(tmp_path / "bad.jsonl", [
        PAIRS[0], {"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": "c"},
        {"prompt": "p", "chosen": 3, "rejected": ""}, {"prompt": "p", "chosen": "x" * (settings.max_story_chars + 1),
                                                        "rejected": "r"},
    ])
    with pytest.raises(ImportRejected) as caught:
        preferences.import_preferences(store, settings, preferences.read_pairs(path), "bad", path)
    message = str(caught.value)
    assert "line 2: chosen and rejected are the same" in message and "line 3: no rejected field" in message
    assert "line 4: chosen not text, rejected empty" in message and "line 5: chosen over" in message
    assert "line 1" not in message and snapshot(store) == before
    with pytest.raises(ValueError, match="name"):
        preferences.import_preferences(store, settings, preferences.read_pairs(path), "no spaces", path)


def test_preferences_from_a_local_hub_format_dataset_and_the_cli(arena_dir, tmp_path,
                                                                 cli_main):  # noqa: F811 (cli_main is the fixture)
    settings, _ = arena_dir
    columns = {k: [row[k] for row in PAIRS[:2]] for k in ("prompt", "chosen", "rejected")}
    folder = save_local_dataset(tmp_path / "hub", columns, as_parquet=True)
    data = ["--data-dir", str(settings.data_dir), "--json"]
    code, out, _ = cli_main("preferences", "import", folder, "--name", "hubfox", *data)
    assert code == 0 and json.loads(out)["pairs"] == 2
    code, out, _ = cli_main("preferences", "list", *data)
    assert [d["dataset"] for d in json.loads(out)["datasets"]] == ["hubfox"]
    code, out, _ = cli_main("preferences", "import", str(tmp_path / "missing"), "--name", "x", *data)
    assert code == 2 and "cannot load" in json.loads(out)["error"]


def test_imported_votes_count_in_no_human_statistic(arena_dir, tmp_path):
    settings, store = arena_dir
    ann = arena.sign_in(store, settings, "Ann")["id"]
    rng = random.Random(5)
    for _ in range(3):
        arena.submit_vote(store, settings, ann, arena.next_pair(store, ann, rng), "a")
    board_before = [(r["policy"], r["wins"], r["losses"]) for r in leaderboard.standings(store)]
    before = {
        "pairs": votes.policy_pair_stats(store.db), "total": votes.human_vote_total(store.db),
        "comparisons": votes.human_comparisons(store.db), "per_annotator": votes.votes_per_annotator(store.db),
        "quality": quality.report(store, settings), "agreement": scores.agreement(store.db),
        "count": arena.vote_count(store, ann), "human_records": list(preference_records(store)),
    }
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    preferences.import_preferences(store, settings, preferences.read_pairs(path), "outside", path)
    after = {
        "pairs": votes.policy_pair_stats(store.db), "total": votes.human_vote_total(store.db),
        "comparisons": votes.human_comparisons(store.db), "per_annotator": votes.votes_per_annotator(store.db),
        "quality": quality.report(store, settings), "agreement": scores.agreement(store.db),
        "count": arena.vote_count(store, ann), "human_records": list(preference_records(store)),
    }
    assert after == before
    assert [(r["policy"], r["wins"], r["losses"]) for r in leaderboard.standings(store)] == board_before
    assert {r["source"]: r["votes"] for r in votes.votes_per_source(store.db)} == {"human": 3, "import": 4}
    # Imported stories never reach the arena: their policies are external and inactive.
    bob = annotators.sign_in(store.db, "Bob", "annotator")["id"]
    for _ in range(10):
        view = arena.next_pair(store, bob, rng)
        if view is None:
            break
        assert "external" not in {models.get_model(store.db, m).kind for m in (view.pair.model_a, view.pair.model_b)}
        arena.skip_pair(store, bob, view)
    # Training data asks for them explicitly, by source and by data set name.
    both = list(preference_records(store, sources=("human", "import")))
    assert {r["source"] for r in both} == {"human", "import"} and len(both) == 7
    assert list(preference_records(store, sources=("human", "import"), datasets=["other"])) == before["human_records"]
    assert len(list(preference_records(store, sources=("import",), datasets=["outside"]))) == 4


def test_m012_keeps_existing_prompts_and_detects_their_duplicates(tmp_path):
    """An arena from before collections: its prompts get their normalised text, so an import
    of a near-copy is counted as a duplicate."""
    from storage.db import connect
    from storage.schema import MIGRATIONS
    from tests.conftest import tiny_settings

    settings = tiny_settings(tmp_path / "data")
    settings.data_dir.mkdir()
    db = connect(settings.db_path)
    MIGRATIONS.apply(db, stop_before="m012_collections_imports_and_content_checks")
    db["prompts"].insert({"text": "Write a story about an old lighthouse.", "source": "seed", "created_at": 0.0})
    db.conn.close()
    store = settings.store()
    assert prompts.get_prompt(store.db, 1)["normalized"] == "write a story about an old lighthouse"
    assert "gore" in store.db.execute("SELECT group_concat(phrase) FROM content_themes").fetchone()[0]
    result = prompt_import.import_prompts(store, settings, lines("write a story about an old LIGHTHOUSE"), "x")
    assert result["duplicates"] == 1 and result["added"] == 0


def test_imported_pairs_are_not_weak_labelled_and_blocked_gold_pairs_are_not_served(arena_dir, tmp_path):
    from rlhf import quality as quality_checks
    from storage import quality as quality_rows
    from storage import weak

    settings, store = arena_dir
    pool_before = weak.pool_pairs(store.db)
    # the first imported prompt is a seed prompt: its stories share a prompt with the pool
    seed = prompts.list_prompts(store.db, sources=["seed"], limit=1)[0]["text"]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": seed, "chosen": "Good story.", "rejected": "Bad story."}])
    preferences.import_preferences(store, settings, preferences.read_pairs(path), "seedprefs", path)
    assert weak.pool_pairs(store.db) == pool_before
    pair = pool_before[0]
    names = {m.id: m.name for m in models.list_models(store.db)}
    gold_id = quality_checks.add_gold_pair(store, pair["prompt_id"], names[pair["model_a"]], names[pair["model_b"]])
    ann = annotators.sign_in(store.db, "Gil", "annotator")["id"]
    assert quality_rows.unseen_gold_pair(store.db, ann)["gold_id"] == gold_id
    store.db.execute("UPDATE completions SET blocked_reason = 'reported' WHERE id = ?", [pair["completion_a"]])
    assert quality_rows.unseen_gold_pair(store.db, ann) is None


def test_cli_export_keeps_the_source_and_selects_imported_data_sets(arena_dir, tmp_path,
                                                                    cli_main):  # noqa: F811 (cli_main is the fixture)
    settings, store = arena_dir
    for name in ("one", "two"):
        path = write_jsonl(tmp_path / f"{name}.jsonl", PAIRS[:1])
        preferences.import_preferences(store, settings, preferences.read_pairs(path), name, path)
    data = ["--data-dir", str(settings.data_dir), "--json"]
    out_file = tmp_path / "out.jsonl"
    code, out, _ = cli_main("export", "--out", str(out_file), "--sources", "human,import", "--dataset", "two", *data)
    assert code == 0 and json.loads(out)["records"] == 1
    [record] = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert (record["source"], record["dataset"], record["chosen"]) == ("import", "two", PAIRS[0]["chosen"])
    code, out, _ = cli_main("export", "--out", str(out_file), *data)
    assert json.loads(out)["records"] == 0  # human votes only by default, and there are none
    code, out, _ = cli_main("export", "--sources", "robots", *data)
    assert code == 2 and "--sources" in json.loads(out)["error"]
