"""The pretrain kind: a GPT-2 from scratch on an uploaded, Hub or distilled story corpus.

Every corpus here is written by the test (templated stories); runs use 20 steps of the
`small` size on blocks of 128 tokens, which take seconds on one CPU thread.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import datasets.config
import huggingface_hub.constants
import pytest
import torch

from rlhf import jobs, pretrain, training
from rlhf.generate import Decoding, generate_stories
from rlhf.models import load_causal_lm
from rlhf.pool import fill_pool
from rlhf.pretrain import PRETRAIN_DECODING, PretrainParams
from rlhf.prompts import SEED_PROMPTS
from storage import completions, models, prompts
from storage import jobs as job_rows
from tests.conftest import tiny_settings

CPU = torch.device("cpu")
# Tiny budget; block 128 still fits the pool's first seed prompts (at most ~122 tokens
# with a 400-token BPE) plus a few new tokens, so the queued generate job can run.
TINY = {"max_steps": 20, "batch_size": 4, "block_size": 128, "vocab_size": 400, "eval_fraction": 0.2}

NAMES = ["Lily", "Ben", "Tom", "Mia", "Sam", "Anna", "Max", "Zoe"]
THINGS = ["red ball", "big kite", "little boat", "blue hat", "shiny stone", "toy car", "soft bear"]
PLACES = ["park", "garden", "beach", "forest", "kitchen", "yard", "school"]
FEELINGS = ["happy", "glad", "proud", "excited"]


def make_stories(n: int = 48, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    stories = []
    for _ in range(n):
        who, thing, place, feeling = rng.choice(NAMES), rng.choice(THINGS), rng.choice(PLACES), rng.choice(FEELINGS)
        friend = rng.choice([x for x in NAMES if x != who])
        stories.append(
            f"Once upon a time, {who} found a {thing} in the {place}. {who} was very {feeling}.\n"
            f"{who} showed the {thing} to {friend}, and they played with it all day. The end."
        )
    return stories


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from two threads, and a busy machine makes them far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def txt_corpus(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("\n\n".join(make_stories()) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def jsonl_corpus(tmp_path):
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": s}) + "\n" for i, s in enumerate(make_stories(seed=2))),
                    encoding="utf-8")
    return path


@pytest.fixture
def settings(tmp_path):
    s = tiny_settings(tmp_path / "data")
    yield s
    s.store().db.conn.close()


def generate_jobs_for(db, model_id: int) -> list[dict]:
    return [j for j in job_rows.list_jobs(db, kind="generate") if j["params"]["model_ids"] == [model_id]]


def run_queued(settings, job_id: int) -> dict:
    job_rows.update_job(settings.store().db, job_id, status="running")
    return jobs.execute(settings, job_id)


# --------------------------------------------------------------------------- training


def test_pretrain_on_txt_upload_enters_the_arena(settings, txt_corpus):
    job = jobs.run_inline(settings, "pretrain", {"corpus": {"file": str(txt_corpus)}, **TINY})
    assert job["status"] == "succeeded", job["error"]

    db = settings.store().db
    record = models.get_model(db, job["result_model_id"])
    assert record.kind == "pretrain" and record.parent_id is None and record.job_id == job["id"]
    assert record.name == "babylm-small" and record.active
    decoding = Decoding.from_dict(record.decoding)
    assert (decoding.temperature, decoding.top_p) == (0.8, 0.95)

    m = record.metrics
    assert m["corpus_stories"] == 48 and m["corpus_chars"] > 5000 and m["eval_stories"] >= 1
    assert m["parameters"] > 1_000_000 and 257 < m["vocab_size"] <= 400 and m["steps"] == 20
    assert math.isfinite(m["eval_perplexity"]) and math.isfinite(m["train_loss"])
    assert m["eval_perplexity"] < m["init_eval_perplexity"] / 5  # it learned the templates
    assert m["train_tokens_per_s"] > 0 and m["resumed_from_step"] == 0
    assert job["metrics"] == m

    # The folder is a plain LM the arena can load and sample from.
    model, tokenizer = load_causal_lm(record.path, CPU)
    assert tokenizer.chat_template is None
    assert model.config.n_positions == 128 and model.config.vocab_size == len(tokenizer)
    stories = generate_stories(model, tokenizer, ["Lily and the red ball."] * 4, Decoding(max_new_tokens=24), seed=0)
    assert any(s.text for s in stories)
    # Optimizer checkpoints are gone once the model is registered.
    assert not list((settings.models_dir / f"pretrain-job{job['id']}").glob("checkpoint-*"))

    # Its story pool is queued, and runs (on the pool's first seed prompts).
    prompts.add_prompts(db, SEED_PROMPTS[: settings.pool_prompts])
    queued = generate_jobs_for(db, record.id)
    assert len(queued) == 1 and queued[0]["status"] == "queued"
    done = run_queued(settings, queued[0]["id"])
    assert done["status"] == "succeeded", done["error"]
    assert completions.pool_sizes(db)[record.id] == settings.pool_prompts


def test_jsonl_with_arena_checkpoints_and_resume(settings, jsonl_corpus, monkeypatch):
    params = {"corpus": {"file": str(jsonl_corpus)}, **TINY, "arena_every": 10, "name": "kid-lm"}
    real_register = training.register_checkpoint
    calls = []

    def crash_on_final(*args, **kwargs):  # the process dies after training, before registering
        calls.append(kwargs["name"])
        if kwargs["name"] == "kid-lm":
            raise RuntimeError("killed")
        return real_register(*args, **kwargs)

    monkeypatch.setattr(training, "register_checkpoint", crash_on_final)
    job = jobs.run_inline(settings, "pretrain", params)
    assert job["status"] == "failed" and "killed" in job["error"]
    assert calls == ["kid-lm-step10", "kid-lm"]

    monkeypatch.setattr(training, "register_checkpoint", real_register)
    job = run_queued(settings, job["id"])  # the worker re-runs the re-queued job
    assert job["status"] == "succeeded", job["error"]
    db = settings.store().db
    final = models.get_model(db, job["result_model_id"])
    assert final.metrics["resumed_from_step"] == 20 and final.metrics["steps"] == 20
    assert final.metrics["train_tokens_per_s"] is None  # nothing left to train
    assert final.metrics["eval_perplexity"] < final.metrics["init_eval_perplexity"]

    step10 = models.get_model_by_name(db, "kid-lm-step10")
    assert [m.name for m in models.list_models(db) if m.kind == "pretrain"] == ["kid-lm-step10", "kid-lm"]
    assert step10.parent_id is None and final.parent_id == step10.id  # a chain of checkpoints
    assert step10.metrics["step"] == 10 and math.isfinite(step10.metrics["eval_perplexity"])
    assert final.metrics["eval_perplexity"] <= step10.metrics["eval_perplexity"]
    assert len(generate_jobs_for(db, step10.id)) == 1 and len(generate_jobs_for(db, final.id)) == 1
    load_causal_lm(step10.path, CPU)

    # Re-run once its models are registered (killed before it finished): it trains nothing,
    # registers nothing twice and overwrites no folder.
    written = {m.path: (Path(m.path) / "model.safetensors").stat().st_mtime_ns for m in (step10, final)}
    again = run_queued(settings, job["id"])
    assert again["status"] == "succeeded" and again["result_model_id"] == final.id
    assert [m.name for m in models.list_models(db) if m.kind == "pretrain"] == ["kid-lm-step10", "kid-lm"]
    assert {path: (Path(path) / "model.safetensors").stat().st_mtime_ns for path in written} == written
    assert len(generate_jobs_for(db, final.id)) == 1


def test_distill_the_tiny_starters_pool(arena_dir):
    settings, store = arena_dir
    db = store.db
    source = models.get_model_by_name(db, "tiny-t0.7")
    fill_pool(store, tiny_settings(settings.data_dir, max_new_tokens=24), [source.id], 40, lambda f, m: None)
    stories = completions.pool_sizes(db)[source.id]
    assert stories == 40

    job = jobs.run_inline(settings, "pretrain", {"corpus": {"distill": source.id}, **TINY, "max_steps": 5})
    assert job["status"] == "succeeded", job["error"]
    record = models.get_model(db, job["result_model_id"])
    assert record.kind == "pretrain" and record.parent_id == source.id
    assert record.name == "babylm-small-tiny-t0.7"
    assert record.decoding == PRETRAIN_DECODING  # its own sampling, not the parent's T=0.7
    assert record.metrics["corpus"] == "distill tiny-t0.7" and record.metrics["corpus_stories"] == stories
    assert len(generate_jobs_for(db, record.id)) == 1


def test_distill_needs_a_policy_with_stories(arena_dir):
    settings, store = arena_dir
    job = jobs.run_inline(settings, "pretrain", {"corpus": {"distill": 999}, **TINY})
    assert job["status"] == "failed" and "No policy to distill with id" in job["error"]
    empty = models.add_model(store.db, "no-stories", "local", path=str(settings.models_dir))
    job = jobs.run_inline(settings, "pretrain", {"corpus": {"distill": empty.id}, **TINY})
    assert job["status"] == "failed" and "has 0 stories in the pool" in job["error"]


# --------------------------------------------------------------------------- bad corpora


@pytest.mark.parametrize("name, content, message", [
    ("junk.txt", bytes(random.Random(0).randrange(256) for _ in range(4000)), "binary"),
    ("junk.jsonl", b"\xff\xfe\x80 not utf-8 \x81" * 200, "is not UTF-8 text"),
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b"\n\n  \n\n", "has no stories"),
    ("short.txt", b"A cat sat.\n\nA dog ran.", "only 20 characters"),
    ("one.txt", b"One long story. " * 100, "needs at least 2"),
    ("notext.jsonl", b'{"text": "A story."}\n{"story": "no text field"}\n', 'line 2 has no "text" field'),
    ("list.jsonl", b'["a", "b"]\n', 'line 1 has no "text" field'),
    ("broken.jsonl", b'{"text": "A story."}\n{"text": "unfinished\n', "line 2 is not valid JSON"),
    ("number.jsonl", b'{"text": 42}\n', '"text" must be a string'),
    ("stories.csv", b"text\nOnce upon a time\n", "must be .txt"),
])
def test_malformed_upload_fails_the_job_clearly(settings, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    job = jobs.run_inline(settings, "pretrain", {"corpus": {"file": str(path)}, **TINY})
    assert job["status"] == "failed"
    assert job["error"].startswith("ValueError") and message in job["error"], job["error"]
    assert not models.list_models(settings.store().db)


def test_missing_or_oversized_file_is_rejected_before_queueing(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r'Corpus file ".*nowhere.txt" does not exist'):
        PretrainParams.from_dict({"corpus": {"file": str(tmp_path / "nowhere.txt")}})
    with pytest.raises(ValueError, match="is not a file"):
        PretrainParams.from_dict({"corpus": {"file": str(tmp_path)}})
    big = tmp_path / "big.txt"
    big.write_text("Once upon a time. " * 100)
    monkeypatch.setattr(pretrain, "MAX_CORPUS_BYTES", 1000)
    with pytest.raises(ValueError, match="the limit is"):
        PretrainParams.from_dict({"corpus": {"file": str(big)}})


def test_hub_corpus_offline_says_it_could_not_be_loaded(settings, monkeypatch):
    # The build machines have no network; these flags only make the failure fast.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    job = jobs.run_inline(settings, "pretrain", {"corpus": {"hub": "story-arena-tests/no-such-stories"}, **TINY})
    assert job["status"] == "failed"
    assert 'The Hub dataset "story-arena-tests/no-such-stories" (split train) could not be loaded' in job["error"]


# --------------------------------------------------------------------------- parameters


def test_presets_and_overrides(txt_corpus):
    corpus = {"file": str(txt_corpus)}
    quick = PretrainParams.from_dict({"corpus": corpus})
    assert (quick.size, quick.preset, quick.block_size) == ("small", "quick", 256)
    assert quick.max_steps == pretrain.PRESETS["small"]["quick"]["max_steps"] and quick.arena_every is None
    full = PretrainParams.from_dict({"corpus": corpus, "size": "base", "preset": "full", "max_steps": 7})
    assert full.max_steps == 7 and full.block_size == 512 and full.vocab_size == 16000
    assert full.budget["eval_tokens"] == pretrain.PRESETS["base"]["full"]["eval_tokens"]
    hub = PretrainParams.from_dict({"corpus": {"hub": "roneneldan/TinyStories", "split": "validation"}})
    assert hub.corpus == {"hub": "roneneldan/TinyStories", "split": "validation"}


@pytest.mark.parametrize("params, message", [
    ({}, "Choose a corpus"),
    ({"corpus": "stories.txt"}, "corpus must be an object"),
    ({"corpus": {}}, "exactly one of file, hub or distill"),
    ({"corpus": {"file": "a.txt", "hub": "x/y"}}, "exactly one of file, hub or distill"),
    ({"corpus": {"hub": "x/y", "column": "text"}}, r"Unknown corpus key\(s\) for a hub corpus: column"),
    ({"corpus": {"hub": ""}}, "corpus hub must be a non-empty string"),
    ({"corpus": {"distill": "three"}}, "corpus distill .a policy id. must be a whole number"),
    ({"corpus": {"distill": 1}, "epochs": 3}, r"Unknown pretrain parameter\(s\): epochs"),
    ({"corpus": {"distill": 1}, "size": "huge"}, "size must be one of small, base, got 'huge'"),
    ({"corpus": {"distill": 1}, "preset": "slow"}, "preset must be one of quick"),
    ({"corpus": {"distill": 1}, "max_steps": 0}, "max_steps must be between 1 and"),
    ({"corpus": {"distill": 1}, "max_steps": 2.5}, "max_steps must be a whole number"),
    ({"corpus": {"distill": 1}, "learning_rate": 0}, r"learning_rate must be in \(0, 0.1\]"),
    ({"corpus": {"distill": 1}, "batch_size": True}, "batch_size must be a whole number"),
    ({"corpus": {"distill": 1}, "block_size": 8}, "block_size must be between 32 and 2048"),
    ({"corpus": {"distill": 1}, "vocab_size": 100}, "vocab_size must be between 300 and 65536"),
    ({"corpus": {"distill": 1}, "eval_fraction": 0.9}, r"eval_fraction must be in \(0, 0.5\]"),
    ({"corpus": {"distill": 1}, "arena_every": 0}, "arena_every must be between 1 and"),
    ({"corpus": {"distill": 1}, "name": "bad name!"}, "name: 1-60 letters"),
    ("corpus", "must be a JSON object"),
])
def test_bad_params_are_rejected_with_clear_messages(params, message):
    with pytest.raises(ValueError, match=message):
        PretrainParams.from_dict(params)
