"""The benches still run: `python -m bench.run --quick --json` on its cheapest parts.

The voting bench starts two servers and takes minutes, so it is left to the full quick run.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT, clean_env


def test_quick_run_prints_one_json_document_with_every_part():
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--json", "--only", "first_start,storage,generation"],
        cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)
    assert document["quick"] is True and document["failed"] == {}
    assert set(document["benches"]) == set(document["headlines"]) == {"first_start", "storage", "generation"}

    first_start = document["headlines"]["first_start"]
    assert first_start["starter"] == "tiny"
    assert 0 < first_start["page_answers_s"] <= first_start["first_votable_pair_s"]

    storage = document["benches"]["storage"]
    assert [row["votes"] for row in storage["table"]] == [1000, 10000]
    for row in storage["table"]:
        assert row["select_ms_median"] > 0 and row["write_ms_median"] > 0 and row["durable_votes_per_s"] > 0
    assert set(storage["largest_over_smallest"]) == {"select_ms_median", "select_ms_p99", "write_ms_median", "write_ms_p99"}
    assert storage["policy_pairs_match_votes"] is True
    assert storage["full_scans"] == [], storage["full_scans"]

    generation = document["benches"]["generation"]
    assert generation["model"] == "tiny"
    assert set(generation["speedup_vs_batch_1"]) == {"1", "4"} and generation["speedup_vs_batch_1"]["1"] == 1.0
