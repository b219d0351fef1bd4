"""Content fit for young children: one check for every text that can reach an annotator.

`check_text(text, themes)` returns why a text is unsuitable, or None. Two tests, cheapest
first: a whole-word match against the researcher-edited list of unsuitable themes (stored
in the database, seeded with death, gore, sexual content, drugs...: see storage.content),
then alt-profanity-check, a packaged offensive-language classifier (a linear SVM on
bag-of-words whose model ships in the wheel; version-locked to scikit-learn 1.9.1). The
classifier scores each sentence on its own, so one offensive sentence in a long story is
not diluted by the rest. It was trained on adult social-media text and is strict: "the
wolf was stupid" scores 0.99, which for a children's arena is the side to err on.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence

from storage import content
from storage.db import Store

OFFENSIVE_THRESHOLD = 0.95
MAX_THEME_CHARS = 60
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def theme_pattern(themes: Iterable[str]) -> re.Pattern | None:
    """One case-insensitive regex matching any theme as whole words (spacing between the
    words of a phrase may vary); None for an empty list."""
    alternatives = sorted({r"\s+".join(map(re.escape, t.split())) for t in themes if t.strip()}, key=len, reverse=True)
    if not alternatives:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


@functools.cache
def _classifier() -> Callable[[list[str]], Sequence[float]]:
    from profanity_check import predict_prob  # loads the packaged model (about 1 s), once

    return predict_prob


def offensive_probabilities(texts: Sequence[str]) -> list[float]:
    """Per text, the classifier's highest probability of offensive language over its sentences
    (one classifier call for the whole batch: a call costs about 10 ms however small)."""
    sentences = [[s for s in _SENTENCE_END.split(t) if s.strip()] for t in texts]
    flat = [s for group in sentences for s in group]
    scores = iter(_classifier()(flat) if flat else [])
    return [max((float(next(scores)) for _ in group), default=0.0) for group in sentences]


def check_texts(texts: Sequence[str], themes: re.Pattern | None) -> list[str | None]:
    """Per text, why it is unfit for young children ("theme: corpse", "offensive language
    (0.99)"), or None when it passes; `themes` is theme_pattern() of the stored list."""
    reasons: list[str | None] = []
    for text in texts:
        match = themes.search(text) if themes is not None else None
        reasons.append(f"theme: {' '.join(match.group(0).split()).lower()}" if match else None)
    unmatched = [i for i, reason in enumerate(reasons) if reason is None]
    for i, probability in zip(unmatched, offensive_probabilities([texts[i] for i in unmatched])):
        if probability >= OFFENSIVE_THRESHOLD:
            reasons[i] = f"offensive language ({probability:.2f})"
    return reasons


def check_text(text: str, themes: re.Pattern | None) -> str | None:
    return check_texts([text], themes)[0]


class ContentCheck:
    """check_text bound to the themes stored when it was made: read the list once for a run.
    Call it on one text, or `.many(texts)` for a batch (one classifier call)."""

    def __init__(self, store: Store):
        self.themes = theme_pattern(content.themes(store.db))

    def __call__(self, text: str) -> str | None:
        return check_text(text, self.themes)

    def many(self, texts: Sequence[str]) -> list[str | None]:
        return check_texts(texts, self.themes)


def parse_themes(text: str) -> list[str]:
    """A researcher's theme list, one phrase per line, checked; raises ValueError naming the line."""
    phrases = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        phrase = " ".join(line.split()).lower()
        if not phrase:
            continue
        if len(phrase) > MAX_THEME_CHARS:
            raise ValueError(f"Themes, line {number}: at most {MAX_THEME_CHARS} characters.")
        if not re.search(r"\w", phrase):
            raise ValueError(f"Themes, line {number}: a theme needs at least one letter or digit.")
        phrases.append(phrase)
    return sorted(set(phrases))


def save_themes(store: Store, text: str) -> list[str]:
    return content.set_themes(store.db, parse_themes(text))
