"""Questions for the demo adapters: templates x topics, drawn with a fixed seed.

The training topics and the held-out topics (demo-check's 20 questions) do not overlap.
"""

from __future__ import annotations

import itertools
import random

TEMPLATES = (  # none of them needs "is" or "are", so singular and plural topics both fit
    "Can you tell me about {t}?",
    "What is an interesting fact about {t}?",
    "How would you explain {t} to a child?",
    "What should everyone know about {t}?",
    "What do people like about {t}?",
    "Describe {t} in a few words.",
    "Tell me something about {t}.",
    "What do you know about {t}?",
    "Give me one fact about {t}.",
    "What makes {t} special?",
)

TRAIN_TOPICS = (
    "the moon", "the sun", "rainbows", "coffee", "tea", "the ocean", "bicycles", "the piano",
    "chess", "football", "the Eiffel Tower", "dogs", "cats", "elephants", "dolphins", "owls",
    "apples", "bread", "chocolate", "rice", "the rain", "snow", "the desert", "mountains",
    "rivers", "forests", "the library", "books", "newspapers", "the telephone", "trains",
    "airplanes", "the bicycle helmet", "gardening", "cooking", "painting", "music", "dancing",
    "swimming", "running", "sleep", "breakfast", "the city", "the farm", "the museum",
    "the zoo", "birthdays", "friendship", "the weather", "clocks", "maps", "the alphabet",
    "mathematics", "history", "the school bus", "teachers", "doctors", "firefighters",
    "the post office", "umbrellas", "candles", "the kitchen", "bridges", "castles",
)

HELD_OUT_TOPICS = (
    "volcanoes", "honey bees", "the internet", "electric cars", "the human heart",
    "photosynthesis", "black holes", "the Roman empire", "penguins", "earthquakes",
    "the violin", "cheese", "lighthouses", "tornadoes", "the Great Wall of China",
    "sharks", "vaccines", "the printing press", "windmills", "coral reefs",
)

assert not set(TRAIN_TOPICS) & set(HELD_OUT_TOPICS)

TRAIN_SEED = 1234
HELD_OUT_SEED = 4321


def train_questions(count: int, seed: int = TRAIN_SEED) -> list[str]:
    """`count` distinct training questions (at most len(TEMPLATES) * len(TRAIN_TOPICS))."""
    pairs = list(itertools.product(TEMPLATES, TRAIN_TOPICS))
    random.Random(seed).shuffle(pairs)
    if count > len(pairs):
        raise ValueError(f"at most {len(pairs)} training questions")
    return [template.format(t=topic) for template, topic in pairs[:count]]


def held_out_questions(seed: int = HELD_OUT_SEED) -> list[str]:
    """The 20 demo-check questions: one per held-out topic, each with a seeded template."""
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES).format(t=topic) for topic in HELD_OUT_TOPICS]
