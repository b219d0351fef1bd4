"""Content fit for children: the check itself (theme list + packaged offensive-language
classifier), the researcher-edited theme list, the check at every entry path (prompt
imports, preference imports, generated stories, evolved prompts, seed prompts at first
start), and annotators' reports with researcher review."""

from __future__ import annotations

import json
import random

import pytest

from rlhf import arena, preferences, safety, teams
from rlhf import prompts as prompt_import
from rlhf.generate import Story
from rlhf.prepare import prepare, screen_prompts
from rlhf.prompts import SEED_PROMPTS
from rlhf.records import lines
from storage import completions, content, models, prompts
from ui.data import reports_html

ISSUE_PROMPT = ("Write a tale of a little red tractor that is forced to eat its own dead corpse, "
                "and make it rhyme.")


@pytest.fixture
def default_themes(store):
    return safety.theme_pattern(content.themes(store.db))


def test_themes_match_whole_words_and_phrases_only(default_themes):
    assert safety.check_text(ISSUE_PROMPT, default_themes) == "theme: corpse"
    assert safety.check_text("They found a dead   body in the shed.", default_themes) == "theme: dead body"
    assert safety.check_text("Write a story about a SEXY robot.", default_themes) == "theme: sexy"
    # whole words: no theme inside another word
    assert safety.check_text("A cow from Sussex visits Essex.", default_themes) is None
    assert safety.check_text("The bakery sold gorgeous cakes to a drugstore owner.", default_themes) is None


def test_the_classifier_flags_offensive_language_even_in_one_sentence(default_themes):
    gentle = ("Once upon a time a little bunny lived in a sunny garden. She liked carrots. "
              "One day she met a friendly fox, and they shared a picnic.")
    assert safety.check_text(gentle, default_themes) is None
    rude = gentle + " Then the fox said: you stupid little shit, go away."
    assert safety.check_text(rude, default_themes).startswith("offensive language (")
    assert safety.offensive_probabilities([gentle, rude])[0] < safety.OFFENSIVE_THRESHOLD


def test_every_seed_prompt_passes_the_default_check(default_themes):
    assert [p for p, r in zip(SEED_PROMPTS, safety.check_texts(SEED_PROMPTS, default_themes)) if r] == []


def test_theme_list_is_edited_and_validated(store):
    assert "corpse" in content.themes(store.db)
    assert safety.save_themes(store, "Dragon\n\n  dark   forest \ndragon\n") == ["dark forest", "dragon"]
    check = safety.ContentCheck(store)
    assert check("A story in a dark forest.") == "theme: dark forest"
    assert check(ISSUE_PROMPT) is None  # corpse is no longer on the list
    with pytest.raises(ValueError, match="line 2"):
        safety.parse_themes("fine\n" + "x" * (safety.MAX_THEME_CHARS + 1))
    with pytest.raises(ValueError, match="line 1"):
        safety.parse_themes("!!!")


def served_prompts(store, settings, name: str, tries: int = 40) -> set[int]:
    """Prompts served to a new annotator until the arena runs dry (each pair skipped)."""
    who = arena.sign_in(store, settings, name)["id"]
    rng, seen = random.Random(0), set()
    for _ in range(tries):
        view = arena.next_pair(store, who, rng)
        if view is None:
            break
        seen.add(view.pair.prompt_id)
        arena.skip_pair(store, who, view)
    return seen


def test_an_imported_prompt_that_fails_is_stored_blocked_and_never_served(arena_dir):
    settings, store = arena_dir
    result = prompt_import.import_prompts(store, settings,
                                          lines(f"{ISSUE_PROMPT}\nWrite a story about a kind tractor."),
                                          "tractors")
    assert result["added"] == 2
    [blocked] = result["blocked"]
    assert blocked["reason"] == "theme: corpse"
    assert prompts.get_prompt(store.db, blocked["id"])["blocked_reason"] == "theme: corpse"
    # it gets no stories, so it can never be paired
    for policy in models.list_models(store.db, active_only=True):
        missing = completions.prompts_without_completion(store.db, policy.id, settings.pool_prompts)
        assert blocked["id"] not in {p["id"] for p in missing}


def test_generated_stories_that_fail_are_stored_with_the_reason_and_never_paired(arena_dir, monkeypatch):
    settings, store = arena_dir
    from rlhf import pool

    prompt_import.import_prompts(store, settings, lines("Write a story about a night walk."), "night")
    new_prompt = prompts.list_prompts(store.db, collection="night")[0]["id"]
    policies = models.list_models(store.db, active_only=True)
    texts = iter(["The moon smiled at the owl.", "They tripped over a corpse in the dark."])

    def written(model, tokenizer, prompts, *args, **kwargs):
        return [Story(next(texts), 5, 1.0, False) for _ in prompts]

    # The starters share weights and write in one call (generate_rows); other policies one by one.
    monkeypatch.setattr(pool, "generate_stories", written)
    monkeypatch.setattr(pool, "generate_rows", written)
    pool.fill_pool(store, settings, [p.id for p in policies], settings.pool_prompts, lambda f, m: None)
    stories = {c["model_id"]: c for c in store.db["completions"].rows_where("prompt_id = ?", [new_prompt])}
    assert [stories[p.id]["blocked_reason"] for p in policies] == [None, "theme: corpse"]
    assert new_prompt not in served_prompts(store, settings, "Cleo")


def test_preference_imports_record_the_reason_of_texts_that_fail(arena_dir, tmp_path):
    settings, store = arena_dir
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "A story about a cat.", "chosen": "The cat purred.",
                                "rejected": "The cat saw a corpse."}) + "\n")
    result = preferences.import_preferences(store, settings, preferences.read_pairs(str(path)), "cats", str(path))
    assert result["blocked_texts"] == 1
    reasons = [r[0] for r in store.db.execute("SELECT blocked_reason FROM completions c JOIN models m"
                                              " ON m.id = c.model_id WHERE m.kind = 'external' ORDER BY c.id")]
    assert reasons == [None, "theme: corpse"]


def test_an_evolved_prompt_that_fails_earns_no_reward_and_is_not_kept(store):
    class CorpseExecutor:
        """Every rewrite mentions a corpse, the issue's example: nothing may be accepted."""
        queries = 0

        def __call__(self, texts, operations):
            return [f"{t} Then a corpse appears number {i}." for i, t in enumerate(texts)]

    from tests.test_teams import bag_encoder

    check = safety.ContentCheck(store)
    run = teams.evolve(list(SEED_PROMPTS[:6]), CorpseExecutor(), bag_encoder, teams.RandomInstructor(0), budget=8,
                       threshold=0.0, episodes_per_round=4, steps_per_episode=2, unsuitable=check)
    assert run.evolved == [] and run.queries == 8
    assert sum(c["unsuitable"] for c in run.operations.values()) == 8
    assert sum(c["reward"] for c in run.operations.values()) == 0
    unchecked = teams.evolve(list(SEED_PROMPTS[:6]), CorpseExecutor(), bag_encoder, teams.RandomInstructor(0), budget=8,
                             threshold=0.0, episodes_per_round=4, steps_per_episode=2)
    assert unchecked.evolved  # the same run without the check keeps them: the check is what stops them


def test_seed_prompts_are_checked_at_first_start(arena_dir):
    settings, store = arena_dir
    safety.save_themes(store, "dragon")
    dragons = {p["id"] for p in prompts.list_prompts(store.db, sources=["seed"])
               if "dragon" in p["text"].lower().split()}
    assert dragons
    prepare(store, settings, lambda f, m: None)  # a restart runs the first-start path again
    blocked = {p["id"] for p in prompts.list_prompts(store.db) if p["blocked_reason"] == "theme: dragon"}
    assert dragons <= blocked
    assert screen_prompts(store) == {}  # already blocked ones are not checked again
    assert not blocked & served_prompts(store, settings, "Dan")


# --- reports ------------------------------------------------------------------------------

def test_reports_hide_an_item_after_n_annotators_and_researchers_review(arena_dir):
    settings, store = arena_dir
    assert settings.reports_to_hide == 3
    first = arena.sign_in(store, settings, "Ann")["id"]
    view = arena.next_pair(store, first, random.Random(2))
    story = view.pair.completion_a
    assert arena.report_item(store, settings, first, view, "a") is False
    assert arena.report_item(store, settings, first, view, "a") is False  # the same person counts once
    following = arena.next_pair(store, first, random.Random(2)).pair  # the reporter moves on
    assert {following.completion_a, following.completion_b} != {view.pair.completion_a, view.pair.completion_b}
    assert completions.get_completion(store.db, story)["blocked_reason"] is None
    for name in ("Bob", "Cy"):
        who = arena.sign_in(store, settings, name)["id"]
        hidden = arena.report_item(store, settings, who, view, "a")
    assert hidden is True
    assert completions.get_completion(store.db, story)["blocked_reason"] == "reported by 3 annotators"
    [listed] = content.open_reports(store.db)
    assert listed["completion_id"] == story and listed["reports"] == 3
    # Dismissed: the story is back in the arena; the list is empty.
    content.review(store.db, listed["report_id"], confirm=False, reviewer_id=None)
    assert completions.get_completion(store.db, story)["blocked_reason"] is None
    assert content.open_reports(store.db) == []
    # A prompt report confirmed by a researcher takes the prompt out at once.
    dana = arena.sign_in(store, settings, "Dana")["id"]
    assert arena.report_item(store, settings, dana, view, "prompt") is False
    [prompt_report] = content.open_reports(store.db)
    assert prompt_report["completion_id"] is None
    content.review(store.db, prompt_report["report_id"], confirm=True, reviewer_id=dana)
    assert prompts.get_prompt(store.db, view.pair.prompt_id)["blocked_reason"] == content.CONFIRMED
    assert view.pair.prompt_id not in served_prompts(store, settings, "Eve")
    with pytest.raises(arena.ArenaError):
        arena.report_item(store, settings, dana, view, "c")
    with pytest.raises(LookupError):
        content.review(store.db, 999, True, None)


def test_reports_table_escapes_reported_text():
    html = reports_html([{"report_id": 1, "prompt_id": 2, "completion_id": 3, "reports": 1,
                          "blocked_reason": None, "text": "<script>alert(1)</script>"}])
    assert "<script>" not in html and "&lt;script&gt;" in html and "story #3" in html


def test_blocked_and_imported_stories_stay_off_the_compare_tab(arena_dir, tmp_path):
    settings, store = arena_dir
    prompt_id = completions.prompts_with_completions(store.db)[0]["id"]
    stories = completions.completions_for_prompt(store.db, prompt_id)
    assert len(stories) == 2
    store.db.execute("UPDATE completions SET blocked_reason = 'theme: gore' WHERE id = ?", [stories[0]["id"]])
    path = tmp_path / "p.jsonl"
    text = prompts.get_prompt(store.db, prompt_id)["text"]
    path.write_text(json.dumps({"prompt": text, "chosen": "Imported good.", "rejected": "Imported bad."}) + "\n")
    preferences.import_preferences(store, settings, preferences.read_pairs(str(path)), "same-prompt", str(path))
    assert [s["id"] for s in completions.completions_for_prompt(store.db, prompt_id)] == [stories[1]["id"]]
    prompts.block_prompts(store.db, {prompt_id: "reported"})
    assert prompt_id not in {p["id"] for p in completions.prompts_with_completions(store.db)}
