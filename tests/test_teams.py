"""TeaMs-RL prompt evolution (rlhf.teams): the rule-based operations, the reward's validity
and novelty checks, the instructor learning the rewarding operation in a synthetic
environment, the `teams` job through the CLI (lineage stored, stories queued beyond
--pool-prompts), the prompt-source filters of pair selection and RLOO, and the Prompts tab."""

from __future__ import annotations

import json
import random
import zlib

import numpy as np
import pytest

from rlhf import arena, teams
from rlhf.jobs import job_function
from rlhf.prompts import SEED_PROMPTS, required_words
from rlhf.story_features import words
from rlhf.teams import (
    OPERATIONS,
    Instructor,
    RandomInstructor,
    RuleExecutor,
    TeamsParams,
    clean_answer,
    distinct_n,
    evolve,
    invalid_reason,
    judge,
    mean_pairwise_distance,
    normalized,
    queries_to_reach,
)
from storage import annotators, completions, models, prompts
from storage import jobs as job_rows
from tests.conftest import tiny_settings

SEEDS = list(SEED_PROMPTS[:12])
VOCABULARY = sorted({w for p in SEED_PROMPTS for w in words(p) if len(w) > 3})


def bag_encoder(texts) -> np.ndarray:
    """A tiny deterministic encoder: hashed words and word pairs, unit length."""
    out = np.zeros((len(texts), 256), dtype=np.float32)
    for row, text in enumerate(texts):
        tokens = words(text)
        for feature in tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]:
            out[row, zlib.crc32(feature.encode()) % 256] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms == 0, 1, norms)


# --- operations (rule-based executor) -------------------------------------------------------

def test_rule_operations_each_change_the_prompt_their_own_way():
    plain = "Write a short story about a robot who wants a hug."
    ex = RuleExecutor(seed=3)
    out = dict(zip(OPERATIONS, ex([plain] * len(OPERATIONS), list(OPERATIONS))))
    assert ex.queries == len(OPERATIONS)
    assert len(set(out.values())) == len(OPERATIONS) and plain not in out.values()
    assert "robot" not in out["breadth"] and out["breadth"].startswith(("Write", "Once", "Tell", "Imagine", "Can",
                                                                        "For"))
    assert len(required_words(out["constraints"])) == 3 and out["constraints"].startswith(plain)
    for op in ("deepening", "concretizing", "reasoning", "complicate_input"):
        assert out[op].startswith(plain) and teams.OPERATION_MARKERS[op].search(out[op]), op
    # a second constraint is a point of view or a length; with both there is nothing left to add
    twice = ex.apply(out["constraints"], "constraints")
    assert teams.VIEWPOINT_MARKER.search(twice) and ex.apply(twice, "constraints") == twice
    assert ex.apply(out["complicate_input"], "complicate_input") == out["complicate_input"]


def test_rule_executor_is_deterministic_given_its_seed():
    ops = [OPERATIONS[i % len(OPERATIONS)] for i in range(24)]
    first, again, other = (RuleExecutor(seed)(SEEDS * 2, ops) for seed in (7, 7, 8))
    assert first == again and first != other


def test_clean_answer_takes_the_first_paragraph_without_labels_or_quotes():
    assert clean_answer('New prompt: "Write a story about a frog.\nwho sings"\n\nExplanation: more.') == \
        "Write a story about a frog. who sings"
    assert clean_answer("#Rewritten Prompt#: Write a tale.") == "Write a tale."
    assert clean_answer("   \n\n") == ""


def test_policy_executor_asks_the_expert_and_counts_queries(arena_dir):
    from rlhf.generate import Decoding
    from rlhf.models import load_causal_lm

    settings, store = arena_dir
    model, tokenizer = load_causal_lm(models.list_models(store.db)[0].source, "cpu")
    ex = teams.PolicyExecutor(model, tokenizer, Decoding(max_new_tokens=8), batch_size=3, seed=1)
    out = ex(SEEDS[:3], ["breadth", "deepening", "reasoning"])
    assert ex.queries == 3 and len(out) == 3 and all(isinstance(t, str) for t in out)
    assert teams.expert_request("deepening", "P.").startswith("Task: " + teams.EXPERT_INSTRUCTIONS["deepening"])


# --- reward -----------------------------------------------------------------------------------

def test_invalid_prompts_are_named():
    known = {normalized(SEEDS[0])}
    assert invalid_reason("   ", "breadth", known, 500) == "empty"
    assert invalid_reason("Write a tale.", "breadth", known, 500) == "too_short"
    assert invalid_reason("Write " + "a very long tale " * 40, "breadth", known, 500) == "too_long"
    assert invalid_reason(SEEDS[0].upper().replace(".", " !"), "breadth", known, 500) == "copy"
    assert invalid_reason("Here is the new prompt: write about a cat on a boat.", "breadth", known, 500) == "leak"
    echoed = "Write about a fox. " + teams.EXPERT_INSTRUCTIONS["concretizing"]
    assert invalid_reason(echoed, "concretizing", known, 500) == "leak"
    assert invalid_reason("The fox baked bread for the moon, and the moon smiled.", "breadth", known, 500) == \
        "not_a_prompt"  # a story, not a request for one
    looping = "Write a story about a tail full of bells, a tail full of bells, a tail full of bells, a tail."
    assert invalid_reason(looping, "breadth", known, 500) == "loop"
    assert invalid_reason("Write babasure mostlykitezygu p\ufffd kitten itear verp le", "breadth", known, 500) == \
        "not_words"
    assert invalid_reason("Write a story about a fox who bakes bread for the moon.", "breadth", known, 500) is None


def test_reward_is_novelty_above_the_threshold_and_zero_otherwise():
    existing = bag_encoder(SEEDS)
    known = {normalized(t) for t in SEEDS}
    near = SEEDS[0] + " Keep it short."
    far = "Write a story about a narwhal detective who solves riddles under the polar ice."
    for text, accepted in ((near, False), (far, True)):
        verdict = judge(text, "breadth", bag_encoder([text])[0], existing, known, 0.3, 500)
        expected_novelty = 1 - float((existing @ bag_encoder([text])[0]).max())
        assert verdict.valid and verdict.novelty == pytest.approx(expected_novelty, abs=1e-6)
        assert verdict.accepted is accepted
        assert verdict.reward == (pytest.approx(expected_novelty, abs=1e-6) if accepted else 0.0)
    copy = judge(SEEDS[1], "breadth", existing[1], existing, known, 0.0, 500)
    assert (copy.valid, copy.reason, copy.reward) == (False, "copy", 0.0)


def test_diversity_measures():
    e = bag_encoder(SEEDS)
    brute = np.mean([1 - e[i] @ e[j] for i in range(len(e)) for j in range(i + 1, len(e))])
    assert mean_pairwise_distance(e) == pytest.approx(brute, abs=1e-5)
    assert mean_pairwise_distance(e[:1]) == 0.0
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3) and distinct_n(["a b", "c d"], 1) == 1.0
    assert queries_to_reach([0.1, 0.2, 0.4, 0.3], 0.35) == 2 and queries_to_reach([0.1], 0.5) is None


# --- the instructor -----------------------------------------------------------------------------

class OneGoodOperation:
    """A synthetic expert: only `good` yields a new prompt, every other operation a copy."""

    def __init__(self, good: str):
        self.good, self.queries, self.rng = good, 0, random.Random(0)

    def __call__(self, prompts, operations):
        self.queries += len(prompts)
        return [self._fresh() if op == self.good else prompt for prompt, op in zip(prompts, operations)]

    def _fresh(self) -> str:
        return f"Write a story about the {' '.join(self.rng.sample(VOCABULARY, 4))}."


def test_instructor_learns_to_prefer_the_rewarding_operation():
    instructor = Instructor(seed=0)  # the job's defaults
    run = evolve(SEEDS, OneGoodOperation("concretizing"), bag_encoder, instructor, budget=240, threshold=0.2,
                 episodes_per_round=8, steps_per_episode=2, seed=0)
    fresh = teams.state_features(SEEDS[0], [], 0, 2, 500)
    assert instructor.probabilities(fresh)[OPERATIONS.index("concretizing")] > 0.8
    late = run.chosen[-60:]
    assert late.count("concretizing") / len(late) > 0.7
    assert run.chosen[:16].count("concretizing") < 8  # it started uniform
    assert run.queries == 240 and len(run.evolved) == run.chosen.count("concretizing")

    baseline = RandomInstructor(0)
    random_run = evolve(SEEDS, OneGoodOperation("concretizing"), bag_encoder, baseline, budget=240, threshold=0.2,
                        episodes_per_round=8, steps_per_episode=2, seed=0)
    assert len(random_run.evolved) < len(run.evolved) / 2
    assert baseline.probabilities(fresh) == pytest.approx(np.full(len(OPERATIONS), 1 / len(OPERATIONS)))


def test_evolution_spends_exactly_the_budget_and_keeps_lineage():
    run = evolve(SEEDS, RuleExecutor(1), bag_encoder, RandomInstructor(1), budget=29, threshold=0.05,
                 episodes_per_round=4, steps_per_episode=3, seed=1)
    assert run.queries == 29 and len(run.chosen) == 29 and len(run.trajectory) == 30
    assert run.trajectory[-1] == pytest.approx(mean_pairwise_distance(run.embeddings), abs=1e-5)
    assert run.evolved and len(run.texts) == len(SEEDS) + len(run.evolved)
    for index, prompt in enumerate(run.evolved, start=len(SEEDS)):
        assert prompt.parent < index and prompt.operation in OPERATIONS and prompt.novelty >= 0.05
    with pytest.raises(ValueError, match="prompt set is empty"):
        evolve([], RuleExecutor(), bag_encoder, RandomInstructor(), 4, 0.1)


@pytest.mark.parametrize("params, message", [
    ({"budget": 0}, "budget must be between 1 and 100000"),
    ({"executor": "gpt"}, "executor must be one of policy, rules"),
    ({"instructor": "trpo"}, "instructor must be one of rl, random"),
    ({"threshold": 1.5}, "threshold must be in"),
    ({"max_steps": 3}, "Unknown teams parameter(s): max_steps"),
])
def test_bad_teams_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TeamsParams.from_dict(params)


def test_presets_set_the_budget():
    assert TeamsParams.from_dict({}).budget == teams.PRESETS["quick"]
    assert TeamsParams.from_dict({"preset": "full"}).budget == teams.PRESETS["full"]
    assert TeamsParams.from_dict({"preset": "full", "budget": 5}).budget == 5


# --- the job, the CLI and the story pool ------------------------------------------------------------

def test_cli_train_teams_grows_the_prompt_set_and_queues_stories(arena_dir, capfd, monkeypatch):
    from rlhf.__main__ import main
    from rlhf.settings import ENV_VARS

    for name in ENV_VARS.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(teams, "load_encoder", lambda settings: bag_encoder)
    settings, store = arena_dir
    before = prompts.prompt_count(store.db)
    capfd.readouterr()
    code = main(["train", "teams", "--budget", "16", "--json", "--data-dir", str(settings.data_dir),
                 "--starter", "tiny", "--pool-prompts", str(settings.pool_prompts),
                 "--set", "executor=rules", "--set", "episodes_per_round=4"])
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    result = json.loads(out)
    assert (result["kind"], result["status"], result["model_id"]) == ("teams", "succeeded", None)
    m = result["metrics"]
    assert m["queries"] == m["expert_queries"] == 16 and m["budget"] == 16 and m["expert"] == "rules"
    assert m["evolved"] == len(m["new_prompt_ids"]) > 0
    assert prompts.prompt_count(store.db) == before + m["evolved"] == m["diversity_after"]["prompts"]
    assert {"mean_pairwise_distance", "distinct_1", "distinct_2"} <= set(m["diversity_after"])
    assert sum(o["chosen"] for o in m["operations"].values()) == 16
    evolved = prompts.list_prompts(store.db, sources=["teams"])
    assert [p["id"] for p in evolved] == m["new_prompt_ids"]
    ids = {p["id"] for p in prompts.list_prompts(store.db)}
    assert all(p["parent_id"] in ids and p["parent_id"] < p["id"] and p["operation"] in OPERATIONS for p in evolved)

    # every active policy's pool is queued; the new prompts get stories although they lie
    # beyond the first --pool-prompts prompts
    active = [p.id for p in models.list_models(store.db, active_only=True)]
    queued = [j for j in job_rows.list_jobs(store.db, kind="generate") if j["id"] in m["generate_jobs"]]
    assert sorted(j["params"]["model_ids"][0] for j in queued) == sorted(active)
    for job in queued:
        job_function("generate")(settings, job["params"], lambda f, msg: None)
    for policy in active:
        assert not completions.prompts_without_completion(store.db, policy, settings.pool_prompts)
        covered = {c["prompt_id"] for c in store.db["completions"].rows_where("model_id = ?", [policy])}
        assert set(m["new_prompt_ids"]) <= covered and len(covered) == settings.pool_prompts + m["evolved"]


def test_teams_job_with_the_policy_expert(arena_dir, monkeypatch):
    from rlhf.jobs import run_inline
    from rlhf.runner import check_params

    monkeypatch.setattr(teams, "load_encoder", lambda settings: bag_encoder)
    settings, store = arena_dir
    job = run_inline(settings, "teams", {"budget": 4, "max_new_tokens": 8, "episodes_per_round": 2})
    assert job["status"] == "succeeded", job["error"]
    starter = next(m for m in models.list_models(store.db) if m.kind == "starter")
    assert (job["metrics"]["expert_queries"], job["metrics"]["expert"]) == (4, starter.name)
    with pytest.raises(ValueError, match="No expert policy with id 99"):
        check_params(store, "teams", {"expert": 99})


def test_a_requeued_teams_job_that_stored_its_prompts_adds_none_twice(arena_dir, monkeypatch):
    from rlhf.jobs import execute, run_inline

    monkeypatch.setattr(teams, "load_encoder", lambda settings: bag_encoder)
    settings, store = arena_dir
    job = run_inline(settings, "teams", {"budget": 8, "executor": "rules", "episodes_per_round": 4})
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["new_prompt_ids"]
    prompts_after, jobs_after = prompts.prompt_count(store.db), len(job_rows.list_jobs(store.db, limit=1000))
    job_rows.update_job(store.db, job["id"], status="running")  # killed after storing, then re-run
    again = execute(settings, job["id"])
    assert again["status"] == "succeeded" and again["metrics"] == job["metrics"]
    assert prompts.prompt_count(store.db) == prompts_after
    assert len(job_rows.list_jobs(store.db, limit=1000)) == jobs_after  # no pool queued twice


def test_budget_is_refused_cleanly_by_other_kinds(tmp_path, capfd, monkeypatch):
    from rlhf.__main__ import main
    from rlhf.settings import ENV_VARS

    for name in ENV_VARS.values():
        monkeypatch.delenv(name, raising=False)
    settings = tiny_settings(tmp_path / "data")
    settings.store()
    capfd.readouterr()
    code = main(["train", "weak", "--budget", "5", "--json", "--data-dir", str(settings.data_dir)])
    out, _ = capfd.readouterr()
    assert code == 1 and "Unknown weak parameter(s): budget" in json.loads(out)["error"]


# --- prompt-source filters --------------------------------------------------------------------------

def _evolved_with_stories(store) -> int:
    """One teams prompt (child of prompt 1) with a story from every active policy."""
    prompt_id = prompts.add_evolved_prompt(store.db, "Write a story about a yak who sings lullabies on a glacier.",
                                           1, "breadth")
    for policy in models.list_models(store.db, active_only=True):
        completions.add_completion(store.db, prompt_id, policy.id, f"A yak sang ({policy.name}).")
    return prompt_id


def test_pair_selection_keeps_to_the_chosen_prompt_sources(arena_dir):
    settings, store = arena_dir
    evolved = _evolved_with_stories(store)
    ann = annotators.sign_in(store.db, "Ann", "annotator")["id"]
    rng = random.Random(0)
    only_teams = {arena.next_pair(store, ann, rng, prompt_sources=("teams",)).pair.prompt_id for _ in range(5)}
    assert only_teams == {evolved}
    seed_only = {arena.next_pair(store, ann, rng, prompt_sources=("seed",)).pair.prompt_id for _ in range(20)}
    assert evolved not in seed_only and seed_only
    assert arena.next_pair(store, ann, rng, prompt_sources=("user",)) is None


def test_pair_prompt_sources_setting():
    import argparse

    from rlhf.settings import add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_args(parser.parse_args([]), {}).pair_prompt_sources is None
    chosen = from_args(parser.parse_args(["--pair-prompt-sources", "teams, seed"]), {})
    assert chosen.pair_prompt_sources == ("seed", "teams")
    with pytest.raises(ValueError, match="--pair-prompt-sources takes sources of seed, user, teams"):
        from_args(parser.parse_args(["--pair-prompt-sources", "wizard"]), {})


def test_rloo_trains_on_teams_prompts_only_when_asked(arena_dir):
    from rlhf.rloo import RlooParams, _prompt_split

    settings, store = arena_dir
    _evolved_with_stories(store)
    train, held_out = _prompt_split(store, "teams")
    assert train == ["Write a story about a yak who sings lullabies on a glacier."]
    assert held_out and all(p in SEED_PROMPTS for p in held_out)
    seed_train, _ = _prompt_split(store, "seed")
    assert train[0] not in seed_train
    assert RlooParams.from_dict({"base": 1, "reward_model": 2, "prompt_source": "teams"}).prompt_source == "teams"


# --- the Prompts tab -----------------------------------------------------------------------------------

def test_prompts_tab_shows_lineage_escaped_and_filters_by_source(store):
    from ui.prompts import lineage_html, prompts_html

    prompts.add_prompts(store.db, ["Write a story about <b>bold</b> cats."])
    child = prompts.add_evolved_prompt(store.db, "Write it as a letter <script>alert(1)</script>.", 1,
                                       "complicate_input")
    grandchild = prompts.add_evolved_prompt(store.db, "Write it as a letter, in the first person, now.", child,
                                            "constraints")
    table = prompts_html(store, "teams")
    assert "<script>" not in table and "&lt;script&gt;" in table and "complicate_input" in table
    assert "#1 Write a story about &lt;b&gt;bold&lt;/b&gt; cats." in table  # the parent column
    assert "first person" in table
    seeds_only = prompts_html(store, "seed")
    assert "letter" not in seeds_only and "&lt;b&gt;bold" in seeds_only
    assert "No prompts" in prompts_html(store, "user")
    chain = lineage_html(store, grandchild)
    assert chain.index("#1") < chain.index(f"#{child}") < chain.index(f"#{grandchild}")
    assert "<script>" not in chain and "constraints" in chain
    assert "No prompt with id 99" in lineage_html(store, 99)
