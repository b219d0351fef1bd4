"""Story preference pairs from real stories, judged by simulated annotators.

Real stories (TinyStories, ../shared/data/tinystories_sample2000.jsonl, CDLA-Sharing-1.0;
any JSON lines with a `text` field) have no prompts, so each story gets one in the arena's
own style: "Write a short story for children. Use the words "w1", "w2" and "w3"." with
three content words drawn from that story (rlhf.prompts.required_words reads them back).
Each prompt then gets one pair of two different candidates out of:

  own             the story the prompt was written from
  other           another real story (off-prompt: it rarely uses the required words)
  own-truncated   the own story cut mid-sentence at 40-80% of its words
  own-looped      the own story with one early sentence said LOOP_MIN_REPEATS times
  other-looped    the other story, looped the same way

so pairs range from two well-written stories that differ in prompt-following to a story
against a broken copy of itself. The hidden preference is rlhf.simulate.Oracle; pairs it
calls a tie or both bad are dropped, so every pair has a better story. People are
simulated by rlhf.simulate.Annotator (an accuracy below 1 flips some labels).

The oracle and the weak labeling functions read overlapping features (required words,
endings, repetition, length), so weak labels are easier here than on real people's votes:
read a gain on these pairs as an upper bound.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from rlhf.simulate import Oracle
from rlhf.story_features import ENDINGS, words
from rlhf.story_metrics import LOOP_MIN_REPEATS, SENTENCE

VARIANTS = ("own", "other", "own-truncated", "own-looped", "other-looped")
PROMPT_WORDS = 3
MIN_WORD_LENGTH = 4


def read_stories(path: Path, min_words: int, max_words: int) -> Iterator[str]:
    """Stories of a JSON-lines file (field `text`) whose word count is in [min_words, max_words]."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                text = json.loads(line)["text"].strip()
                if min_words <= len(words(text)) <= max_words:
                    yield text


def story_prompt(story: str, rng: random.Random) -> str | None:
    """A prompt asking for PROMPT_WORDS content words of the story; None when it has too few."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    candidates = sorted({w for w in words(story)
                         if len(w) >= MIN_WORD_LENGTH and w.isalpha() and w not in ENGLISH_STOP_WORDS})
    if len(candidates) < PROMPT_WORDS:
        return None
    chosen = [f'"{w}"' for w in rng.sample(candidates, PROMPT_WORDS)]
    return f"Write a short story for children. Use the words {', '.join(chosen[:-1])} and {chosen[-1]}."


def truncated(story: str, rng: random.Random) -> str:
    """The story cut mid-sentence at 40-80% of its words (never right after a sentence end)."""
    tokens = story.split()
    cut = rng.randint(int(0.4 * len(tokens)), int(0.8 * len(tokens)))
    while cut > 1 and tokens[cut - 1].endswith(ENDINGS):
        cut -= 1
    return " ".join(tokens[:cut]).rstrip(",;:-")


def looped(story: str, rng: random.Random) -> str:
    """The story with one sentence from its first half said LOOP_MIN_REPEATS times in a row."""
    pieces = SENTENCE.findall(story)  # the loop metric's own sentences, spacing kept
    k = rng.randrange(max(1, len(pieces) // 2))
    return "".join(pieces[:k + 1] + [" " + pieces[k].strip()] * (LOOP_MIN_REPEATS - 1) + pieces[k + 1:])


def variant(name: str, own: str, other: str, rng: random.Random) -> str:
    return {"own": lambda: own, "other": lambda: other, "own-truncated": lambda: truncated(own, rng),
            "own-looped": lambda: looped(own, rng), "other-looped": lambda: looped(other, rng)}[name]()


def story_pairs(stories: list[str], oracle: Oracle, seed: int) -> list[dict]:
    """One pair per story with a prompt: {prompt, chosen (the oracle's better story), rejected,
    kinds (the two variants, better first)}; ties and both-bad pairs of the oracle are left out."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    for i, own in enumerate(stories):
        prompt = story_prompt(own, rng)
        if prompt is None or prompt in seen:
            continue
        seen.add(prompt)
        other = stories[(i + 1 + rng.randrange(len(stories) - 1)) % len(stories)]
        kinds = rng.sample(VARIANTS, 2)
        texts = [variant(kind, own, other, rng) for kind in kinds]
        verdict = oracle.prefers(prompt, texts[0], texts[1])
        if verdict not in ("a", "b"):
            continue
        better = 0 if verdict == "a" else 1
        pairs.append({"prompt": prompt, "chosen": texts[better], "rejected": texts[1 - better],
                      "kinds": [kinds[better], kinds[1 - better]]})
    return pairs
