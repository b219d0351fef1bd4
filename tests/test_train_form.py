"""The Train tab's form is built from each kind's Params: one input per field with the field's
range, choices and default, and the values read back into the parameters the job gets."""

from __future__ import annotations

import json
from dataclasses import MISSING

import gradio as gr
import pytest

from rlhf.params import documented_fields
from rlhf.runner import check_params, get_kind, kind_names
from storage import models
from tests.conftest import tiny_settings
from ui.train import UNSET, FormField, build_train_tab, field_input, field_type, form_params, queued_params


@pytest.fixture
def model_store(store):
    """A store with two policies and a reward model."""
    models.add_model(store.db, "starter", "local", path="/a")
    models.add_model(store.db, "child", "dpo", path="/b")
    models.add_model(store.db, "judge", "reward", path="/c")
    return store


def kind_fields(kind_name: str, store) -> list[FormField]:
    declared = get_kind(kind_name)
    return [FormField(kind_name, f, field_input(declared.model_params, f, store))
            for f in documented_fields(declared.params)]


@pytest.mark.parametrize("kind_name", kind_names())
def test_each_field_gets_an_input_with_its_range_choices_and_default(kind_name, model_store):
    declared = get_kind(kind_name)
    for form in kind_fields(kind_name, model_store):
        f, box = form.field, form.input
        meta, (base_type, optional) = f.metadata, field_type(f)
        assert f.metadata["help"] in box.info and box.label.startswith(f.name)
        if f.name in declared.model_params:
            reward = declared.model_params[f.name] == "reward model"
            assert isinstance(box, gr.Dropdown) and box.value is None
            assert [label for label, _ in box.choices] == (
                ["#3 judge (reward)"] if reward else ["#1 starter (local)", "#2 child (dpo)"])
        elif meta["choices"] is not None:
            assert isinstance(box, gr.Dropdown)
            assert [v for _, v in box.choices] == ([UNSET] if optional else []) + list(meta["choices"])
            assert box.value == (UNSET if f.default is None else f.default)
        elif base_type == "bool" and optional:
            assert isinstance(box, gr.Dropdown) and [v for _, v in box.choices] == [UNSET, "true", "false"]
        elif base_type == "bool":
            assert isinstance(box, gr.Checkbox) and box.value is f.default
        elif base_type in ("int", "float") and f.default not in (None, MISSING):
            assert isinstance(box, gr.Number) and box.value == f.default
            assert (box.minimum, box.maximum) == (meta["low"], meta["high"])
            assert box.precision == (0 if base_type == "int" else None)
        else:  # text, JSON, and numbers that start unset (a number box cannot be empty)
            assert isinstance(box, gr.Textbox) and box.value == ""
            assert box.placeholder.endswith(
                "upload a file below" if f.name == "corpus" else "required" if f.default is MISSING
                else "empty: unset" if f.default is None else f"default: {json.dumps(f.default)}")


def test_the_tab_has_one_group_per_kind_and_refreshes_every_model_input(model_store, tmp_path):
    settings = tiny_settings(tmp_path / "data")
    with gr.Blocks() as demo:
        refresh, model_inputs, _ = build_train_tab(settings, model_store, gr.State(None))
    element_ids = {block.elem_id for block in demo.blocks.values()}
    assert {f"train-{name}" for name in kind_names()} <= element_ids
    expected = sum(len(get_kind(name).model_params) for name in kind_names())
    assert len(model_inputs) == expected
    models.add_model(model_store.db, "judge-2", "reward", path="/d")
    refreshed = [update.choices for update in refresh()]
    assert len(refreshed) == expected and [("#4 judge-2 (reward)", 4)] in [c[-1:] for c in refreshed]


def read(kind_name, store, **values) -> dict:
    """The parameters of a form where only `values` were changed from how it starts; another
    kind's inputs (all set to 7) are ignored."""
    other = "weak" if kind_name != "weak" else "teams"
    fields = kind_fields(other, store) + kind_fields(kind_name, store)
    raw = [values.get(f.field.name, f.input.value) if f.kind == kind_name else 7 for f in fields]
    return form_params(fields, kind_name, raw)


def test_inputs_left_as_they_start_give_no_parameters(model_store):
    for kind_name in kind_names():
        assert read(kind_name, model_store) == {}


def test_changed_inputs_become_the_jobs_parameters(model_store):
    params = read("dpo", model_store, base=1, max_steps=2.0, beta=0.25, lora="false", loss_type="ipo",
                  preset="quick", batch_size=4, max_epochs=3, learning_rate="1e-5", eval_fraction=0)
    assert params == {"base": 1, "max_steps": 2, "beta": 0.25, "lora": False, "loss_type": "ipo",
                      "learning_rate": 1e-5, "eval_fraction": 0.0}
    assert isinstance(params["max_steps"], int) and isinstance(params["eval_fraction"], float)
    checked = check_params(model_store, "dpo", params)
    assert (checked.max_steps, checked.loss_type, checked.lora, checked.learning_rate) == (2, "ipo", False, 1e-5)
    assert read("reward", model_store, weak_labels=True) == {"weak_labels": True}
    assert read("dph", model_store, register_reward=False) == {"register_reward": False}
    assert read("pretrain", model_store, corpus='{"distill": 2}', name="tiny-kid") == {
        "corpus": {"distill": 2}, "name": "tiny-kid"}


def test_bad_form_values_are_refused_with_the_fields_name(model_store):
    with pytest.raises(ValueError, match="learning_rate must be a number, got 'fast'"):
        read("dpo", model_store, learning_rate="fast")
    with pytest.raises(ValueError, match="corpus must be JSON"):
        read("pretrain", model_store, corpus="{distill")
    with pytest.raises(ValueError, match="Choose what to train"):
        form_params([], "nope", [])
    with pytest.raises(ValueError, match="beta must be in"):
        check_params(model_store, "dpo", read("dpo", model_store, base=1, beta=0))


def test_an_upload_becomes_the_corpus_only_for_kinds_that_take_one(tmp_path):
    settings = tiny_settings(tmp_path / "data")
    upload = tmp_path / "stories.txt"
    upload.write_text("Once upon a time.\n\nThe end.\n", encoding="utf-8")
    params = queued_params(settings, "pretrain", "{}", str(upload))
    saved = params["corpus"]["file"]
    assert saved.startswith(str(settings.data_dir / "uploads")) and open(saved).read() == upload.read_text()
    assert queued_params(settings, "dpo", '{"base": 1}', str(upload)) == {"base": 1}
    with pytest.raises(ValueError, match="Parameters must be a JSON object"):
        queued_params(settings, "dpo", "[1]", None)
    with pytest.raises(ValueError, match="corpus file: give an uploaded file"):
        queued_params(settings, "pretrain", '{"corpus": {"file": "/etc/passwd"}}', None)
