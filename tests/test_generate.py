import pytest
import torch
from transformers import AutoTokenizer

from rlhf.generate import SYSTEM_PROMPT, Decoding, Story, _length_to_eos, format_prompt, generate_stories
from rlhf.models import build_tiny_starter, load_causal_lm
from rlhf.story_features import CONTROL, printable, trim_unfinished
from tests.test_models import STORY_TEXTS

PROMPTS = ["A cat finds a hat.", "A dog who is afraid of rain.", "Two friends and a kite."]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_starter(tmp_path_factory.mktemp("models"), STORY_TEXTS)
    return path, *load_causal_lm(str(path), torch.device("cpu"))


def test_generates_one_story_per_prompt_within_max_new_tokens(tiny):
    _, model, tokenizer = tiny
    stories = generate_stories(model, tokenizer, PROMPTS * 2, Decoding(max_new_tokens=12), batch_size=4, seed=0)
    assert len(stories) == 6
    for story in stories:
        assert isinstance(story, Story)
        assert isinstance(story.text, str) and story.text == story.text.strip()
        assert 0 < story.tokens <= 12
        assert story.ms > 0


def test_same_seed_gives_same_stories(tiny):
    _, model, tokenizer = tiny
    decoding = Decoding(max_new_tokens=10)
    first = [s.text for s in generate_stories(model, tokenizer, PROMPTS, decoding, seed=7)]
    again = [s.text for s in generate_stories(model, tokenizer, PROMPTS, decoding, seed=7)]
    other = [s.text for s in generate_stories(model, tokenizer, PROMPTS, decoding, seed=8)]
    assert first == again
    assert first != other


def test_seed_leaves_global_rng_untouched(tiny):
    _, model, tokenizer = tiny
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_stories(model, tokenizer, PROMPTS[:1], Decoding(max_new_tokens=3), seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_max_new_tokens_is_capped_by_the_context(tiny):
    _, model, tokenizer = tiny
    long_prompt = "cat " * 400
    stories = generate_stories(model, tokenizer, [long_prompt], Decoding(max_new_tokens=1024), seed=0)
    assert 0 < stories[0].tokens <= model.config.max_position_embeddings


def test_chat_template_tokenizer_generates(tiny):
    path, model, _ = tiny
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    stories = generate_stories(model, tokenizer, PROMPTS, Decoding(max_new_tokens=5), seed=0)
    assert len(stories) == 3 and all(0 < s.tokens <= 5 for s in stories)


def test_length_to_eos_stops_before_first_eos():
    ids = torch.tensor([5, 6, 2, 7, 2])
    assert _length_to_eos(ids, [2]) == 2
    assert _length_to_eos(ids, [9, 7]) == 3
    assert _length_to_eos(ids, [9]) == 5
    assert _length_to_eos(ids, []) == 5


def test_format_prompt_plain_lm(tiny):
    _, _, tokenizer = tiny
    assert tokenizer.chat_template is None
    assert format_prompt(tokenizer, "A cat finds a hat. ") == "A cat finds a hat.\n\nStory:"


def test_format_prompt_chat_template(tiny):
    path, _, _ = tiny
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    text = format_prompt(tokenizer, "A cat finds a hat.")
    assert text == f"<system>{SYSTEM_PROMPT}\n<user>A cat finds a hat.\n<assistant>"


def test_decoding_defaults_and_round_trip():
    assert Decoding.from_dict({}) == Decoding()
    decoding = Decoding.from_dict({"temperature": 1, "top_p": 0.5, "max_new_tokens": 64})
    assert Decoding.from_dict(decoding.to_dict()) == decoding
    assert decoding.to_dict() == {
        "temperature": 1, "top_p": 0.5, "max_new_tokens": 64, "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
    }


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": 0}, r"temperature must be in \(0, 2\]"),
        ({"temperature": 2.5}, "temperature must be in"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.01}, "top_p must be in"),
        ({"max_new_tokens": 0}, "max_new_tokens must be between 1 and 1024"),
        ({"max_new_tokens": 1025}, "max_new_tokens must be between"),
        ({"max_new_tokens": 10.5}, "max_new_tokens must be a whole number"),
        ({"max_new_tokens": True}, "max_new_tokens must be a whole number"),
        ({"repetition_penalty": 0.5}, r"repetition_penalty must be in \[1, 2\]"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be between 0 and 32"),
        ({"no_repeat_ngram_size": 2.5}, "no_repeat_ngram_size must be a whole number"),
        ({"temprature": 0.7}, r"Unknown decoding parameter\(s\): temprature"),
    ],
)
def test_decoding_validation(settings, message):
    with pytest.raises(ValueError, match=message):
        Decoding.from_dict(settings)


@pytest.mark.parametrize(
    ("text", "trimmed"),
    [
        ("The cat sat. Then the dog ran to the", "The cat sat."),
        ('"Hello!" said Tom. "Let us go to', '"Hello!" said Tom.'),
        ("Is it time? Yes. And then\u201d she", "Is it time? Yes."),
        ("It cost 3.50 dollars and", "It cost 3.50 dollars and"),  # no sentence ends inside a number
        ("Mia smiled. Mr", "Mia smiled."),
        ("No sentence ends here at all", "No sentence ends here at all"),  # a fragment beats nothing
        ("A finished story.  ", "A finished story."),
        ("", ""),
    ],
)
def test_trim_unfinished_cuts_back_to_the_last_finished_sentence(text, trimmed):
    assert trim_unfinished(text) == trimmed


def test_truncated_when_the_budget_is_hit_and_not_when_eos_came(tiny, monkeypatch):
    _, model, tokenizer = tiny
    vocab = model.config.vocab_size
    # An end-of-sequence id the model can never sample: every story runs into the budget.
    monkeypatch.setattr(model.generation_config, "eos_token_id", vocab)
    cut = generate_stories(model, tokenizer, PROMPTS, Decoding(max_new_tokens=9), seed=0)
    assert [(s.tokens, s.truncated) for s in cut] == [(9, True)] * 3
    assert all(s.text == trim_unfinished(s.text) for s in cut)
    # Every id ends the sequence: each story stops at its first token, well inside the budget.
    monkeypatch.setattr(model.generation_config, "eos_token_id", list(range(vocab)))
    ended = generate_stories(model, tokenizer, PROMPTS, Decoding(max_new_tokens=9), seed=0)
    assert [(s.tokens, s.truncated) for s in ended] == [(0, False)] * 3


def test_stories_hold_no_control_characters(tiny):
    """The tiny random model emits any byte; what is stored must be what the browser shows."""
    _, model, tokenizer = tiny
    stories = generate_stories(model, tokenizer, PROMPTS * 4, Decoding(max_new_tokens=48), seed=0)
    assert stories and not any(CONTROL.search(s.text) or "\r" in s.text for s in stories)
    assert printable("a\r\nb\rc\x00d\x07e\tf") == "a\nb\ncde\tf"


def test_no_repeat_ngram_size_reaches_generate(tiny, monkeypatch):
    _, model, tokenizer = tiny
    seen = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw) or real(**kw))
    decoding = Decoding(max_new_tokens=12, no_repeat_ngram_size=1)
    [story] = generate_stories(model, tokenizer, PROMPTS[:1], decoding, seed=0)
    assert seen[0]["no_repeat_ngram_size"] == 1 and story.tokens > 0


def test_decodings_stored_before_no_repeat_ngram_size_still_load():
    old = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 200, "repetition_penalty": 1.0}
    assert Decoding.from_dict(old).no_repeat_ngram_size == 0


def test_starter_policy_decodings_are_valid_and_the_real_starter_avoids_loops():
    from rlhf.starters import STARTER_POLICIES

    decodings = {name: Decoding.from_dict(d) for policies in STARTER_POLICIES.values() for name, d in policies}
    assert all(decodings[name].no_repeat_ngram_size > 0 for name, _ in STARTER_POLICIES["smollm2"])


def test_story_bench_reads_candidate_decodings():
    from bench.stories import parse_decodings

    named = parse_decodings('[{"name": "calm", "temperature": 0.6}, {"no_repeat_ngram_size": 4}]', 128)
    assert named == {"calm": Decoding(temperature=0.6, max_new_tokens=128),
                     "decoding-1": Decoding(no_repeat_ngram_size=4, max_new_tokens=128)}
    for bad, message in (("{}", "non-empty JSON list"), ("[]", "non-empty JSON list"),
                         ('[{"top_k": 5}]', "Unknown decoding parameter"), ("[", "Expecting value")):
        with pytest.raises(ValueError, match=message):
            parse_decodings(bad, 128)
