"""The benches still run: `python -m bench.run --quick --json` on its cheapest parts.

The voting and training-cost benches take minutes (two servers; every training kind), so
they are left to the full quick run. The closed loop runs here: it is the one end-to-end
check that votes -> reward -> RLOO/DPO/DPH/RAFT -> new policies -> stories works in one process.
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
