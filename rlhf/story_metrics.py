"""The automatic metrics of one story for its prompt, and the features they read.

One definition shared by the weak-supervision labeling functions (rlhf.weak), the Metrics
tab (rlhf.metrics) and the trivial baselines every held-out accuracy stands beside
(rlhf.heldout). Text only: nothing here loads a model.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass

from rlhf.prompts import required_words, words_used
from rlhf.story_features import distinct_ngram_share, has_ending, repeated_ngram_share, words

READABILITY_MIN_WORDS = 20   # Flesch is noise on shorter texts: abstain
LOOP_MIN_REPEATS = 3         # one sentence three times or more is a generation loop
KEYWORDS_MIN = 2             # prompts with fewer content words say too little to check
SENTIMENT_SENTENCES = 3      # how the story ends: VADER on its last three sentences

# Words every story prompt uses to give the instruction rather than the topic.
INSTRUCTION_WORDS = frozenset(
    "write tell story stories short use words word make keep end ending sentence sentences "
    "told mostly simple lesson person form little".split()
)
META_TALK = re.compile(
    r"\b(?:as an ai|language model|here(?:'s| is) (?:a|your|the) (?:short )?story|i hope you (?:enjoy|like)"
    r"|write a (?:short )?story|the end of the prompt)\b",
    re.IGNORECASE,
)
SENTENCE = re.compile(r"[^.!?]+[.!?]*")


@dataclass(frozen=True)
class StoryFeatures:
    """What the LFs read about one story for one prompt."""

    words: tuple[str, ...]
    flesch: float | None
    repeated: float
    max_sentence_repeats: int
    ends: bool
    end_sentiment: float
    meta_talk: bool
    real_words: float | None
    required_used: float | None
    keywords_used: float | None


@functools.cache
def _sentiment_analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def prompt_keywords(prompt: str) -> set[str]:
    """The prompt's content words: no stop words (scikit-learn's English list), no words of
    the instruction itself, none of the required words (their own LF checks those)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    required = required_words(prompt)
    skip = ENGLISH_STOP_WORDS | INSTRUCTION_WORDS
    return {w for w in words(prompt)
            if len(w) > 2 and w not in skip and not any(w.startswith(r) for r in required)}


def _uses(keyword: str, vocabulary: set[str]) -> bool:
    """A keyword counts in any simple inflection: the story has a word it starts with."""
    stem = keyword[: max(4, len(keyword) - 2)]
    return keyword in vocabulary or any(w.startswith(stem) for w in vocabulary)


@functools.lru_cache(maxsize=50_000)
def story_features(prompt: str, story: str) -> StoryFeatures:
    import textstat

    from rlhf.encoders import dictionary_words

    tokens = tuple(words(story))
    sentences = [s.strip().lower() for s in SENTENCE.findall(story or "") if s.strip()]
    required = required_words(prompt)
    keywords = prompt_keywords(prompt)
    vocabulary = set(tokens)
    dictionary = dictionary_words()
    ending = " ".join(sentences[-SENTIMENT_SENTENCES:])
    return StoryFeatures(
        words=tokens,
        flesch=textstat.flesch_reading_ease(story) if len(tokens) >= READABILITY_MIN_WORDS else None,
        repeated=repeated_ngram_share(story),
        max_sentence_repeats=max(Counter(sentences).values(), default=0),
        ends=has_ending(story),
        end_sentiment=_sentiment_analyzer().polarity_scores(ending)["compound"] if ending else 0.0,
        meta_talk=bool(META_TALK.search(story or "")),
        real_words=sum(w in dictionary for w in tokens) / len(tokens) if tokens else None,
        required_used=words_used(prompt, story) if required else None,
        keywords_used=(sum(_uses(k, vocabulary) for k in keywords) / len(keywords)
                       if len(keywords) >= KEYWORDS_MIN else None),
    )



@dataclass(frozen=True)
class Metric:
    label: str
    description: str
    higher_is_better: bool | None
    digits: int = 2


STORY_METRICS: dict[str, Metric] = {
    "prompt_adherence": Metric("required words", "share of the prompt's required words the story uses "
                               "(only prompts that ask for words)", True),
    "prompt_keywords": Metric("prompt keywords", "share of the prompt's content words the story uses", True),
    "repetition": Metric("repeated 4-grams", "share of word 4-grams that occur more than once", False),
    "loop": Metric("loops", f"share of stories with a sentence said {LOOP_MIN_REPEATS}+ times", False),
    "distinct_1": Metric("distinct-1", "distinct words over all words", True),
    "distinct_2": Metric("distinct-2", "distinct word pairs over all word pairs", True),
    "length": Metric("length (words)", "words in the story", None, 0),
    "ending": Metric("ending", "share of stories that end on a finished sentence", True),
    "truncated": Metric("cut", "share of stories cut at the token budget (trimmed to their last "
                        "finished sentence); unknown for stories stored before this was recorded", False),
    "readability": Metric("Flesch", "Flesch reading ease (stories of 20+ words)", True, 1),
}
def story_metric_values(prompt: str, story: str, truncated: bool | None = None) -> dict[str, float]:
    """The automatic metrics of one story; a metric that does not apply (or, like `truncated`,
    is not known) is left out."""
    f = story_features(prompt, story)
    values = {
        "prompt_adherence": f.required_used,
        "prompt_keywords": f.keywords_used,
        "repetition": f.repeated,
        "loop": float(f.max_sentence_repeats >= LOOP_MIN_REPEATS),
        "distinct_1": distinct_ngram_share(story, 1),
        "distinct_2": distinct_ngram_share(story, 2),
        "length": float(len(f.words)),
        "ending": float(f.ends),
        "readability": f.flesch,
        "truncated": truncated,
    }
    return {k: float(v) for k, v in values.items() if v is not None}
