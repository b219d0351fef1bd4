"""Cheap, explainable features of a story's text.

Shared by the simulated annotators' hidden preference and, later, by weak-supervision
labeling functions and per-policy metrics, so each feature is defined once.
"""

from __future__ import annotations

import re
from collections import Counter

WORD = re.compile(r"[A-Za-z']+")
ENDINGS = (".", "!", "?", '"', "\u201d")
SENTENCE_END = re.compile(r'[.!?]["\u201d]*(?=\s|$)')
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def printable(text: str) -> str:
    """The text without control characters (a model can emit any byte), line breaks as \\n:
    what a browser shows is then exactly what is stored and judged."""
    return CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text or "")]


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The text's word n-grams, in order."""
    tokens = words(text)
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of word n-grams that occur more than once: high for loops and stutters."""
    grams = ngrams(text, n)
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c for c in counts.values() if c > 1) / len(grams)


def has_ending(text: str) -> bool:
    """Whether the story ends on a finished sentence rather than being cut off."""
    return (text or "").rstrip().endswith(ENDINGS)


def trim_unfinished(text: str) -> str:
    """The text up to its last finished sentence, for a story the token budget cut mid-sentence.

    A text with no finished sentence at all is kept whole: a fragment beats an empty story.
    """
    text = (text or "").rstrip()
    if has_ending(text):
        return text
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends else text


def length_fit(text: str, low: int, high: int) -> float:
    """1 inside [low, high] words, falling linearly to 0 at half / double the band."""
    count = len(words(text))
    if low <= count <= high:
        return 1.0
    if count < low:
        return max(0.0, (count - low / 2) / (low / 2))
    return max(0.0, 1.0 - (count - high) / high)


def distinct_ngram_share(text: str, n: int = 1) -> float | None:
    """Distinct word n-grams over all n-grams (distinct-n): low when a story recycles its words.

    None for a story with no n-gram at all, so empty texts do not count as fully varied.
    """
    grams = ngrams(text, n)
    return len(set(grams)) / len(grams) if grams else None
