"""Reward-model held-out accuracy vs number of human labels, with and without weak labels.

Two data sets (--data):

- `hh` (default): real human preferences from Anthropic HH-RLHF (../shared/data, see its
  README). The pool is the 1% train sample (about 1,450 pairs); people "label" the first N
  of a seeded shuffle, the rest of the pool is unlabelled. The test pairs come from the
  helpful-base test split, minus every pair whose first human turn also opens a pool
  dialogue (bench.hh_rlhf.without_turns_of: the same question recurs across the splits),
  so no prompt is on both sides. HH-RLHF is dialogue, not stories: the reward model reads
  the last human turn as its prompt (so that the answer fits the encoder's window) and the
  answer as the story. LFs written for story prompts have little to say: required_words
  always abstains, ending and loops rarely fire; the others apply as they are.
- `stories`: simulated story preferences on real stories (bench.story_pairs: TinyStories
  with a required-words prompt each, paired with another real story or a truncated or
  looped copy; the hidden preference is rlhf.simulate.Oracle and the "people" are
  rlhf.simulate.Annotator with --annotator-accuracy, so some human labels are wrong).
  Pairs are split by prompt (rlhf.heldout.split_by_prompt); the test pairs are scored
  against the oracle's preference. The oracle and the LFs read overlapping features, so
  this is the easy case for weak supervision: an upper bound, not a claim about people.

In both, the arena's weak pipeline labels the unlabelled pool exactly as the `weak` job
does (rlhf.weak.label_pool and store_weak_labels on a real arena database) and the
reward job's option picks the training pairs (rlhf.training.weak_training_pairs:
threshold, weight by sampling). Every accuracy is rlhf.heldout.pairwise_report on the same
test pairs: accuracy with a 95% interval resampled over prompts, the number of held-out
prompts, and beside it (`heldout`, once: the pairs are the same for every run) the trivial
baselines (longer / shorter story wins, each story metric alone) that a model has to beat.
The LF accuracies in the output are against the hidden labels of the whole pool.

Reward model: the reward job's MiniLM backbone (all-MiniLM-L6-v2, reading prompt + "\\n\\n"
+ story as rlhf.scoring.reward_texts builds it) kept frozen, with a linear Bradley-Terry
head (L2-regularised logistic regression on embedding differences, both orders). Each
text is embedded once, so sizes x conditions x seeds fit in minutes on 2 CPU cores, where
fine-tuning MiniLM costs seconds per step; tests/test_weak.py runs the real reward job
with weak labels.

    python -m bench.weak_supervision [--seeds 3] [--sizes 0,50,100,200,500,1000,all]
    python -m bench.weak_supervision --data stories [--stories FILE] [--seeds 3]

Prints one JSON document and writes docs/weak_supervision.png (hh) or
docs/weak_supervision_stories.png (stories).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.hh_rlhf import read_pairs, report_records, without_turns_of
from bench.story_pairs import read_stories, story_pairs
from rlhf.export import preference_records
from rlhf.heldout import pairwise_report, split_by_prompt
from rlhf.simulate import Annotator, Oracle
from rlhf.training import weak_training_pairs
from rlhf.weak import (
    ABSTAIN,
    LF_NAMES,
    PREFER_A,
    WeakParams,
    label_matrix,
    label_pool,
    store_weak_labels,
)
from storage import completions, models, prompts, votes
from storage.db import Store
from storage.votes import ShownPair

REPO = Path(__file__).resolve().parent.parent

DATA = REPO.parent / "shared" / "data"
STORY_MAX_WORDS = 150  # prompt + story (+ a looped sentence) stay inside MiniLM's 256-token window


@dataclass
class Data:
    """Pool and test pairs as (prompt the reward model reads, better story, worse story);
    test_records are the test pairs as pairwise_report reads them (prompt = the split's
    prompt); annotator None: people label the pool as the data says."""

    pool: list[tuple[str, str, str]]
    test: list[tuple[str, str, str]]
    test_records: list[dict]
    annotator: Annotator | None
    oracle: Oracle | None
    info: dict


def hh_pairs(path: Path) -> list[dict]:
    """Parsed pairs, one per distinct last turn (the arena keeps one story per prompt and policy)."""
    seen, pairs = set(), []
    for pair in read_pairs(path):
        if pair["last_turn"] not in seen:
            seen.add(pair["last_turn"])
            pairs.append(pair)
    return pairs


def hh_data(pool_path: Path, test_path: Path, pool_pairs: int | None, test_pairs: int) -> Data:
    """HH-RLHF: the pool file, and test pairs whose first human turn opens no pool dialogue."""
    pool = hh_pairs(pool_path)[:pool_pairs]
    every_test = hh_pairs(test_path)
    test = without_turns_of(every_test, pool)
    random.Random(0).shuffle(test)
    test = test[:test_pairs]
    return Data(
        pool=[(p["last_turn"], p["chosen"], p["rejected"]) for p in pool],
        test=[(p["last_turn"], p["chosen"], p["rejected"]) for p in test],
        test_records=report_records(test), annotator=None, oracle=None,
        info={"pool": pool_path.name, "test": test_path.name, "pool_pairs": len(pool), "test_pairs": len(test),
              "test_pairs_dropped_for_a_pool_prompt": len(every_test) - len(without_turns_of(every_test, pool)),
              "labels": "people's (HH-RLHF)", "split": "test file minus pairs whose first human turn opens a pool "
                                                     "dialogue"})


def stories_data(path: Path, stories: int, test_fraction: float, test_pairs: int, annotator_accuracy: float,
                 oracle: Oracle, seed: int) -> Data:
    """Simulated preferences on real stories (bench.story_pairs), split by prompt."""
    texts = list(read_stories(path, oracle.min_words, STORY_MAX_WORDS))
    random.Random(seed).shuffle(texts)
    pairs = story_pairs(texts[:stories], oracle, seed)
    pool, test = split_by_prompt(pairs, test_fraction)
    test = test[:test_pairs]
    return Data(
        pool=[(r["prompt"], r["chosen"], r["rejected"]) for r in pool],
        test=[(r["prompt"], r["chosen"], r["rejected"]) for r in test],
        test_records=test, annotator=Annotator("sim", annotator_accuracy), oracle=oracle,
        info={"stories": path.name, "story_words": [oracle.min_words, STORY_MAX_WORDS], "pool_pairs": len(pool),
              "test_pairs": len(test), "pair_kinds (better first)": dict(Counter(
                  " > ".join(r["kinds"]) for r in pairs).most_common()),
              "labels": f"rlhf.simulate.Annotator, accuracy {annotator_accuracy:g}, against the hidden Oracle; "
                        "test pairs scored against the Oracle",
              "split": "rlhf.heldout.split_by_prompt"})


class Embedder:
    """Frozen MiniLM: mean-pooled, normalised embeddings of reward-model inputs, cached."""

    def __init__(self, max_length: int):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from rlhf.encoders import minilm_dir

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
        self.model = AutoModel.from_pretrained(str(minilm_dir())).eval()
        self.max_length = max_length
        self.cache: dict[tuple[str, str], np.ndarray] = {}

    def __call__(self, items: list[tuple[str, str]], batch: int = 32) -> np.ndarray:
        from rlhf.scoring import reward_texts

        todo = sorted({i for i in items if i not in self.cache}, key=lambda i: len(i[0]) + len(i[1]))
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            texts = reward_texts(self.tokenizer, "minilm", [p for p, _ in chunk], [s for _, s in chunk])
            encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                     return_tensors="pt")
            with self.torch.inference_mode():
                hidden = self.model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            pooled = self.torch.nn.functional.normalize(pooled, dim=-1).numpy()
            self.cache.update(zip(chunk, pooled))
        return np.stack([self.cache[i] for i in items])


def bradley_terry_head(embed: Embedder, records: list[dict], c: float):
    """Linear reward r = w . e(prompt, answer), fitted on chosen-minus-rejected (both orders)."""
    from sklearn.linear_model import LogisticRegression

    chosen = embed([(r["prompt"], r["chosen"]) for r in records])
    rejected = embed([(r["prompt"], r["rejected"]) for r in records])
    x = np.vstack([chosen - rejected, rejected - chosen])
    y = np.r_[np.ones(len(records)), np.zeros(len(records))]
    return LogisticRegression(C=c, fit_intercept=False, max_iter=2000).fit(x, y).coef_[0]


def heldout(embed: Embedder, w: np.ndarray, data: Data, seed: int) -> dict:
    """pairwise_report of the head's margin on the test pairs."""
    chosen = embed([(p, g) for p, g, _ in data.test]) @ w
    rejected = embed([(p, b) for p, _, b in data.test]) @ w
    return pairwise_report(data.test_records, (chosen - rejected).tolist(), seed)


def build_arena(folder: Path, data: Data, pool: list[tuple[str, str, str]], humans: int,
                rng: random.Random) -> tuple[Store, dict]:
    """An arena database: two 'policies' wrote the pool's answers (sides at random), people
    voted on the first `humans` pairs (as the data says, or as data.annotator chooses).
    Returns the store and the hidden truth per pair (completion id of the better answer,
    keyed by the pair's completion ids)."""
    store = Store(folder / "arena.db")
    db = store.db
    db.execute("PRAGMA synchronous = OFF")  # a throwaway database: no fsync per insert
    x = models.add_model(db, "hh-x", "local", path="/none/x").id
    y = models.add_model(db, "hh-y", "local", path="/none/y").id
    prompts.add_prompts(db, [p for p, _, _ in pool], source="user")
    prompt_ids = {r["text"]: r["id"] for r in db.query("SELECT id, text FROM prompts")}
    truth: dict[tuple[int, int], int] = {}
    for i, (prompt, good, bad) in enumerate(pool):
        good_model, bad_model = (x, y) if rng.random() < 0.5 else (y, x)
        pid = prompt_ids[prompt]
        good_id = completions.add_completion(db, pid, good_model, good)
        bad_id = completions.add_completion(db, pid, bad_model, bad)
        truth[(min(good_id, bad_id), max(good_id, bad_id))] = good_id
        if i < humans:
            pair = ShownPair(pid, good_id, bad_id, good_model, bad_model, time.time())
            if rng.random() < 0.5:
                pair = ShownPair(pid, bad_id, good_id, bad_model, good_model, time.time())
            text_a, text_b = (good, bad) if pair.completion_a == good_id else (bad, good)
            choice = ("a" if pair.completion_a == good_id else "b") if data.annotator is None else \
                data.annotator.choose(data.oracle, prompt, text_a, text_b, rng)
            votes.record_vote(db, pair, annotator_id=None, choice=choice, client_key=f"h{i}")
    return store, truth


def vote_accuracy(store: Store, truth: dict, source: str) -> float | None:
    """Share of stored votes of one source (human or weak) that chose the hidden truth's
    better answer."""
    rows = [(r["completion_a"], r["completion_b"], r["choice"]) for r in votes.preference_rows(store.db, (source,))
            if r["choice"] in ("a", "b")]
    right = [truth[(min(a, b), max(a, b))] == (a if choice == "a" else b) for a, b, choice in rows]
    return float(np.mean(right)) if right else None


def lf_truth_accuracy(pool: list[tuple[str, str, str]]) -> list[dict]:
    """Each LF's coverage and accuracy on the whole pool against the hidden human labels
    (story A = the chosen answer, so a correct vote is PREFER_A)."""
    matrix = label_matrix(pool)
    out = []
    for j, name in enumerate(LF_NAMES):
        voted = matrix[:, j] != ABSTAIN
        out.append({"lf": name, "coverage": round(float(voted.mean()), 3),
                    "accuracy": round(float((matrix[voted, j] == PREFER_A).mean()), 3) if voted.any() else None})
    return out


def majority_vote_vs_truth(pool: list[tuple[str, str, str]]) -> dict:
    """The same LFs combined by a plain majority vote (Snorkel's MajorityLabelVoter, ties
    abstain) on the whole pool, against the hidden labels: what the label model could reach
    if it weighed the LFs equally. The label model assumes LFs independent given the label;
    LFs that fire together (a looped story trips loops, repetition and type-token ratio at
    once) break that assumption, and this is the reference to read its accuracy against."""
    from snorkel.labeling.model import MajorityLabelVoter

    matrix = label_matrix(pool)
    predicted = MajorityLabelVoter(cardinality=2).predict(matrix, tie_break_policy="abstain")
    voted = predicted != ABSTAIN
    return {"coverage": round(float(voted.mean()), 3),
            "accuracy": round(float((predicted[voted] == PREFER_A).mean()), 3) if voted.any() else None}


def plot(rows: list[dict], path: Path, title: str, best_baseline: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label, marker in (("human_only", "human labels only", "o"), ("with_weak", "human + weak labels", "s")):
        points = [(r["human_labels"], r[key]) for r in rows if r[key] is not None]
        xs = [max(n, 10) for n, _ in points]  # log axis: weak labels alone plotted at 10
        ax.errorbar(xs, [v["mean"] for _, v in points], yerr=[v["sd"] for _, v in points], marker=marker,
                    capsize=3, label=label)
    ax.set_xscale("log")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.axhline(best_baseline["accuracy"], color="firebrick", lw=0.8, ls="--",
               label=f'best trivial baseline: {best_baseline["name"]}')
    ax.set_xlabel("human-labelled pairs (10 = none: weak labels alone)")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_summary(reports: list[dict]) -> dict | None:
    """Accuracy over seeds (mean, sd) and each run's accuracy, interval and verdict."""
    if not reports:
        return None
    values = [r["accuracy"] for r in reports]
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values)), 4),
            "runs": [{k: r[k] for k in ("accuracy", "ci95", "verdict")} for r in reports]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["hh", "stories"], default="hh",
                        help="HH-RLHF human preferences, or simulated preferences on real stories")
    parser.add_argument("--pool", type=Path, default=DATA / "dfki_hh-rlhf_train_sample_1pct.jsonl", help="hh pool")
    parser.add_argument("--test", type=Path, default=DATA / "helpful-base_test.jsonl.gz", help="hh test pairs")
    parser.add_argument("--stories", type=Path, default=DATA / "tinystories_sample2000.jsonl",
                        help="stories: JSON lines with a text field")
    parser.add_argument("--story-count", type=int, default=900, help="stories: stories drawn (one prompt each)")
    parser.add_argument("--test-fraction", type=float, default=0.3, help="stories: share of prompts held out")
    parser.add_argument("--annotator-accuracy", type=float, default=0.9,
                        help="stories: chance a simulated person votes as the oracle")
    parser.add_argument("--test-pairs", type=int, default=400)
    parser.add_argument("--sizes", help="human-labelled pool pairs per run (default: hh 0,50,100,200,500,1000,all; "
                                        "stories 0,25,50,100,200,all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.8, help="reward job weak_threshold")
    parser.add_argument("--weight", type=float, default=1.0, help="reward job weak_weight")
    parser.add_argument("--c", type=float, default=1.0, help="inverse L2 strength of the linear head")
    parser.add_argument("--max-length", type=int, default=256, help="MiniLM tokens per text (the job's minilm default)")
    parser.add_argument("--plot", type=Path, help="figure path (default: docs/weak_supervision[_stories].png)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--pool-pairs", type=int, help="hh: use only the first N pool pairs (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="CI size: hh 300 pool and 100 test pairs, stories 240 stories; sizes 50 and all, "
                             "one seed, no plot")
    args = parser.parse_args(argv)
    stories = args.data == "stories"
    if args.sizes is None:
        args.sizes = "0,25,50,100,200,all" if stories else "0,50,100,200,500,1000,all"
    if args.quick:
        args.pool_pairs, args.story_count, args.test_pairs, args.sizes, args.seeds = 300, 240, 100, "50,all", 1
        args.no_plot = True
    plot_path = None if args.no_plot else args.plot or REPO / "docs" / (
        "weak_supervision_stories.png" if stories else "weak_supervision.png")
    started = time.perf_counter()

    if stories:
        data = stories_data(args.stories, args.story_count, args.test_fraction, args.test_pairs,
                            args.annotator_accuracy, Oracle(), seed=0)
    else:
        data = hh_data(args.pool, args.test, args.pool_pairs, args.test_pairs)
    pool = data.pool
    sizes = [len(pool) if s == "all" else int(s) for s in args.sizes.split(",")]
    embed = Embedder(args.max_length)
    print(f"{len(pool)} pool pairs, {len(data.test)} test pairs; embedding", file=sys.stderr, flush=True)
    embed([(p, a) for p, g, b in pool + data.test for a in (g, b)])
    print(f"embedded in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    results: dict[int, dict[str, list]] = {n: {"human_only": [], "with_weak": [], "weak_pairs": [],
                                               "weak_accuracy": [], "label_model_on_humans": [],
                                               "human_label_accuracy": []} for n in sizes}
    work = Path(tempfile.mkdtemp(prefix="weak-bench-"))
    try:
        for seed in range(args.seeds):
            order = pool[:]
            random.Random(seed).shuffle(order)
            for n in sizes:
                store, truth = build_arena(work / f"s{seed}-n{n}", data, order, n, random.Random(seed))
                labelling = label_pool(store, WeakParams(threshold=args.threshold, seed=seed))
                store_weak_labels(store, labelling, args.threshold)
                humans = list(preference_records(store, sources=("human",)))
                weak_records = weak_training_pairs(store, args.threshold, args.weight, seed=seed)
                row = results[n]
                if humans:
                    row["human_only"].append(heldout(embed, bradley_terry_head(embed, humans, args.c), data, seed))
                    row["human_label_accuracy"].append(vote_accuracy(store, truth, "human"))
                if weak_records:
                    row["with_weak"].append(heldout(embed, bradley_terry_head(embed, humans + weak_records, args.c),
                                                    data, seed))
                row["weak_pairs"].append(len(weak_records))
                row["weak_accuracy"].append(vote_accuracy(store, truth, "weak"))
                row["label_model_on_humans"].append(labelling.report["label_model_accuracy"])
                store.db.conn.close()
                print(f"seed {seed} n {n}: human {[r['accuracy'] for r in row['human_only'][-1:]]} "
                      f"weak {[r['accuracy'] for r in row['with_weak'][-1:]]} ({len(weak_records)} weak pairs)",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for n in sizes:
        r = results[n]
        rows.append({
            "human_labels": n,
            "human_only": run_summary(r["human_only"]),
            "with_weak": run_summary(r["with_weak"]),
            "weak_pairs": round(float(np.mean(r["weak_pairs"])), 1),
            "human_label_accuracy": _mean(r["human_label_accuracy"]),
            "weak_label_accuracy": _mean(r["weak_accuracy"]),
            "label_model_accuracy_on_human_votes": _mean(r["label_model_on_humans"]),
        })
    reference = pairwise_report(data.test_records, [0.0] * len(data.test_records))
    title = (f"{'TinyStories, simulated preferences' if stories else 'HH-RLHF'}, frozen MiniLM + linear head "
             f"({args.seeds} seeds, {len(data.test)} test pairs)\n"
             f"weak labels: threshold {args.threshold:g}, weight {args.weight:g}; "
             f"best baseline {reference['best_baseline']['accuracy']:.2f}")
    if plot_path is not None:
        plot(rows, plot_path, title, reference["best_baseline"])
    print(json.dumps({
        "data": {"set": args.data, **data.info},
        "heldout": {k: reference[k] for k in ("pairs", "prompts", "baselines", "best_baseline")},
        "reward_model": "frozen all-MiniLM-L6-v2 mean-pooled + linear Bradley-Terry head",
        "threshold": args.threshold, "weight": args.weight, "c": args.c, "max_length": args.max_length,
        "seeds": args.seeds, "results": rows, "lfs_vs_hidden_labels": lf_truth_accuracy(pool),
        "majority_vote_vs_hidden_labels": majority_vote_vs_truth(pool),
        "plot": str(plot_path) if plot_path else None, "seconds": round(time.perf_counter() - started, 1),
    }, indent=1))
    return 0


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(np.mean(present)), 4) if present else None


if __name__ == "__main__":
    sys.exit(main())
