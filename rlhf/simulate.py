"""Simulated annotators: vote through a running app's real HTTP API with a known preference.

Each annotator has a hidden oracle score (prompt adherence, no loops, a proper ending,
length in a target band), a configurable accuracy (the chance of voting for the oracle's
choice), and a position bias (the chance of picking A whatever the stories say). They make
the loop testable without people and give ground truth for reward-model accuracy. They
sign in and vote like people (source `human` in the database, names `sim-...`), so every
layer from HTTP to SQLite is exercised.
"""

from __future__ import annotations

import html
import random
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass

from gradio_client import Client

from rlhf.prompts import words_used
from rlhf.story_features import has_ending, length_fit, repeated_ngram_share

PROMPT_HTML = re.compile(r'^<div class="prompt">(.*)</div>$', re.S)
STORY_HTML = re.compile(r'^<div class="story">(.*)</div>$', re.S)
CLIENT_KEY = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Oracle:
    """The hidden preference: higher is better."""
    min_words: int = 60
    max_words: int = 300
    both_bad_below: float = 2.0
    tie_margin: float = 0.05

    def score(self, prompt: str, story: str) -> float:
        return (
            2.0 * words_used(prompt, story)
            + 1.5 * (1.0 - repeated_ngram_share(story))
            + 1.0 * has_ending(story)
            + 1.0 * length_fit(story, self.min_words, self.max_words)
        )

    def prefers(self, prompt: str, story_a: str, story_b: str) -> str:
        score_a, score_b = self.score(prompt, story_a), self.score(prompt, story_b)
        if max(score_a, score_b) < self.both_bad_below:
            return "both_bad"
        if abs(score_a - score_b) < self.tie_margin:
            return "tie"
        return "a" if score_a > score_b else "b"


@dataclass(frozen=True)
class Annotator:
    name: str
    accuracy: float = 0.9
    position_bias: float = 0.0

    def choose(self, oracle: Oracle, prompt: str, story_a: str, story_b: str, rng: random.Random) -> str:
        if rng.random() < self.position_bias:
            return "a"
        truth = oracle.prefers(prompt, story_a, story_b)
        if truth in ("a", "b") and rng.random() > self.accuracy:
            return "b" if truth == "a" else "a"
        return truth


@dataclass(frozen=True)
class Screen:
    """What the API returned: the pair on screen, or none."""
    prompt: str
    story_a: str
    story_b: str
    client_key: str


def read_screen(outputs: tuple) -> Screen | None:
    """Find the prompt, both stories and the client key among an endpoint's outputs."""
    texts = [o for o in outputs if isinstance(o, str)]
    prompt = next((PROMPT_HTML.match(t) for t in texts if PROMPT_HTML.match(t)), None)
    stories = [STORY_HTML.match(t) for t in texts if STORY_HTML.match(t)]
    key = next((t for t in texts if CLIENT_KEY.match(t)), None)
    if prompt is None or len(stories) != 2 or key is None:
        return None
    return Screen(html.unescape(prompt.group(1)), html.unescape(stories[0].group(1)),
                  html.unescape(stories[1].group(1)), key)


def run_annotator(url: str, annotator: Annotator, votes: int, oracle: Oracle, seed: int,
                  wait_s: float = 120.0) -> dict:
    """Sign in and vote `votes` times; returns latencies, errors and agreement with the oracle."""
    rng = random.Random(seed)
    client = Client(url, verbose=False)
    screen = read_screen(client.predict(annotator.name, "", api_name="/sign_in"))
    deadline = time.monotonic() + wait_s
    while screen is None and time.monotonic() < deadline:
        time.sleep(1.0)
        screen = read_screen(client.predict(annotator.name, "", api_name="/sign_in"))
    latencies, errors, agree = [], [], 0
    for _ in range(votes):
        if screen is None:
            errors.append("no pair available")
            break
        choice = annotator.choose(oracle, screen.prompt, screen.story_a, screen.story_b, rng)
        started = time.perf_counter()
        try:
            outputs = client.predict(screen.client_key, "", api_name=f"/vote_{choice}")
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            break
        latencies.append(time.perf_counter() - started)
        agree += choice == oracle.prefers(screen.prompt, screen.story_a, screen.story_b)
        screen = read_screen(outputs)
    return {"name": annotator.name, "latencies": latencies, "errors": errors, "agree": agree}


def simulate(url: str, annotators: int, votes: int, accuracy: float = 0.9, position_bias: float = 0.0,
             seed: int = 0, oracle: Oracle | None = None) -> dict:
    """Run annotators concurrently (one thread each) and summarise the voting path."""
    if not 0.0 <= accuracy <= 1.0 or not 0.0 <= position_bias <= 1.0:
        raise ValueError("accuracy and position bias are probabilities in [0, 1].")
    if annotators < 1 or votes < 1:
        raise ValueError("Need at least one annotator and one vote.")
    oracle = oracle or Oracle()
    crowd = [Annotator(f"sim-{seed}-{i}", accuracy, position_bias) for i in range(annotators)]
    results: list[dict] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        result = run_annotator(url, crowd[i], votes, oracle, seed * 1000 + i)
        with lock:
            results.append(result)

    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(annotators)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies = sorted(x for r in results for x in r["latencies"])
    cast = len(latencies)
    return {
        "annotators": annotators, "votes_requested": annotators * votes, "votes_cast": cast,
        "errors": [e for r in results for e in r["errors"]],
        "seconds": elapsed, "votes_per_s": cast / elapsed if elapsed else 0.0,
        "latency_median_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": latencies[min(cast - 1, int(0.99 * cast))] if latencies else None,
        "oracle_agreement": sum(r["agree"] for r in results) / cast if cast else None,
        "oracle": asdict(oracle), "accuracy": accuracy, "position_bias": position_bias,
    }
