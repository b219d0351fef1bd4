"""The arena's seed story prompts, researchers' own prompt collections, and the helpers that
read required words back out of prompts.

Duels need prompts before any user types one, and prompt-following must be scored without a
human: prompts that end with `Use the words "x", "y" and "z".` carry their own check, which
simulated annotators and weak-supervision labeling functions read through `required_words`
and `words_used`. The set is built from hand-written parts with a fixed seed, so it is the
same on every run and every machine.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from pathlib import Path

from rlhf import safety
from rlhf.records import ImportRejected, file_records, hub_records, lines, text_problem
from rlhf.settings import Settings
from storage import models
from storage import prompts as prompt_rows
from storage.db import Store

_HANDWRITTEN = (
    "Write a short story in the form of a letter from a little turtle to a friend who lives "
    "across the sea.",
    "Write a short story told as three diary entries by a puppy during its first week in a "
    "new home.",
    'Write a gentle story about a grandpa and his granddaughter who watch the first snow of winter '
    'together. Use the words "mitten", "cocoa" and "quiet".',
    'Write a funny story about a dragon who sneezes bubbles instead of fire. '
    'Use the words "bubble" and "birthday".',
    "Write a short story about a robot who learns what a hug is.",
    "Write a spooky-but-kind story about a little ghost who is scared of children. "
    'Use the words "sheet", "giggle", "attic" and "friend".',
    "Write a sad-then-happy story about a boy whose kite gets stuck in a tall tree.",
    "Write a short rhyming story about a cat who wears a tall blue hat. "
    'Use the words "hat" and "mat".',
    "Write a story about two snails who have a very slow race. "
    'Use the words "race", "slow" and "cheer".',
    "Write a counting story in which a little mouse collects five shiny things, "
    "one at a time.",
    "Write a short story about a lighthouse keeper and a seagull who becomes her helper. "
    'Use the words "storm", "light" and "brave".',
    "Write a bedtime story about the moon, who is shy and only comes out at night.",
    "Write a short story about a girl who plants a sunflower that grows taller than her house. "
    'Use the words "seed", "water" and "sky".',
    "Write a story in which a teddy bear goes missing and the whole family searches the house.",
    "Write an adventurous story about a family of astronauts who find a friendly alien pet "
    'on Mars. Use the words "rocket", "crater", "purple" and "home".',
    "Write a gentle story about a grandmother teaching her grandson to bake bread. "
    'Use the words "dough" and "warm".',
    "Write a funny story about a farm where the cows decide to swap jobs with the chickens.",
    "Write a short story about a school bus that is afraid of the rain. "
    'Use the words "puddle", "wipers" and "brave".',
    "Write a story in which a little girl and a robot build a sandcastle before the tide comes in.",
    "Write a short story about a kind dragon who guards a library instead of gold. "
    'Use the words "book", "whisper" and "candle".',
)

_CHARACTERS = (
    "a shy hedgehog", "a curious little robot", "a sleepy dragon", "a tiny dragon",
    "a girl named Lily", "a boy named Tom", "a girl named Mia", "a boy named Ben",
    "a grumpy cat", "a friendly whale", "a lost puppy", "a wise old owl", "a clumsy giraffe",
    "a kind grandmother", "a forgetful grandfather", "a little bunny", "a baby elephant",
    "a busy ant", "a lonely snowman", "a young astronaut", "a chatty parrot", "a shy octopus",
    "a little red tractor", "a happy frog", "a slow turtle", "a curious fox", "a tiny mouse",
    "a friendly monster", "a cheerful bus driver", "a small cloud", "a wooden toy soldier",
    "a fluffy kitten", "a big brown bear", "a robot vacuum cleaner", "a little star",
    "a penguin chick", "a young dinosaur", "a tiny fairy", "a pirate girl", "an old baker",
    "an excited puppy", "an old fisherman", "a nervous scarecrow", "a brave little ladybug",
)

_GOALS = (
    "wants to join the school choir", "is afraid of the dark", "loses a favorite red ball",
    "wants to learn to swim", "finds a mysterious map", "has to share a special toy",
    "makes a new friend", "wants to see the stars up close",
    "plants a seed and waits for it to grow", "gets lost on the way home",
    "wants to bake a birthday cake", "cannot fall asleep", "finds a hidden door",
    "tries to catch the moon", "hears a strange noise at night", "dreams of flying",
    "has a very bad day", "learns to say sorry", "helps a friend who is sad",
    "builds a tall tower of blocks", "wants to be the fastest runner",
    "is too small to reach the top shelf", "finds a baby bird that fell from its nest",
    "forgets a friend's birthday", "visits the doctor for the first time",
    "is starting at a new school", "wants to win the big race", "finds a sparkly stone",
    "is scared of thunder", "wants a pet more than anything", "paints a picture for a friend",
    "goes on a treasure hunt", "wants to stay up late", "tries a new food",
    "loses a shoe in the mud", "wishes it would snow", "meets a talking tree",
    "has to be very quiet for a whole day", "plans a surprise party",
    "cannot stop hiccuping", "finds a note in a bottle", "learns to ride a bike",
)

_SETTINGS = (
    "in a misty forest", "in a busy city", "on a space station", "by the seaside", "on a farm",
    "at school", "under the sea", "in a snowy village", "in a sunny garden", "on a tiny island",
    "in the desert", "at the zoo", "in an old castle", "on the moon", "in a big library",
    "at the park", "in the mountains", "in a jungle", "on a pirate ship", "in a little bakery",
    "at the fair", "at grandma's house", "in a toy shop", "on a rainy street",
)

_TONES = (
    "funny", "gentle", "spooky-but-kind", "adventurous", "cozy", "silly", "heartwarming",
    "sad-then-happy", "exciting", "calm", "mysterious", "cheerful",
)

_TEMPLATES = (
    "Write a short, {tone} story about {character} who {goal}.",
    "Write {a_tone} bedtime story about {character} {setting} who {goal}.",
    "Tell {a_tone} story set {setting}, in which {character} {goal}.",
    "Write a short fable about {character} who {goal}. End it with a simple lesson.",
    "Write {a_tone} story, told mostly in dialogue, about {character} who {goal}.",
    "Write {a_tone} story in the first person, told by {character} who {goal}.",
    "Write a short story for a four-year-old about {character} {setting} who {goal}. "
    "Keep the sentences very short.",
    "Write {a_tone} story about {character} who {goal}. Make the ending a happy surprise.",
    "Write {a_tone} story with a line that repeats, about {character} {setting} who {goal}.",
)

_WORD_POOL = (
    "lantern", "brave", "river", "drum", "whisper", "crumb", "moon", "jump", "blanket", "cookie",
    "rain", "shiny", "garden", "puddle", "giggle", "key", "ladder", "hat", "sparkle", "boat",
    "wind", "apple", "map", "feather", "sing", "soft", "bridge", "shell", "smile", "basket",
    "candle", "kite", "pebble", "gentle", "treasure", "honey", "bell", "umbrella", "nest",
    "laugh", "door", "sand", "share", "scarf", "rocket", "mud", "quiet", "wobble", "button",
    "sock", "cloud", "leaf", "pancake", "dance", "tiny", "sleepy", "splash", "clock", "bucket",
)

_SEED_PROMPT_COUNT = 240
_SEED = 20240501

_QUOTED = r'(?:"[^"]+"|“[^”]+”|‘[^’]+’|\'[^\']+\')'
_WORDS_SENTENCE = re.compile(
    rf"\b(?:use|include)\s+(?:the|these)\s+words?\s*:?\s*"
    rf"({_QUOTED}(?:(?:\s*,\s*|\s+)(?:and\s+)?{_QUOTED})*)",
    re.IGNORECASE,
)
_QUOTED_ITEM = re.compile(r'"([^"]+)"|“([^”]+)”|‘([^’]+)’|\'([^\']+)\'')


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _words_sentence(words: list[str]) -> str:
    quoted = [f'"{word}"' for word in words]
    return f"Use the words {', '.join(quoted[:-1])} and {quoted[-1]}."


def _build_seed_prompts() -> tuple[str, ...]:
    rng = random.Random(_SEED)
    prompts = list(_HANDWRITTEN)
    seen = set(prompts)
    index = 0
    while len(prompts) < _SEED_PROMPT_COUNT:
        tone = rng.choice(_TONES)
        prompt = _TEMPLATES[index % len(_TEMPLATES)].format(
            tone=tone,
            a_tone=_with_article(tone),
            character=rng.choice(_CHARACTERS),
            goal=rng.choice(_GOALS),
            setting=rng.choice(_SETTINGS),
        )
        if index % 2 == 0:
            prompt += " " + _words_sentence(rng.sample(_WORD_POOL, rng.randint(2, 4)))
        index += 1
        if prompt not in seen and len(prompt) < 300:
            seen.add(prompt)
            prompts.append(prompt)
    return tuple(prompts)


SEED_PROMPTS: tuple[str, ...] = _build_seed_prompts()


def required_words(prompt: str) -> list[str]:
    """Words the prompt asks the story to use, lower-cased and in order; [] when it asks none.

    Works on user-written prompts too, so straight, curly and single quotes are all accepted.
    """
    match = _WORDS_SENTENCE.search(prompt)
    if match is None:
        return []
    words = (
        "".join(groups).strip().lower() for groups in _QUOTED_ITEM.findall(match.group(1))
    )
    return [word for word in words if word]


def _word_forms(word: str) -> set[str]:
    forms = {word, word + "s", word + "es", word + "ed", word + "ing"}
    if word.endswith("e"):
        forms |= {word + "d", word[:-1] + "ing"}
    if word.endswith("y"):
        forms |= {word[:-1] + "ies", word[:-1] + "ied"}
    if word[-1] not in "aeiouwxy" and word[-1].isalpha():
        forms |= {word + word[-1] + "ed", word + word[-1] + "ing"}
    return forms


def words_used(prompt: str, story: str) -> float:
    """Fraction of the prompt's required words found in the story; 1.0 when none are required.

    An automatic prompt-following score: whole words, any case, and simple inflections
    ("jump" counts "jumps", "jumped", "jumping") so that natural use is not penalised.
    """
    words = required_words(prompt)
    if not words:
        return 1.0
    found = 0
    for word in words:
        alternatives = "|".join(re.escape(form) for form in _word_forms(word))
        if re.search(rf"\b(?:{alternatives})\b", story, re.IGNORECASE):
            found += 1
    return found / len(words)


# --- researchers' own prompts --------------------------------------------------------------

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,59}$")
PROMPT_COLUMN = "prompt"


def check_collection(name: str) -> str:
    name = (name or "").strip()
    if not COLLECTION_NAME.match(name):
        raise ValueError("collection: 1-60 letters, digits, spaces, '.', '_' or '-', starting with a letter or digit.")
    return name


def prompt_file_rows(path: Path) -> Iterable[tuple[str, object]]:
    """(where, value) from a .txt file (a prompt a line) or a .csv/.jsonl file's `prompt` column."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file: {path} is not a file.")
    if path.suffix.lower() == ".txt":
        return lines(path.read_text(encoding="utf-8-sig", errors="replace"))
    return ((where, row.get(PROMPT_COLUMN) if row is not None else None) for where, row in file_records(path))


def hub_prompt_rows(dataset: str, split: str, column: str, token: str | None = None) -> Iterable[tuple[str, object]]:
    """(where, value) from one column of a Hub dataset or a local dataset folder."""
    for where, row in hub_records(dataset, split, token):
        if column not in row:
            raise ValueError(f"column: the dataset has no column {column!r} (it has {', '.join(row)}).")
        yield where, row[column]


def import_prompts(
    store: Store, settings: Settings, rows: Iterable[tuple[str, object]], collection: str,
    created_by: int | None = None,
) -> dict:
    """Add a batch of prompts as the named collection (source `user`), all or nothing.

    Every row is checked first (text, not empty, at most settings.max_prompt_chars): any bad
    row refuses the whole batch, naming each bad row. Prompts whose normalised text is
    already stored are skipped and counted; texts that fail the content check (rlhf.safety)
    are stored with their reason and never shown. Every active policy's pool is queued."""
    collection = check_collection(collection)
    texts, problems = [], []
    for where, value in rows:
        problem = text_problem(value, settings.max_prompt_chars)
        if problem:
            problems.append(f"{where}: {problem}")
        else:
            texts.append(value.strip())
    if problems:
        raise ImportRejected(problems)
    if not texts:
        raise ValueError("prompts: there are no prompts to import.")
    verdicts = safety.ContentCheck(store).many(texts)
    stored = prompt_rows.add_prompt_batch(store.db, list(zip(texts, verdicts)), "user", collection)
    from rlhf.policies import queue_pool  # loads torch: only when an import queues pools

    added = set(stored["added"])
    blocked = [p for p in prompt_rows.list_prompts(store.db, collection=collection)
               if p["id"] in added and p["blocked_reason"]]
    jobs = [queue_pool(store, settings, m.id, created_by)
            for m in models.list_models(store.db, active_only=True)] if len(stored["added"]) > len(blocked) else []
    return {
        "collection": collection, "rows": len(texts), "added": len(stored["added"]),
        "duplicates": stored["duplicates"], "ids": stored["added"],
        "blocked": [{"id": p["id"], "reason": p["blocked_reason"]} for p in blocked], "generate_jobs": jobs,
    }
