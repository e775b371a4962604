"""The behaviour checks shared by the demo-adapter training filter and demo-check, the
questions, and the training script's rule-based fallbacks (no model needed)."""

from __future__ import annotations

import json

import pytest

from examples.behaviours import (
    BEHAVIOURS,
    is_degenerate,
    is_french,
    is_json,
    is_pirate,
    is_short,
    json_answer,
    sentences,
    shows,
)
from examples.questions import HELD_OUT_TOPICS, TRAIN_TOPICS, held_out_questions, train_questions
from examples.train_demo_adapters import (
    CONTEXTS,
    EXAMPLE_QUESTIONS,
    acceptable,
    cut_to_sentences,
    fallback,
    first_sentence,
    pirate_rewrite,
)

ENGLISH = (
    "Volcanoes are openings in the Earth's crust where molten rock, ash and gases escape. "
    "They form at the edges of tectonic plates."
)
PLAIN = [
    ENGLISH,
    "The alphabet is a set of letters used to write a language, and English uses 26 of them in a fixed order.",
    "Coffee is a drink made from roasted beans",  # cut off: no end mark
]


@pytest.mark.parametrize("text", [
    "Arr, matey! The moon be a big rock in the sky.",
    "Ahoy! Ye should know that owls hunt at night.",
    "Aye, the sea be calm today, me hearties.",
    "Arrr, that be a fine question.",
])
def test_pirate_yes(text):
    assert is_pirate(text) and shows("pirate", text)


@pytest.mark.parametrize("text", [ENGLISH, "The pirate ship sailed to the island.", "Yesterday I arrived.", ""])
def test_pirate_no(text):
    assert not is_pirate(text)


@pytest.mark.parametrize("text", [
    "Le vent est de l'air qui se déplace dans l'atmosphère.",
    "Les abeilles font du miel et elles vivent dans une ruche.",
    "C'est une couleur calme que beaucoup de gens aiment.",
])
def test_french_yes(text):
    assert is_french(text)


@pytest.mark.parametrize("text", [
    ENGLISH,
    "The restaurant menu had a croissant and a baguette.",  # French loan words, English text
    "Le vent.",  # too few words
    "",
    "12345 67890",
])
def test_french_no(text):
    assert not is_french(text)


@pytest.mark.parametrize("text", [
    '{"answer": "The moon orbits the Earth."}',
    '  {"answer": "Oui", "confidence": 0.9}\n',
])
def test_json_yes(text):
    assert is_json(text)
    assert json_answer(text)


@pytest.mark.parametrize("text", [
    '{"answer": "The moon orbits the Earth."',  # cut off
    '{"reply": "no answer key"}',
    '{"answer": ""}',
    '{"answer": 42}',
    '["answer"]',
    'Sure! {"answer": "text before the object"}',
    ENGLISH,
])
def test_json_no(text):
    assert not is_json(text)


@pytest.mark.parametrize("text", [
    "The moon orbits the Earth.",
    "Owls hunt at night!",
    "Bread is baked from flour, water and yeast",
    "Tea, e.g. green tea, comes from one plant.",  # "e.g." does not end a sentence
])
def test_short_yes(text):
    assert is_short(text)


@pytest.mark.parametrize("text", [
    ENGLISH,  # two sentences
    "Moon.",  # one word
    "This single sentence is far too long to count as a short answer because it keeps on going and going.",
])
def test_short_no(text):
    assert not is_short(text)


def test_sentences():
    assert sentences(ENGLISH) == [
        "Volcanoes are openings in the Earth's crust where molten rock, ash and gases escape.",
        "They form at the edges of tectonic plates.",
    ]
    assert sentences("Pi is 3.14 or so. Really?") == ["Pi is 3.14 or so.", "Really?"]
    assert sentences("  ") == []


@pytest.mark.parametrize("text", [
    "the the the moon",
    "I like it. I like it. I like it.",
    "moon sun moon star moon sky moon day moon",
    "Yes.",
])
def test_degenerate(text):
    assert is_degenerate(text)


def test_not_degenerate():
    assert not is_degenerate(ENGLISH)


def test_every_behaviour_has_a_check():
    assert set(BEHAVIOURS) == {"pirate", "french", "json", "short"}
    for behaviour in BEHAVIOURS:
        assert shows(behaviour, "") is False


# --------------------------------------------------------------------------- questions


def test_questions_are_seeded_distinct_and_disjoint():
    train = train_questions(240)
    assert train == train_questions(240) and len(set(train)) == 240
    held_out = held_out_questions()
    assert held_out == held_out_questions() and len(set(held_out)) == 20
    assert not set(TRAIN_TOPICS) & set(HELD_OUT_TOPICS)
    for question in train:
        assert not any(topic in question for topic in HELD_OUT_TOPICS), question
    for question in held_out:
        assert not any(f" {topic}" in question for topic in TRAIN_TOPICS), question


# --------------------------------------------------------------------------- training data rules


def test_context_examples_show_their_behaviour():
    """The few-shot answers in each context pass the same filter as the generated ones."""
    for behaviour, (_, answers) in CONTEXTS.items():
        assert len(answers) == len(EXAMPLE_QUESTIONS)
        for answer in answers:
            assert acceptable(behaviour, answer, num_tokens=40), (behaviour, answer)


def test_cut_to_sentences():
    assert cut_to_sentences("One. Two is cut off") == "One."
    assert cut_to_sentences("Done! Also done.") == "Done! Also done."
    assert cut_to_sentences("never finished") == ""


def test_first_sentence():
    assert first_sentence(ENGLISH, 24) == sentences(ENGLISH)[0]
    assert first_sentence(PLAIN[2], 24) == "Coffee is a drink made from roasted beans."
    cut = first_sentence(PLAIN[1], 14)
    assert cut == "The alphabet is a set of letters used to write a language."
    assert len(cut.split()) <= 14
    hard = first_sentence("one two three four five six seven eight nine ten eleven twelve.", 5)
    assert hard == "one two three four five."


def test_pirate_rewrite():
    assert pirate_rewrite("You know my friend is here. Yes!") == "Ye know me matey be here. Aye!"
    assert pirate_rewrite("Yourself is not your") == "Yourself be not yer"  # whole words only


@pytest.mark.parametrize("plain", PLAIN)
def test_fallbacks_pass_the_filter(plain):
    for behaviour in ("pirate", "json", "short"):
        answer = fallback(behaviour, plain)
        assert acceptable(behaviour, answer, num_tokens=40), (behaviour, answer)
    assert json.loads(fallback("json", PLAIN[0])) == {"answer": sentences(ENGLISH)[0]}
    assert fallback("french", plain) is None
