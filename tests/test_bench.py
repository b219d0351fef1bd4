"""The benches still run: `python -m bench.run --quick --json` on its cheapest parts.

The voting and training-cost benches take minutes (two servers; every training kind), so
they are left to the full quick run. The closed loop runs here: it is the one end-to-end
check that votes -> reward -> RLOO/DPO/DPH/RAFT -> new policies -> stories works in one process;
BabyStories runs the same loop from two models pretrained from scratch. The benches' own
data helpers (the prompt-disjoint HH-RLHF split, the story pairs) are tested on small fixtures.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT, clean_env


def test_quick_run_prints_one_json_document_with_every_part():
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--json",
         "--only", "first_start,live_battle,storage,generation,stories,closed_loop"],
        cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)
    assert document["quick"] is True and document["failed"] == {}
    assert set(document["benches"]) == set(document["headlines"]) == {
        "first_start", "live_battle", "storage", "generation", "stories", "closed_loop"}

    first_start = document["headlines"]["first_start"]
    assert first_start["starter"] == "tiny"
    assert 0 < first_start["page_answers_s"] <= first_start["first_votable_pair_s"]

    live = document["benches"]["live_battle"]
    assert live["starter"] == "tiny" and len(live["rounds"]) == 2
    for row in live["rounds"]:
        assert 0 < row["first_token_s"] <= row["both_stories_s"] and all(0 < t <= 16 for t in row["tokens"])

    storage = document["benches"]["storage"]
    assert [row["votes"] for row in storage["table"]] == [1000, 10000]
    for row in storage["table"]:
        assert row["select_ms_median"] > 0 and row["write_ms_median"] > 0 and row["durable_votes_per_s"] > 0
    assert set(storage["largest_over_smallest"]) == {
        "select_ms_median", "select_ms_p99", "write_ms_median", "write_ms_p99"}
    assert storage["policy_pairs_match_votes"] is True
    assert storage["full_scans"] == [], storage["full_scans"]

    generation = document["benches"]["generation"]
    assert generation["model"] == "tiny"
    assert set(generation["speedup_vs_batch_1"]) == {"1", "4"} and generation["speedup_vs_batch_1"]["1"] == 1.0
    two = generation["two_policies"]
    assert two["separate_tokens_per_s"] > 0 and two["one_call_tokens_per_s"] > 0 and two["one_call_speedup"] > 0
    assert generation["dtype"] in ("torch.float32", "torch.bfloat16")
    for row in generation["dtypes"].values():
        assert "torch.float32" in row["tokens_per_s"] and row["speedup_vs_float32"] > 0

    stories = document["benches"]["stories"]
    assert stories["starter"] == "tiny" and stories["prompts"] == 8
    assert set(stories["policies"]) == {"tiny-t0.7", "tiny-t1.0"}
    for row in stories["policies"].values():
        assert row["stories"] == 8 and row["tokens_per_s"] > 0
        for share in ("ending", "loop", "truncated"):
            low, high = row[share]["ci95"]
            assert 0.0 <= low <= row[share]["share"] <= high <= 1.0
        assert row["truncated"]["share"] > 0  # a random 2-layer model rarely stops within 32 tokens
        assert 0 < row["mean_tokens"]["mean"] <= 32.0

    loop = document["benches"]["closed_loop"]
    assert loop["starter"] == "tiny" and loop["votes"]["votes"] > 0
    assert loop["reward"]["votes_used"] > 0
    assert set(loop["methods"]) == {"rloo", "dpo", "dph-bo4", "rm-bo4", "raft"}
    for method in loop["methods"].values():
        # A random model's story can fail the content check (rlhf.safety) and is then kept out.
        assert loop["eval_prompts"] // 2 < method["pairs"] <= loop["eval_prompts"]
        low, high = method["ci95"]
        assert 0.0 <= low <= method["win_rate"] <= high <= 1.0
        assert method["wins"] + method["losses"] + method["ties"] == method["pairs"]
        assert method["kl"] >= 0.0 and isinstance(method["minutes"], float)
    # The reward-model best-of-4 policy is its parent's weights; RAFT changed them.
    assert loop["methods"]["rm-bo4"]["kl"] == 0.0 and loop["methods"]["rm-bo4"]["kl_best_of_k_bound"] > 0
    assert loop["methods"]["raft"]["kl"] > 0 and loop["methods"]["raft"]["steps"] > 0
    assert loop["methods"]["raft"]["metrics"]["kept"] > 0


def test_closed_loop_refuses_unknown_methods():
    done = subprocess.run([sys.executable, "-m", "bench.closed_loop", "--methods", "raft,ppo"],
                          cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--methods: unknown ppo; choose from rloo, dpo" in done.stderr


def test_rounds_quick_runs_two_rounds_that_decide():
    """`python -m bench.rounds --quick`: votes fire each round, its jobs run, votes decide it."""
    done = subprocess.run([sys.executable, "-m", "bench.rounds", "--quick"],
                          cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["starter"] == "tiny" and [r["round"] for r in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        assert row["status"] == "decided" and row["votes_cast"] >= report["votes_per_round"]
        assert row["reward_model"]["heldout_prompts"] > 0 and row["votes_used"] >= report["votes_per_round"]
        (child,) = row["children"]
        assert child["decision"] in ("promoted", "retired") and child["votes"] >= report["recipe"]["min_votes"]
        assert 0.0 <= child["ci95"][0] <= child["win_rate"] <= child["ci95"][1] <= 1.0
        assert isinstance(row["minutes"], float)
        versus = row["champion_vs_starter"]
        assert versus is None if row["champion"] == report["starter_policy"] else versus["pairs"] > 0
    assert len(report["champion_history"]) == 3


def test_the_rounds_bench_judges_the_champion_on_a_copy_of_the_arena(arena_dir):
    """Held-out stories are written to a copy: the arena never serves (or trains on) them."""
    from bench.rounds import against_starter
    from rlhf.simulate import Oracle
    from storage import models, prompts

    settings, store = arena_dir
    starter = models.list_models(store.db)[0]
    champion = models.add_model(store.db, "champion", "raft", path=starter.path, parent_id=starter.id,
                                decoding={"temperature": 1.0})
    eval_ids = [p["id"] for p in prompts.list_prompts(store.db)[settings.pool_prompts:settings.pool_prompts + 4]]
    result = against_starter(settings, champion.id, starter.id, settings.pool_prompts, eval_ids,
                             Oracle(min_words=4, max_words=40), 0, "judge")
    assert result["pairs"] > 0 and 0.0 <= result["ci95"][0] <= result["win_rate"] <= result["ci95"][1] <= 1.0
    marks = ", ".join("?" * len(eval_ids))
    assert store.db.execute(f"SELECT count(*) FROM completions WHERE prompt_id IN ({marks})",
                            eval_ids).fetchone()[0] == 0
    assert not (settings.data_dir.parent / "judge").exists()


def test_babystories_quick_pretrains_both_sizes_and_runs_the_loop_from_each():
    done = subprocess.run([sys.executable, "-m", "bench.babystories", "--quick"],
                          cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    small, base = report["sizes"]["small"], report["sizes"]["base"]
    assert base["parameters"] > small["parameters"] > 0  # the two GPT-2 shapes, from scratch
    for row in (small, base):
        assert row["pretrain_steps"] == 10 and row["eval_perplexity"] > 0
        assert row["votes"]["votes"] > 0 and row["method"] == "raft" and row["steps"] > 0 and row["kl"] > 0
        assert report["eval_prompts"] // 2 < row["pairs"] <= report["eval_prompts"]
        low, high = row["ci95"]
        assert 0.0 <= low <= row["win_rate"] <= high <= 1.0 and low < high
        assert row["wins"] + row["losses"] + row["ties"] == row["pairs"]
        assert row["oracle_score_gain"] == round(row["oracle_score_child"] - row["oracle_score_parent"], 3)
    difference = report["base_minus_small"]
    assert difference["win_rate"] == round(base["win_rate"] - small["win_rate"], 3)
    assert difference["oracle_score_gain"] == round(base["oracle_score_gain"] - small["oracle_score_gain"], 3)
    overlap = base["ci95"][0] <= small["ci95"][1] and small["ci95"][0] <= base["ci95"][1]
    assert difference["answer"].startswith("no answer") == overlap


def hh_record(first: str, last: str | None = None, good: str = "Sure, here it is.", bad: str = "No.") -> dict:
    turns = f"\n\nHuman: {first}" + (f"\n\nAssistant: Tell me more.\n\nHuman: {last}" if last else "")
    return {"chosen": f"{turns}\n\nAssistant: {good}", "rejected": f"{turns}\n\nAssistant: {bad}"}


def test_hh_pairs_are_held_out_by_their_first_human_turn():
    from bench.hh_rlhf import split_by_first_turn, split_dialogue, without_turns_of

    pair = split_dialogue(**hh_record("How do I bake bread?", "And without yeast?"))
    assert pair["first_turn"] == "How do I bake bread?" and pair["last_turn"] == "And without yeast?"
    # The same opening question, continued differently: never on both sides of the split.
    pairs = [split_dialogue(**hh_record(f"Question {i % 10}?", f"Follow-up {i}?")) for i in range(60)]
    train, held_out = split_by_first_turn(pairs, 0.3)
    assert train and held_out and len(train) + len(held_out) == 60
    assert not {p["first_turn"] for p in train} & {p["first_turn"] for p in held_out}
    test = [split_dialogue(**hh_record(t)) for t in ("question 3?", "  Question   3? ", "Something new?")]
    assert [p["first_turn"] for p in without_turns_of(test, pairs)] == ["Something new?"]


STORY = ("Tom had a little red boat. He took the boat to the pond every morning. The sun was warm and the "
         "water was calm. One day the wind blew the boat far away. Tom ran around the pond to find it. "
         "A kind duck pushed the boat back to him. Tom said thank you and hugged his boat. They played "
         "until the sun went down, and then Tom went home happy.")


def test_story_pairs_degrade_real_stories_and_follow_the_oracle(tmp_path):
    import random

    from bench.story_pairs import looped, story_pairs, story_prompt, truncated
    from bench.weak_supervision import stories_data
    from rlhf.prompts import required_words
    from rlhf.simulate import Oracle
    from rlhf.story_features import has_ending, words
    from rlhf.story_metrics import LOOP_MIN_REPEATS, story_features

    rng = random.Random(0)
    asked = required_words(story_prompt(STORY, rng))
    assert len(asked) == 3 and set(asked) <= set(words(STORY))
    assert has_ending(STORY) and not has_ending(truncated(STORY, rng))
    assert story_features("", looped(STORY, rng)).max_sentence_repeats == LOOP_MIN_REPEATS

    names = ["Tom", "Mia", "Ben", "Lily", "Sam", "Zoe"]
    stories = [STORY.replace("Tom", names[i % 6]).replace("boat", ["boat", "kite", "ball"][i % 3])
               .replace("pond", ["pond", "park", "lake", "beach"][i % 4]) for i in range(60)]
    oracle = Oracle(min_words=20, max_words=120)
    pairs = story_pairs(stories, oracle, seed=0)
    assert len(pairs) > 20 and len({p["prompt"] for p in pairs}) == len(pairs)
    assert all(oracle.score(p["prompt"], p["chosen"]) > oracle.score(p["prompt"], p["rejected"]) for p in pairs)
    assert {kind for p in pairs for kind in p["kinds"]} == {"own", "other", "own-truncated", "own-looped",
                                                           "other-looped"}

    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories), encoding="utf-8")
    data = stories_data(path, 60, 0.3, 100, 0.8, oracle, seed=0)
    assert data.pool and data.test and len(data.test) == len(data.test_records)
    assert not {p for p, _, _ in data.pool} & {p for p, _, _ in data.test}  # held out by prompt
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in data.test_records] == data.test
