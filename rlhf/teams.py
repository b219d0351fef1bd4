"""TeaMs-RL (Gu et al. 2024) for story prompts: an RL instructor picks textual operations
that an expert applies to prompts, so the prompt set grows diverse on few expert queries.

The pieces, in the order a job uses them:

- Operations (the action set, OPERATIONS): breadth (a new, rarer prompt in the same
  domain), constraints (required words, a length limit or a point of view), deepening,
  concretizing, reasoning (a twist or a problem solved in steps) and complicate_input (a
  form such as a letter or diary entries).
- The expert executes an operation on a prompt. PolicyExecutor asks an instruct policy
  from the registry (the SmolLM2 starter by default) with the operation's instruction
  (EXPERT_INSTRUCTIONS) and samples its answer; RuleExecutor applies hand-written rules,
  deterministic given its seed, for tests and for machines where generation is too slow.
  Both count every query: the budget is in queries.
- Reward (judge): 0 for an invalid prompt (see invalid_reason: empty, outside the length
  bounds, a copy of a stored prompt, leaking the operation's instruction, no request word
  such as "write" or "tell", looping, or mostly not dictionary words). The 135M starter
  tends to answer a prompt with a story, so its answer is started with "Write" for it.
  A valid prompt earns its novelty, the cosine distance from its embedding to the nearest
  prompt of the set (the packaged MiniLM encoder, mean-pooled, or any injected encoder),
  counted only when it reaches `threshold` (0.1 by default: with MiniLM it passes the rules'
  breadth prompts and most concretized ones, few other one-sentence additions). A prompt that
  earns a reward joins the set at once, so later prompts must be new against it too.
- The instructor (Instructor) is a small torch MLP over the state: the last two operations
  and features of the current prompt (length, which operations already show in it, depth of
  the chain). It is trained with a clipped policy gradient (PPO's surrogate) and a learned
  value baseline. Why not TRPO, as the paper did: TRPO's trust region protects a large
  policy from a bad step at the price of conjugate gradients and a line search; the clipped
  surrogate keeps the same "do not move far from the policy that collected the data"
  property with first-order steps. Why not plain REINFORCE: every sample costs an expert
  query, and the clip is what makes it safe to reuse each round's samples for several
  epochs (with epochs=1 the update is exactly REINFORCE with a baseline).
- Evolution (evolve): rounds of `episodes_per_round` chains run side by side (so the
  policy expert answers in batches); a chain starts at a random prompt of the set and
  applies `steps_per_episode` operations, each to the chain's latest accepted prompt. The
  instructor learns after every round, online, from the same queries that grow the set:
  there is no separate training phase that would spend queries of its own. The return of
  a step is its reward plus DISCOUNT times the chain's next return, since an operation also
  sets up the next one (a fresh breadth prompt leaves room for a constraint).

Diversity is measured as the mean pairwise cosine distance of the embeddings, distinct-n
(distinct word n-grams over all n-grams) and, in bench/teams.py, the share of k-means
clusters a set covers. The `teams` job evolves the stored prompts, stores the accepted ones
with source 'teams', their parent and operation (storage.prompts), queues the story pool of
every active policy so the new prompts get stories (storage.completions always includes
evolved prompts, whatever --pool-prompts says) and writes its report into the job's metrics;
it registers no model.

params (all optional): preset ("quick": budget 48 | "full": 400), budget (expert queries),
executor ("policy" | "rules"), expert (id of the instruct policy; default the first starter),
instructor ("rl" | "random": WizardLM-style uniform choice, the baseline), threshold,
episodes_per_round, steps_per_episode, learning_rate, epochs, max_new_tokens and temperature
(the expert's sampling), seed.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from rlhf import safety
from rlhf.encoders import MiniLMEncoder, dictionary_words, one_torch_thread
from rlhf.params import MODEL_ID_RANGE, JobParams, check_field, param
from rlhf.prompts import required_words
from rlhf.runner import JobContext, JobResult, Kind
from rlhf.settings import Settings
from rlhf.story_features import ngrams, repeated_ngram_share, words

OPERATIONS = ("breadth", "constraints", "deepening", "concretizing", "reasoning", "complicate_input")
PRESETS = {"quick": 48, "full": 400}
EXECUTORS = ("policy", "rules")
INSTRUCTORS = ("rl", "random")
DISCOUNT = 0.5
MIN_PROMPT_CHARS = 30
MAX_REPEATED_TRIGRAMS = 0.25  # share of repeated word 3-grams: above it the expert looped
MIN_REAL_WORDS = 0.85  # share of words in the CMU dictionary (seed prompts: 0.94 and up)
HISTORY = 2  # how many past operations the instructor sees

EXPERT_SYSTEM = (
    "You write story prompts for a children's story arena. You get a story prompt and a task; "
    "answer with one new story prompt only, one to three sentences, starting with \"Write\"."
)
EXPERT_INSTRUCTIONS = {
    "breadth": "Write a brand-new story prompt for young children in the same spirit, but about a rarer "
               "topic, with different characters and a different place.",
    "constraints": "Rewrite the prompt and add one more requirement: words the story must use, a length "
                   "limit, or the point of view it is told from.",
    "deepening": "Rewrite the prompt so that the story must go deeper: a feeling the main character has to "
                 "work through, or a question the story has to explore.",
    "concretizing": "Rewrite the prompt replacing general ideas with concrete details: names, places, "
                    "objects and times.",
    "reasoning": "Rewrite the prompt so that the story needs a twist, or a problem the characters solve in "
                 "several steps.",
    "complicate_input": "Rewrite the prompt so that the story must take a special form, such as a letter, "
                        "diary entries, a recipe, a list or a play.",
}
# Phrases that show the expert echoed its task instead of answering it.
LEAK_MARKERS = re.compile(
    r"\b(?:given prompt|rewritten prompt|rewritten version|new prompt|original prompt|the prompt|your prompt"
    r"|story prompt|rewrite the|one more requirement|answer with|as an ai)\b",
    re.IGNORECASE,
)
# A prompt asks for a story; an answer without a request word is a story or a remark instead.
REQUEST_WORDS = re.compile(r"\b(?:write|tell|imagine|describe|create|invent|compose)\b", re.IGNORECASE)
# The expert's answer is started for it ("prefilled"): small instruct models otherwise tend to
# answer a prompt with a story.
ANSWER_PREFIX = "Write"
LEAK_NGRAM = 5  # this many consecutive words of an instruction inside a prompt is a leak
# Signs that an operation already shows in a prompt: state features, and the rules' "done".
OPERATION_MARKERS = {
    "breadth": re.compile(r"\b(?:rare|unusual|forgotten)\b", re.IGNORECASE),
    "constraints": re.compile(r"\buse the words?\b|\bunder \d+ words\b|\bfirst person\b|\bpoint of view\b",
                              re.IGNORECASE),
    "deepening": re.compile(r"\b(?:feels?|feelings?|learns?|wonders?)\b", re.IGNORECASE),
    "concretizing": re.compile(r"\b(?:named|called|on a \w+day|at \w+ o'clock)\b", re.IGNORECASE),
    "reasoning": re.compile(r"\b(?:twist|steps?|clues?|puzzle|solve)\b", re.IGNORECASE),
    "complicate_input": re.compile(r"\b(?:letter|diary|recipe|list|play script|postcards?|radio)\b",
                                   re.IGNORECASE),
}

# --- the rule-based expert ---------------------------------------------------------------

RARE_CHARACTERS = (
    "a retired lighthouse robot", "a pangolin who collects buttons", "a cloud that is afraid of heights",
    "a lantern fish who runs a library", "a snail postman", "a grandmother who repairs kites",
    "a moth who loves the moon", "a shy volcano", "a narwhal with a cold", "a beetle who paints",
    "a tortoise who wants to dance", "a paper boat", "an axolotl detective", "a stray comet",
    "a sock that lost its pair", "a yak who sings lullabies", "a bat who is scared of the night",
    "a quiet thunderstorm", "a caterpillar chef", "an old map that can talk",
)
RARE_SETTINGS = (
    "in a floating market", "inside a giant seashell", "on a train made of clouds", "in a city of bridges",
    "under a frozen lake", "at a night-time bakery for owls", "in a garden on a rooftop", "on a glacier",
    "in a museum after closing time", "in a village of windmills", "in a lost mitten", "on a kelp forest reef",
    "inside a music box", "at the bottom of a well", "in a tree-house hospital",
)
RARE_GOALS = (
    "tries to return a star that fell into a pond", "opens a shop that sells only quiet",
    "must wake a sleeping mountain", "teaches a storm to whisper", "searches for the end of a rainbow road",
    "builds a bridge for ants", "has to deliver a letter to the wind", "wants to count every snowflake",
    "loses the colour blue", "plans a picnic for the stars", "fixes a broken echo",
    "looks after a dragon egg for one night", "invents a new kind of hug", "finds a door in the sea",
    "races a shadow home",
)
# Shapes as varied as the seed set's, so breadth changes the topic without one template.
BREADTH_TEMPLATES = (
    "Write a {tone} story about {character} {setting} who {goal}.",
    "Once upon a time, {character} {goal}. Write what happens {setting}, in a {tone} way.",
    "Tell a {tone} bedtime tale set {setting}: {character} {goal}.",
    "Imagine {character} who {goal}. Write a short {tone} story about the day it happened {setting}.",
    "Write a fable with a {tone} ending: {character} {goal}, {setting}.",
    "Can {character} manage it? Write a {tone} story in which it {goal} {setting}.",
    "For a child who loves {tone} stories: write about {character} {setting}, and how it {goal}.",
    "Write a story that begins with {character} waking up {setting}. That day, it {goal}. Keep it {tone}.",
)
TONES = ("gentle", "funny", "mysterious", "cozy", "adventurous", "silly", "heartwarming", "calm")
RULE_WORDS = (
    "lantern", "pebble", "whistle", "marmalade", "compass", "feather", "puddle", "velvet", "acorn",
    "thimble", "honey", "ribbon", "pocket", "lullaby", "meadow", "biscuit", "umbrella", "gravel",
)
VIEWPOINTS = ("Tell it in the first person.", "Tell it from the point of view of a small animal who watches.",
              "Keep it under 150 words.", "Keep it under 100 words.")
FEELINGS = ("jealousy", "homesickness", "being left out", "nervousness", "missing a friend",
            "feeling too small", "disappointment", "pride")
NAMES = ("Priya", "Tomasz", "Amara", "Kenji", "Lucia", "Oskar", "Nia", "Mateo", "Freya", "Ravi")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
OBJECTS = ("a yellow bucket", "a cracked teapot", "a green scarf", "a tin whistle", "a jar of buttons",
           "a torn map", "a tiny bell")
TWISTS = ("Add a twist: the villain turns out to be lonely.", "Add a twist: the treasure is something nobody expected.",
          "The characters must solve a puzzle in three steps, one clue at a time.",
          "Add a twist in the middle: the helper needs help.",
          "The main character has to solve the problem in steps, and the first plan fails.")
VIEWPOINT_MARKER = re.compile(r"\bfirst person\b|\bpoint of view\b|\bunder \d+ words\b", re.IGNORECASE)
FORMS = ("Tell it as a letter to a friend.", "Tell it as three diary entries.", "Tell it as a recipe for a happy day.",
         "Tell it as a list of ten things that happened.", "Tell it as a short play script.",
         "Tell it as a series of postcards.", "Tell it as a radio news report.")


def _with(prompt: str, sentence: str) -> str:
    return f"{prompt.rstrip()} {sentence}"


class RuleExecutor:
    """The expert for tests and slow machines: each operation is a rule, drawing from fixed
    word lists with its own seeded generator, so the same seed gives the same prompts.
    An operation that already shows in the prompt returns it unchanged (a copy, rewarded 0),
    like an expert with nothing left to add."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.queries = 0

    def __call__(self, prompts: Sequence[str], operations: Sequence[str]) -> list[str]:
        self.queries += len(prompts)
        return [self.apply(p, op) for p, op in zip(prompts, operations)]

    def apply(self, prompt: str, operation: str) -> str:
        rng = self.rng
        done = OPERATION_MARKERS[operation].search(prompt) is not None
        if operation == "breadth":
            return rng.choice(BREADTH_TEMPLATES).format(
                tone=rng.choice(TONES), character=rng.choice(RARE_CHARACTERS),
                setting=rng.choice(RARE_SETTINGS), goal=rng.choice(RARE_GOALS),
            )
        if operation == "constraints":
            if not required_words(prompt):
                chosen = rng.sample(RULE_WORDS, 3)
                return _with(prompt, f'Use the words "{chosen[0]}", "{chosen[1]}" and "{chosen[2]}".')
            return prompt if VIEWPOINT_MARKER.search(prompt) else _with(prompt, rng.choice(VIEWPOINTS))
        if done:
            return prompt
        if operation == "deepening":
            return _with(prompt, f"Show how the main character feels about {rng.choice(FEELINGS)} "
                                 "and what they learn from it.")
        if operation == "concretizing":
            return _with(prompt, f"The main character is named {rng.choice(NAMES)}, it happens on a "
                                 f"{rng.choice(WEEKDAYS)}, and {rng.choice(OBJECTS)} matters to the story.")
        if operation == "reasoning":
            return _with(prompt, rng.choice(TWISTS))
        return _with(prompt, rng.choice(FORMS))


# --- the policy expert -------------------------------------------------------------------

def expert_request(operation: str, prompt: str) -> str:
    """What the expert is asked for one operation on one prompt."""
    return f"Task: {EXPERT_INSTRUCTIONS[operation]}\n\nPrompt: {prompt}\n\nNew prompt:"


def expert_format(tokenizer, request: str) -> str:
    """The request in the expert's chat template (a plain-text cue for models without one),
    with the answer started by ANSWER_PREFIX."""
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": EXPERT_SYSTEM}, {"role": "user", "content": request}]
        chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return chat + ANSWER_PREFIX
    return f"{EXPERT_SYSTEM}\n\n{request} {ANSWER_PREFIX}"


ANSWER_LABEL = re.compile(r"^\s*(?:#*\s*)?(?:new|rewritten|story)?\s*prompt\s*#*\s*:\s*", re.IGNORECASE)


def clean_answer(text: str) -> str:
    """The expert's answer as a prompt: its first paragraph, without a label or quotes."""
    paragraph = next((p for p in re.split(r"\n\s*\n", (text or "").strip()) if p.strip()), "")
    paragraph = ANSWER_LABEL.sub("", " ".join(paragraph.split()))
    return paragraph.strip().strip('"\u201c\u201d').strip()


class PolicyExecutor:
    """The expert as an instruct policy: one batched, seeded sampling call per round."""

    def __init__(self, model, tokenizer, decoding, batch_size: int = 8, seed: int = 0):
        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.batch_size, self.seed = batch_size, seed
        self.queries = 0

    def __call__(self, prompts: Sequence[str], operations: Sequence[str]) -> list[str]:
        from rlhf.generate import generate_stories

        requests = [expert_request(op, p) for p, op in zip(prompts, operations)]
        answers = generate_stories(self.model, self.tokenizer, requests, self.decoding, batch_size=self.batch_size,
                                   seed=self.seed + self.queries, formatter=expert_format)
        self.queries += len(requests)
        return [clean_answer(f"{ANSWER_PREFIX} {a.text}") for a in answers]


# --- embeddings and diversity ------------------------------------------------------------

Encoder = Callable[[Sequence[str]], np.ndarray]


def load_encoder(settings: Settings) -> Encoder:
    """The job's encoder (a function, so tests can swap in a cheap one)."""
    from rlhf.models import resolve_device

    return MiniLMEncoder(resolve_device(settings.device))


def mean_pairwise_distance(embeddings: np.ndarray) -> float:
    """Mean cosine distance over all pairs of unit vectors, in O(n d)."""
    n = len(embeddings)
    if n < 2:
        return 0.0
    total = embeddings.sum(axis=0)
    pair_similarity = (float(total @ total) - float((embeddings * embeddings).sum())) / 2
    return 1.0 - pair_similarity / (n * (n - 1) / 2)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams of the texts (1.0 for no n-grams)."""
    grams = [gram for text in texts for gram in ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else 1.0


def diversity(texts: Sequence[str], embeddings: np.ndarray) -> dict:
    return {
        "prompts": len(texts),
        "mean_pairwise_distance": mean_pairwise_distance(embeddings),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
    }


def cluster_coverage(reference: np.ndarray, members: Sequence[np.ndarray], clusters: int, seed: int = 0) -> list[float]:
    """K-means on `reference`; for each member set, the share of clusters it has a point in."""
    from sklearn.cluster import KMeans

    k = min(clusters, len(reference))
    model = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(reference)
    return [len(set(model.predict(m).tolist())) / k if len(m) else 0.0 for m in members]


# --- reward --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Judgement:
    valid: bool
    reason: str | None  # why the prompt is invalid or not new enough; None when accepted
    novelty: float
    accepted: bool
    reward: float


def normalized(text: str) -> str:
    return " ".join(words(text))


INSTRUCTION_NGRAMS = {op: set(ngrams(text, LEAK_NGRAM)) for op, text in EXPERT_INSTRUCTIONS.items()}


def invalid_reason(text: str, operation: str, known: set[str], max_chars: int) -> str | None:
    """Why an evolved prompt is unusable, or None: empty, too short or long, a copy of a known
    prompt (normalised: case, punctuation and spacing ignored), leaking the instruction, not
    a request for a story at all, looping (a phrase said over and over), or not made of words
    (the weak-supervision CMU dictionary: a random model's byte salad)."""
    if not text.strip():
        return "empty"
    if len(text) < MIN_PROMPT_CHARS:
        return "too_short"
    if len(text) > max_chars:
        return "too_long"
    if normalized(text) in known:
        return "copy"
    if LEAK_MARKERS.search(text) or set(ngrams(text, LEAK_NGRAM)) & INSTRUCTION_NGRAMS[operation]:
        return "leak"
    if not REQUEST_WORDS.search(text):
        return "not_a_prompt"
    if repeated_ngram_share(text, 3) > MAX_REPEATED_TRIGRAMS:
        return "loop"
    tokens = words(text)
    if sum(w in dictionary_words() for w in tokens) < MIN_REAL_WORDS * len(tokens):
        return "not_words"
    return None


def judge(text: str, operation: str, embedding: np.ndarray, set_embeddings: np.ndarray, known: set[str],
          threshold: float, max_chars: int) -> Judgement:
    """The reward of one evolved prompt: its novelty (cosine distance to the nearest prompt
    of the set) when it is valid and at least `threshold` away, else 0."""
    reason = invalid_reason(text, operation, known, max_chars)
    if reason is not None:
        return Judgement(False, reason, 0.0, False, 0.0)
    novelty = float(1.0 - (set_embeddings @ embedding).max()) if len(set_embeddings) else 1.0
    if novelty < threshold:
        return Judgement(True, "not_new", novelty, False, 0.0)
    return Judgement(True, None, novelty, True, novelty)


# --- the instructor ------------------------------------------------------------------------

FEATURES = (len(OPERATIONS) + 1) * HISTORY + 1 + len(OPERATIONS) + 2


def state_features(prompt: str, history: Sequence[str], depth: int, max_steps: int, max_chars: int) -> np.ndarray:
    """The instructor's view: the last HISTORY operations (one-hot, 'none' first), the prompt's
    length, which operations already show in it, the chain's depth, and a bias."""
    x = np.zeros(FEATURES, dtype=np.float32)
    recent = list(history)[-HISTORY:][::-1]
    for slot in range(HISTORY):
        op_index = OPERATIONS.index(recent[slot]) + 1 if slot < len(recent) else 0
        x[slot * (len(OPERATIONS) + 1) + op_index] = 1.0
    offset = (len(OPERATIONS) + 1) * HISTORY
    x[offset] = min(1.0, len(prompt) / max_chars)
    for i, op in enumerate(OPERATIONS):
        x[offset + 1 + i] = float(OPERATION_MARKERS[op].search(prompt) is not None)
    x[-2] = depth / max(1, max_steps)
    x[-1] = 1.0
    return x


@dataclass
class Transition:
    features: np.ndarray
    action: int
    log_prob: float
    reward: float
    chain: int  # transitions of one chain, in order, share a chain number
    ret: float = 0.0


class Instructor(torch.nn.Module):
    """Softmax policy over OPERATIONS with a value head; clipped policy-gradient updates."""

    def __init__(self, features: int = FEATURES, hidden: int = 32, learning_rate: float = 0.02,
                 epochs: int = 4, clip: float = 0.2, entropy: float = 0.03, seed: int = 0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():  # seeded weights, the caller's random state untouched
            torch.manual_seed(seed)
            self.body = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.Tanh())
            self.logits = torch.nn.Linear(hidden, len(OPERATIONS))
            self.value = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.logits.weight)  # start uniform: the random baseline
        torch.nn.init.zeros_(self.logits.bias)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=learning_rate)
        self.epochs, self.clip, self.entropy = epochs, clip, entropy

    def distribution(self, features: np.ndarray) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.logits(self.body(torch.as_tensor(features))))

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.distribution(features[None]).probs[0].numpy()

    def act(self, features: np.ndarray) -> tuple[list[int], list[float]]:
        with torch.no_grad():
            dist = self.distribution(features)
            actions = torch.multinomial(dist.probs, 1, generator=self.generator)[:, 0]
            return actions.tolist(), dist.log_prob(actions).tolist()

    def update(self, transitions: Sequence[Transition]) -> dict:
        """Epochs of the clipped surrogate on one round's transitions; returns the last losses."""
        x = torch.as_tensor(np.stack([t.features for t in transitions]))
        actions = torch.tensor([t.action for t in transitions])
        old_log_probs = torch.tensor([t.log_prob for t in transitions])
        returns = torch.tensor([t.ret for t in transitions], dtype=torch.float32)
        stats = {}
        for _ in range(self.epochs):
            hidden = self.body(x)
            dist = torch.distributions.Categorical(logits=self.logits(hidden))
            values = self.value(hidden)[:, 0]
            # Not rescaled by their spread: rewards are distances in [0, 1] already, and a
            # round where nothing was rewarded must not turn value noise into a push.
            advantages = (returns - values).detach()
            ratio = torch.exp(dist.log_prob(actions) - old_log_probs)
            surrogate = torch.min(ratio * advantages, ratio.clamp(1 - self.clip, 1 + self.clip) * advantages)
            policy_loss = -surrogate.mean()
            value_loss = torch.nn.functional.mse_loss(values, returns)
            entropy = dist.entropy().mean()
            loss = policy_loss + 0.5 * value_loss - self.entropy * entropy
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            stats = {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(), "entropy": entropy.item()}
        return stats


class RandomInstructor:
    """WizardLM-style evolution: every operation equally likely, nothing learned."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        return np.full(len(OPERATIONS), 1 / len(OPERATIONS))

    def act(self, features: np.ndarray) -> tuple[list[int], list[float]]:
        actions = self.rng.integers(len(OPERATIONS), size=len(features)).tolist()
        return actions, [math.log(1 / len(OPERATIONS))] * len(actions)

    def update(self, transitions: Sequence[Transition]) -> dict:
        return {}


def discounted_returns(transitions: list[Transition]) -> None:
    """Set each transition's return: its reward plus DISCOUNT times its chain's next return."""
    following: dict[int, float] = {}
    for t in reversed(transitions):
        t.ret = t.reward + DISCOUNT * following.get(t.chain, 0.0)
        following[t.chain] = t.ret


# --- evolution -----------------------------------------------------------------------------

@dataclass(frozen=True)
class EvolvedPrompt:
    text: str
    parent: int  # index into the set (the initial prompts first, then accepted ones in order)
    operation: str
    novelty: float
    query: int  # the expert query (1-based) that produced it


@dataclass
class Evolution:
    texts: list[str]
    embeddings: np.ndarray
    initial: int
    evolved: list[EvolvedPrompt] = field(default_factory=list)
    queries: int = 0
    # the set's mean pairwise distance after each query (index 0: before any)
    trajectory: list[float] = field(default_factory=list)
    operations: dict[str, Counter] = field(default_factory=lambda: {op: Counter() for op in OPERATIONS})
    updates: list[dict] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)

    def add(self, prompt: EvolvedPrompt, embedding: np.ndarray) -> None:
        self.texts.append(prompt.text)
        self.embeddings = np.vstack([self.embeddings, embedding[None]])
        self.evolved.append(prompt)


def evolve(
    initial: Sequence[str], executor, encoder: Encoder, instructor, budget: int, threshold: float,
    episodes_per_round: int = 8, steps_per_episode: int = 3, max_chars: int = 500, seed: int = 0,
    progress: Callable[[float, str], None] | None = None,
    unsuitable: Callable[[str], str | None] = lambda text: None,
) -> Evolution:
    """Grow `initial` with evolved prompts until `budget` expert queries are spent (see the
    module docstring); the instructor learns after every round. A prompt `unsuitable` for
    children (rlhf.safety) earns no reward and is not kept."""
    if not initial:
        raise ValueError("TeaMs-RL needs prompts to evolve; the prompt set is empty.")
    rng = random.Random(seed)
    embeddings = encoder(list(initial))
    run = Evolution(texts=list(initial), embeddings=embeddings, initial=len(initial))
    known = {normalized(t) for t in initial}
    total = embeddings.sum(axis=0)
    pair_similarity = (float(total @ total) - len(initial)) / 2

    def current_diversity() -> float:
        n = len(run.texts)
        return 1.0 - pair_similarity / (n * (n - 1) / 2) if n > 1 else 0.0

    run.trajectory.append(current_diversity())
    while run.queries < budget:
        chains = [rng.randrange(len(run.texts)) for _ in range(min(episodes_per_round, budget - run.queries))]
        histories: list[list[str]] = [[] for _ in chains]
        transitions: list[Transition] = []
        for depth in range(steps_per_episode):
            active = list(range(min(len(chains), budget - run.queries)))
            if not active:
                break
            features = np.stack([state_features(run.texts[chains[c]], histories[c], depth, steps_per_episode, max_chars)
                                 for c in active])
            with one_torch_thread():
                actions, log_probs = instructor.act(features)
            operations = [OPERATIONS[a] for a in actions]
            outputs = executor([run.texts[chains[c]] for c in active], operations)
            run.queries += len(active)
            new_embeddings = encoder(outputs)
            first_query = run.queries - len(active) + 1
            for query, (c, x, action, log_prob, op, text, embedding) in enumerate(zip(
                    active, features, actions, log_probs, operations, outputs, new_embeddings), start=first_query):
                verdict = judge(text, op, embedding, run.embeddings, known, threshold, max_chars)
                if verdict.accepted and unsuitable(text):
                    verdict = Judgement(False, "unsuitable", verdict.novelty, False, 0.0)
                stats = run.operations[op]
                stats["chosen"] += 1
                stats["reward"] += verdict.reward
                stats[verdict.reason or "accepted"] += 1
                if verdict.accepted:
                    pair_similarity += float(total @ embedding)
                    total = total + embedding
                    known.add(normalized(text))
                    run.add(EvolvedPrompt(text, chains[c], op, verdict.novelty, query), embedding)
                    chains[c] = len(run.texts) - 1
                histories[c].append(op)
                run.chosen.append(op)
                transitions.append(Transition(x, action, log_prob, verdict.reward, c))
                run.trajectory.append(current_diversity())
        discounted_returns(transitions)
        with one_torch_thread():
            run.updates.append(instructor.update(transitions))
        if progress is not None:
            progress(run.queries / budget, f"{run.queries}/{budget} expert queries, {len(run.evolved)} new prompts")
    return run


def queries_to_reach(trajectory: Sequence[float], target: float) -> int | None:
    """The first query count after which the set's diversity reached `target` (None: never)."""
    return next((i for i, value in enumerate(trajectory) if value >= target), None)


def operation_report(run: Evolution) -> dict:
    return {op: {"chosen": c["chosen"], "accepted": c["accepted"],
                 "mean_reward": c["reward"] / c["chosen"] if c["chosen"] else None,
                 "invalid": {k: v for k, v in c.items() if k not in ("chosen", "accepted", "reward")}}
            for op, c in run.operations.items()}


def evolution_report(run: Evolution, instructor, max_chars: int) -> dict:
    """Diversity of the set before and after, of the evolved prompts alone, and what the
    instructor chose and now prefers on a fresh chain."""
    fresh = state_features(run.texts[0], [], 0, 1, max_chars)
    evolved_embeddings = run.embeddings[run.initial:]
    return {
        "queries": run.queries,
        "evolved": len(run.evolved),
        "acceptance_rate": len(run.evolved) / run.queries if run.queries else None,
        "diversity_before": diversity(run.texts[:run.initial], run.embeddings[:run.initial]),
        "diversity_after": diversity(run.texts, run.embeddings),
        "evolved_diversity": diversity(run.texts[run.initial:], evolved_embeddings),
        "operations": operation_report(run),
        "instructor_probabilities": dict(zip(OPERATIONS, map(float, instructor.probabilities(fresh)))),
        "last_update": run.updates[-1] if run.updates else {},
    }


# --- the job -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TeamsParams(JobParams):
    """Validated parameters of a `teams` job (see the module docstring)."""

    preset: str = param("quick", "query budget: quick or full", choices=PRESETS)
    budget: int = param(PRESETS["quick"], "expert queries (rewrites) the job may make", low=1, high=100_000)
    executor: str = param("policy", "who rewrites prompts: an arena policy, or rules (no model)", choices=EXECUTORS)
    expert: int | None = param(None, "the policy that rewrites prompts (unset: the first starter)", low=1,
                               high=MODEL_ID_RANGE[1])
    instructor: str = param("rl", "who picks the operations: the RL instructor, or random", choices=INSTRUCTORS)
    threshold: float = param(0.1, "a new prompt is kept if it is at least this far (cosine) from all others",
                             low=0.0, high=1.0)
    episodes_per_round: int = param(8, "episodes between instructor updates", low=1, high=256)
    steps_per_episode: int = param(3, "operations applied in a row to one prompt", low=1, high=10)
    learning_rate: float = param(0.02, "the instructor's learning rate", low=0.0, high=1.0, low_open=True)
    epochs: int = param(4, "the instructor's update epochs", low=1, high=50)
    max_new_tokens: int = param(96, "tokens of each rewrite", low=8, high=512)
    temperature: float = param(0.8, "the expert's sampling temperature", low=0.0, high=2.0, low_open=True)
    seed: int = param(0, "random seed", low=0, high=2**31 - 1)

    LABEL: ClassVar[str] = "teams"

    @classmethod
    def preset_values(cls, given: dict) -> dict:
        return {"budget": PRESETS[check_field(cls, "preset", given.get("preset", "quick"))]}


def make_instructor(p: TeamsParams):
    if p.instructor == "random":
        return RandomInstructor(p.seed)
    return Instructor(learning_rate=p.learning_rate, epochs=p.epochs, seed=p.seed)


def _expert_policy(store, expert: int | None):
    from rlhf.training import chosen_model
    from storage import models

    if expert is not None:
        return chosen_model(store, expert, "expert policy")
    starters = [m for m in models.list_models(store.db) if m.kind == "starter"]
    if not starters:
        raise ValueError("Choose the expert policy that rewrites prompts (params: expert).")
    return starters[0]


def make_executor(settings: Settings, store, p: TeamsParams):
    if p.executor == "rules":
        return RuleExecutor(p.seed), None
    from rlhf.generate import Decoding
    from rlhf.models import load_causal_lm, resolve_device

    record = _expert_policy(store, p.expert)
    model, tokenizer = load_causal_lm(record.source, resolve_device(settings.device), settings.hub_token)
    decoding = Decoding(temperature=p.temperature, max_new_tokens=p.max_new_tokens)
    return PolicyExecutor(model, tokenizer, decoding, settings.generation_batch_size, p.seed), record


def run(ctx: JobContext) -> JobResult:
    """The `teams` job: evolve the stored prompts within the query budget; the accepted
    ones are stored with their lineage, and the active policies' stories for them queued,
    in the runner's registering transaction (a re-run adds nothing twice). No model."""
    from rlhf.policies import queue_pool
    from storage import models
    from storage import prompts as prompt_rows

    p, store, settings, progress = ctx.params, ctx.store, ctx.settings, ctx.progress
    rows = prompt_rows.list_prompts(store.db)
    progress(0.0, f"loading the {p.executor} expert and the encoder")
    executor, expert = make_executor(settings, store, p)
    encoder = load_encoder(settings)
    instructor = make_instructor(p)
    evolution = evolve(
        [r["text"] for r in rows], executor, encoder, instructor, p.budget, p.threshold,
        p.episodes_per_round, p.steps_per_episode, settings.max_prompt_chars, p.seed,
        lambda fraction, message: progress(0.05 + 0.85 * fraction, message), safety.ContentCheck(store),
    )
    metrics = {
        **evolution_report(evolution, instructor, settings.max_prompt_chars),
        "expert_queries": executor.queries,
        "budget": p.budget,
        "expert": expert.name if expert else "rules",
        "params": p.to_dict(),
    }

    def store_prompts(target) -> None:
        ids = [r["id"] for r in rows]
        for prompt in evolution.evolved:
            ids.append(prompt_rows.add_evolved_prompt(target.db, prompt.text, ids[prompt.parent], prompt.operation))
        policies = [m.id for m in models.list_models(target.db, active_only=True)] if evolution.evolved else []
        metrics["new_prompt_ids"] = ids[len(rows):]
        metrics["generate_jobs"] = [queue_pool(target, settings, model_id, None) for model_id in policies]

    before, after = metrics["diversity_before"], metrics["diversity_after"]
    progress(0.92, f"storing {len(evolution.evolved)} evolved prompts")
    return JobResult(
        metrics=metrics, writes=store_prompts,
        message=f"{len(evolution.evolved)} new prompts from {executor.queries} expert queries; mean pairwise "
                f"distance {before['mean_pairwise_distance']:.3f} -> {after['mean_pairwise_distance']:.3f}",
    )


KIND = Kind(
    name="teams", params=TeamsParams, run=run, produces=None, steps_param="budget",
    model_params={"expert": "expert policy"},
    help="TeaMs-RL: an RL instructor picks operations (breadth, constraints, deepening, ...) that an expert policy "
         "applies to evolve new prompts (source teams, with parent and operation); registers no model. "
         "Max steps: the expert-query budget.",
)
