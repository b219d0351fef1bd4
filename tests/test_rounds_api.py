"""The Rounds tab's endpoints over HTTP (gradio_client): only researchers set the recipe,
start and cancel rounds (checked on the server), and bad values get a one-line error
naming the field."""

from __future__ import annotations

import json

import pytest

from bench.app_server import query
from tests.test_app_api import app, db, researcher, sign_in  # noqa: F401

AppError = pytest.importorskip("gradio_client.exceptions").AppError


def recipe_form(every_votes="", steps=("raft",), step_params="", min_votes=50) -> tuple:
    """The set_round_recipe inputs in form order: every_votes, schedule_minutes, steps,
    step_params, min_votes, max_votes, starting_policy."""
    return every_votes, "", list(steps), step_params, min_votes, "", None


def test_only_researchers_run_rounds_and_bad_recipes_name_the_field(app, researcher):  # noqa: F811
    url, data_dir = app
    mallory, _ = sign_in(url, "mallory")
    for args, endpoint in [(recipe_form("3"), "/set_round_recipe"), ((), "/start_round"), ((1,), "/cancel_round")]:
        with pytest.raises(AppError, match="researcher role"):
            mallory.predict(*args, api_name=endpoint)
    assert query(db(data_dir), "SELECT count(*) FROM round_recipe")[0][0] == 0

    for form, field in [(recipe_form("0"), "every_votes"), (recipe_form(steps=()), "steps must be"),
                        (recipe_form(step_params='{"raft": {"k": 1}}'), "step_params.raft: k"),
                        (recipe_form(step_params="{not json"), "step_params must be JSON")]:
        with pytest.raises(AppError, match=field) as refused:
            researcher.predict(*form, api_name="/set_round_recipe")
        assert "\n" not in str(refused.value)
    assert query(db(data_dir), "SELECT count(*) FROM round_recipe")[0][0] == 0

    recipe_md, message = researcher.predict(*recipe_form("40", steps=("raft", "dpo")), api_name="/set_round_recipe")
    assert message == "Recipe v1 saved." and "every 40 new decided votes" in recipe_md
    (stored, set_by), = query(db(data_dir), "SELECT r.recipe, a.name FROM round_recipe r JOIN annotators a"
                                            " ON a.id = r.set_by")
    assert json.loads(stored)["steps"] == ["raft", "dpo"] and set_by == "rita"

    table, message = researcher.predict(api_name="/start_round")
    assert message == "Round 1 started." and "<td>1</td>" in table
    with pytest.raises(AppError, match="one round at a time"):
        researcher.predict(api_name="/start_round")
    _, message = researcher.predict(1, api_name="/cancel_round")
    assert message == "Round 1 cancelled."
    assert query(db(data_dir), "SELECT status FROM rounds WHERE id = 1")[0][0] == "cancelled"
