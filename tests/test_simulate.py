"""The simulated annotators' hidden preference and how they read the API's outputs."""

from __future__ import annotations

import random

from rlhf.simulate import Annotator, Oracle, read_screen
from rlhf.story_features import has_ending, length_fit, repeated_ngram_share
from ui.common import story_html

PROMPT = 'Write a story about a fox. Use the words "moon" and "river".'
GOOD = (
    "A little fox walked to the river under the moon. She met a frog who could not sleep. "
    "The frog told her about the stars, and the fox told him about the forest. They laughed "
    "at an owl who hooted the wrong song. Soon the water sparkled and the wind grew quiet. "
    "The frog yawned, and the fox curled up on a warm stone by the reeds. In the morning they "
    "promised to meet again whenever the moon was round and bright."
)
LOOPING = "the fox went to the river " * 20
CUT_OFF = GOOD.rstrip(".") + " and then the"


def test_features_spot_loops_endings_and_length():
    assert repeated_ngram_share(LOOPING) > 0.9
    assert repeated_ngram_share("one two three four five six seven") == 0.0
    assert has_ending(GOOD) and not has_ending(CUT_OFF)
    assert length_fit(GOOD, 60, 300) == 1.0
    assert 0.0 < length_fit("word " * 40, 60, 300) < 1.0
    assert length_fit("word " * 10, 60, 300) == 0.0


def test_oracle_prefers_adherent_finished_stories():
    oracle = Oracle()
    assert oracle.prefers(PROMPT, GOOD, LOOPING) == "a"
    assert oracle.prefers(PROMPT, CUT_OFF, GOOD) == "b"
    assert oracle.prefers(PROMPT, GOOD, GOOD) == "tie"
    assert oracle.prefers(PROMPT, "", "") == "both_bad"


def test_accuracy_and_position_bias():
    oracle, rng = Oracle(), random.Random(0)
    contrarian = Annotator("c", accuracy=0.0)
    assert {contrarian.choose(oracle, PROMPT, GOOD, LOOPING, rng) for _ in range(20)} == {"b"}
    biased = Annotator("p", accuracy=1.0, position_bias=1.0)
    assert {biased.choose(oracle, PROMPT, LOOPING, GOOD, rng) for _ in range(20)} == {"a"}
    noisy = Annotator("n", accuracy=0.7)
    right = sum(noisy.choose(oracle, PROMPT, GOOD, LOOPING, rng) == "a" for _ in range(2000))
    assert 0.65 < right / 2000 < 0.75


def test_read_screen_unescapes_what_the_page_shows():
    story = '<script>alert(1)</script> & "quotes"'
    outputs = ("status", story_html(PROMPT, "prompt"), story_html(story), story_html(GOOD), "0" * 32, {"active": False})
    screen = read_screen(outputs)
    assert screen.prompt == PROMPT and screen.story_a == story and screen.story_b == GOOD
    assert screen.client_key == "0" * 32
    assert read_screen(("waiting", "", "", "", "", None)) is None
