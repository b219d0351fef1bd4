"""Reward-model held-out accuracy vs number of human labels, with and without weak labels.

Data: real human preferences from Anthropic HH-RLHF (../shared/data, see its README). The
pool is the 1% train sample (about 1,450 pairs); people "label" the first N of a seeded
shuffle, and the rest of the pool is unlabelled: the arena's weak pipeline labels it
exactly as the `weak` job does (rlhf.weak.label_pool and store_weak_labels on a real
arena database) and the reward job's option picks the training pairs
(rlhf.weak.weak_training_pairs: threshold, weight by sampling). Accuracy is measured on
held-out pairs of the helpful-base test split, the same for every run.

HH-RLHF is dialogue, not stories. The prompt is the last human turn (so that the
assistant's answer fits in the encoder's window) and the story is the assistant's
answer. LFs written for story prompts have little to say: required_words always abstains
(no prompt asks for words), ending and loops rarely fire; the others (length,
readability, type-token ratio, repetition, prompt keywords, sentiment, meta talk, real
words) apply as they are. The LF accuracies in the output are against the hidden human
labels of the whole pool.

Reward model: the reward job's MiniLM backbone (all-MiniLM-L6-v2, reading prompt + "\\n\\n"
+ answer as rlhf.reward.reward_texts builds it) kept frozen, with a linear Bradley-Terry
head (L2-regularised logistic regression on embedding differences, both orders). Each
text is embedded once, so sizes x conditions x seeds fit in about 15 minutes on 2 CPU
cores, where fine-tuning MiniLM costs seconds per step; tests/test_weak.py runs the real
reward job with weak labels.

Reading the result: the stored weak labels agree with the hidden human labels of this pool
only about 54% of the time (length and keyword LFs help, readability hurts on dialogue),
yet they lift test accuracy on helpful-base, where longer, fuller answers win more often
than in the mixed helpful/harmless pool. So on HH the gain says the LFs carry a bias that
suits the test split, not that they are accurate; look at the per-LF accuracies too.

    python -m bench.weak_supervision [--seeds 3] [--sizes 0,50,100,200,500,1000,all]

Prints one JSON document and writes docs/weak_supervision.png.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.hh_rlhf import read_pairs
from rlhf.export import preference_records
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


def load_pairs(path: Path) -> list[tuple[str, str, str]]:
    """Parsed pairs, one per distinct prompt (the arena keeps one story per prompt and policy)."""
    seen, pairs = set(), []
    for pair in read_pairs(path):
        if pair["last_turn"] not in seen:
            seen.add(pair["last_turn"])
            pairs.append((pair["last_turn"], pair["chosen"], pair["rejected"]))
    return pairs


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


def accuracy(embed: Embedder, w: np.ndarray, test: list[tuple[str, str, str]]) -> float:
    chosen = embed([(p, g) for p, g, _ in test]) @ w
    rejected = embed([(p, b) for p, _, b in test]) @ w
    return float((chosen > rejected).mean())


def build_arena(folder: Path, pool: list[tuple[str, str, str]], humans: int, rng: random.Random) -> tuple[Store, dict]:
    """An arena database: two 'policies' wrote the pool's answers (sides at random), people
    voted on the first `humans` pairs. Returns the store and the hidden truth per pair
    (completion id of the better answer, keyed by the pair's completion ids)."""
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
            votes.record_vote(db, pair, annotator_id=None, choice="a" if pair.completion_a == good_id else "b",
                              client_key=f"h{i}")
    return store, truth


def weak_label_accuracy(store: Store, truth: dict) -> float | None:
    """Share of stored weak votes that chose the answer people preferred (hidden truth)."""
    rows = store.db.execute(
        "SELECT completion_a, completion_b, choice FROM votes WHERE source = 'weak'").fetchall()
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


def plot(rows: list[dict], path: Path, title: str) -> None:
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
    ax.set_xlabel("human-labelled pairs (10 = none: weak labels alone)")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_sd(values: list[float]) -> dict | None:
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values)), 4),
            "runs": values} if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, default=DATA / "dfki_hh-rlhf_train_sample_1pct.jsonl")
    parser.add_argument("--test", type=Path, default=DATA / "helpful-base_test.jsonl.gz")
    parser.add_argument("--test-pairs", type=int, default=400)
    parser.add_argument("--sizes", default="0,50,100,200,500,1000,all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.8, help="reward job weak_threshold")
    parser.add_argument("--weight", type=float, default=1.0, help="reward job weak_weight")
    parser.add_argument("--c", type=float, default=1.0, help="inverse L2 strength of the linear head")
    parser.add_argument("--max-length", type=int, default=256, help="MiniLM tokens per text (the job's minilm default)")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "weak_supervision.png")
    parser.add_argument("--pool-pairs", type=int, help="use only the first N pool pairs (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="CI size: 300 pool and 100 test pairs, sizes 50 and all, one seed, no plot")
    args = parser.parse_args(argv)
    if args.quick:
        args.pool_pairs, args.test_pairs, args.sizes, args.seeds, args.plot = 300, 100, "50,all", 1, None
    started = time.perf_counter()

    pool = load_pairs(args.pool)[: args.pool_pairs]
    test = load_pairs(args.test)
    random.Random(0).shuffle(test)
    test = test[: args.test_pairs]
    sizes = [len(pool) if s == "all" else int(s) for s in args.sizes.split(",")]
    embed = Embedder(args.max_length)
    print(f"{len(pool)} pool pairs, {len(test)} test pairs; embedding", file=sys.stderr, flush=True)
    embed([(p, a) for p, g, b in pool + test for a in (g, b)])
    print(f"embedded in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    results: dict[int, dict[str, list]] = {n: {"human_only": [], "with_weak": [], "weak_pairs": [],
                                               "weak_accuracy": [], "label_model_on_humans": []} for n in sizes}
    work = Path(tempfile.mkdtemp(prefix="weak-bench-"))
    try:
        for seed in range(args.seeds):
            order = pool[:]
            random.Random(seed).shuffle(order)
            for n in sizes:
                store, truth = build_arena(work / f"s{seed}-n{n}", order, n, random.Random(seed))
                labelling = label_pool(store, WeakParams(threshold=args.threshold, seed=seed))
                store_weak_labels(store, labelling, args.threshold)
                humans = list(preference_records(store, sources=("human",)))
                weak_records = weak_training_pairs(store, args.threshold, args.weight, seed=seed)
                row = results[n]
                if humans:
                    row["human_only"].append(accuracy(embed, bradley_terry_head(embed, humans, args.c), test))
                if weak_records:
                    row["with_weak"].append(accuracy(embed, bradley_terry_head(embed, humans + weak_records, args.c),
                                                     test))
                row["weak_pairs"].append(len(weak_records))
                row["weak_accuracy"].append(weak_label_accuracy(store, truth))
                row["label_model_on_humans"].append(labelling.report["label_model_accuracy"])
                store.db.conn.close()
                print(f"seed {seed} n {n}: human {row['human_only'][-1:]} weak {row['with_weak'][-1:]}"
                      f" ({len(weak_records)} weak pairs)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for n in sizes:
        r = results[n]
        weak_acc = [v for v in r["weak_accuracy"] if v is not None]
        on_humans = [v for v in r["label_model_on_humans"] if v is not None]
        rows.append({
            "human_labels": n,
            "human_only": mean_sd([round(v, 4) for v in r["human_only"]]),
            "with_weak": mean_sd([round(v, 4) for v in r["with_weak"]]),
            "weak_pairs": round(float(np.mean(r["weak_pairs"])), 1),
            "weak_label_accuracy": round(float(np.mean(weak_acc)), 4) if weak_acc else None,
            "label_model_accuracy_on_human_votes": round(float(np.mean(on_humans)), 4) if on_humans else None,
        })
    title = (f"HH-RLHF, frozen MiniLM + linear reward head ({args.seeds} seeds, {len(test)} test pairs)\n"
             f"weak labels: threshold {args.threshold:g}, weight {args.weight:g}")
    if args.plot is not None:
        plot(rows, args.plot, title)
    print(json.dumps({
        "data": {"pool": args.pool.name, "pool_pairs": len(pool), "test": args.test.name, "test_pairs": len(test)},
        "reward_model": "frozen all-MiniLM-L6-v2 mean-pooled + linear Bradley-Terry head",
        "threshold": args.threshold, "weight": args.weight, "c": args.c, "max_length": args.max_length,
        "seeds": args.seeds, "results": rows, "lfs_vs_hidden_labels": lf_truth_accuracy(pool),
        "plot": str(args.plot) if args.plot else None, "seconds": round(time.perf_counter() - started, 1),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
