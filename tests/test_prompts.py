import json
import re
import subprocess
import sys

import pytest

from rlhf.prompts import SEED_PROMPTS, required_words, words_used
from tests.conftest import REPO_ROOT, clean_env

_EXACT_WORDS_SENTENCE = re.compile(r' Use the words "[a-z]+"(?:, "[a-z]+")* and "[a-z]+"\.$')


def test_seed_prompts_are_many_distinct_and_short():
    assert len(SEED_PROMPTS) >= 220
    assert len(set(SEED_PROMPTS)) == len(SEED_PROMPTS)
    assert all(len(prompt) < 300 for prompt in SEED_PROMPTS)


@pytest.mark.parametrize("hash_seed", ["0", "12345"])
def test_seed_prompts_are_the_same_in_every_process(hash_seed):
    """Every process (the app, each job, a restart) must store and find the same seed prompts:
    a fresh interpreter, with its own string hashing, builds the same tuple as this one."""
    script = "import json; from rlhf.prompts import SEED_PROMPTS; print(json.dumps(SEED_PROMPTS))"
    built = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                           env={**clean_env(), "PYTHONHASHSEED": hash_seed}, check=True, timeout=120)
    assert tuple(json.loads(built.stdout)) == SEED_PROMPTS


def test_seed_prompts_read_as_sentences():
    for prompt in SEED_PROMPTS:
        assert prompt[0].isupper() and prompt.endswith(".")
        assert "{" not in prompt and "  " not in prompt


def test_about_half_of_seed_prompts_require_two_to_four_words():
    with_words = [prompt for prompt in SEED_PROMPTS if "Use the words" in prompt]
    assert len(with_words) >= 0.4 * len(SEED_PROMPTS)
    for prompt in with_words:
        assert _EXACT_WORDS_SENTENCE.search(prompt), prompt
        assert 2 <= len(required_words(prompt)) <= 4, prompt
    assert all(required_words(p) == [] for p in SEED_PROMPTS if p not in with_words)


def test_required_words_parses_three_words_in_order():
    prompt = 'Write a story about a fox. Use the words "lantern", "Brave" and "river".'
    assert required_words(prompt) == ["lantern", "brave", "river"]


def test_required_words_parses_two_words():
    assert required_words('Write a story. Use the words "drum" and "crumb".') == ["drum", "crumb"]


def test_required_words_parses_curly_and_single_quotes():
    curly = "Write a story. Use the words “moon”, “kite” and “rain”."
    assert required_words(curly) == ["moon", "kite", "rain"]
    assert required_words("Write a story. use the words 'hat' and 'mat'.") == ["hat", "mat"]


def test_required_words_is_empty_without_the_sentence():
    assert required_words("Write a story about a dragon who says \"hello\" to a cat.") == []
    assert required_words("") == []


def test_words_used_counts_full_and_partial_matches():
    prompt = 'Write a story. Use the words "lantern", "brave" and "river".'
    assert words_used(prompt, "The brave girl carried a Lantern down to the river.") == 1.0
    assert words_used(prompt, "The girl was brave.") == pytest.approx(1 / 3)
    assert words_used(prompt, "Nothing happened at all.") == 0.0


def test_words_used_accepts_inflections_but_not_other_words():
    prompt = 'Write a story. Use the words "jump", "bake", "puppy" and "hop".'
    assert words_used(prompt, "She jumped, baking cookies for the puppies while hopping.") == 1.0
    assert words_used(prompt, "A jumper, a baker and a hoppy puppyish chopper.") == 0.0


def test_words_used_is_one_when_nothing_is_required():
    assert words_used("Write a story about a cat.", "") == 1.0
