"""The four demo behaviours and their checks, shared by the training filter and demo-check.

Each check takes an answer's text and says whether it shows the behaviour:
  pirate  at least one pirate marker word (arr, ahoy, matey, ye, aye, avast, ...)
  french  at least 4 words, of which >= 25% are common French words, and more
          common-French than common-English words
  json    the whole text is a JSON object with a non-empty "answer" string
  short   one sentence of 2..19 words
`is_degenerate` flags answers no behaviour should be trained on (loops, too short).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable

BEHAVIOURS = ("pirate", "french", "json", "short")

_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-case words (letters, accents and inner apostrophes; no digits)."""
    return [w.lower().replace("’", "'") for w in _WORD.findall(text)]


# --------------------------------------------------------------------------- pirate

PIRATE_MARKERS = frozenset({
    "arr", "arrr", "arrrr", "ahoy", "matey", "mateys", "ye", "yer", "aye", "avast", "hearties",
    "hearty", "landlubber", "landlubbers", "scallywag", "scallywags", "buccaneer", "buccaneers",
    "shipmate", "shipmates", "yarr", "yo", "ho",
})


def pirate_markers(text: str) -> list[str]:
    return [w for w in words(text) if w in PIRATE_MARKERS or re.fullmatch(r"ar+g?h?", w)]


def is_pirate(text: str) -> bool:
    return len(pirate_markers(text)) >= 1


# --------------------------------------------------------------------------- french

# Frequent French function words that are not also common English words ("on", "a",
# "as", "me", "son", "plus" and the like are left out on purpose).
FRENCH_COMMON = frozenset("""
le la les un une des du de au aux et est sont était être ont avoir fait faire il elle ils elles
nous vous je tu ce cette ces cet qui que qu quoi dont où mais ou donc car ni pour par avec sans sous
sur dans entre vers chez très aussi bien comme leur leurs notre nos votre vos mon ma mes ton ta tes
sa ses se y lui eux pas ne peut peuvent tout tous toute toutes autre autres même quand
comment pourquoi parce il y été qui aussi ainsi alors beaucoup plusieurs chaque souvent toujours
jamais encore déjà après avant pendant depuis selon grâce c'est qu'il l'eau d'un d'une l'on n'est
""".split())
ENGLISH_COMMON = frozenset("""
the a an and is are was were be been being of to in on for with by at from as that this these those
it its it's they them their there which who what when where why how not no or but so if than then
can could will would should may might must have has had do does did you your we our he she his her
i my me us also very more most many much such some any all each other into about over after before
""".split())


def french_ratio(text: str) -> tuple[float, float]:
    """(share of common French words, share of common English words) among the words."""
    ws = words(text)
    if not ws:
        return 0.0, 0.0
    fr = sum(w in FRENCH_COMMON or w.split("'")[0] in ("l", "d", "qu", "n", "c", "j", "s") for w in ws)
    en = sum(w in ENGLISH_COMMON for w in ws)
    return fr / len(ws), en / len(ws)


def is_french(text: str) -> bool:
    if len(words(text)) < 4:
        return False
    fr, en = french_ratio(text)
    return fr >= 0.25 and fr > en


# --------------------------------------------------------------------------- json


def json_answer(text: str) -> str | None:
    """The "answer" of a text that is exactly one JSON object, else None."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    answer = value.get("answer")
    return answer if isinstance(answer, str) and answer.strip() else None


def is_json(text: str) -> bool:
    return json_answer(text) is not None


# --------------------------------------------------------------------------- short

# A sentence ends at . ! or ? followed by a space (or the end); "e.g." and "3.5" do not split.
_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)(?<!\bDr)(?<!\bMr)(?<!\bMrs)(?<!\bSt)[.!?]+(?=\s+|$)")


def sentences(text: str) -> list[str]:
    """The text's sentences, stripped, each with its end mark; a trailing fragment counts."""
    parts, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        parts.append(text[start:match.end()].strip())
        start = match.end()
    parts.append(text[start:].strip())
    return [p for p in parts if words(p)]


def is_short(text: str) -> bool:
    return len(sentences(text)) == 1 and 2 <= len(text.split()) < 20


# --------------------------------------------------------------------------- degenerate


def is_degenerate(text: str, min_words: int = 3) -> bool:
    """Too short, or looping: a word three times in a row, a 3-gram three times, or one
    word making up more than a third of a 9+ word answer."""
    ws = words(text)
    if len(ws) < min_words:
        return True
    if any(ws[i] == ws[i + 1] == ws[i + 2] for i in range(len(ws) - 2)):
        return True
    trigrams = Counter(tuple(ws[i:i + 3]) for i in range(len(ws) - 2))
    if trigrams and max(trigrams.values()) >= 3:
        return True
    if len(ws) >= 9 and Counter(ws).most_common(1)[0][1] > len(ws) / 3:
        return True
    return False


CHECKS: dict[str, Callable[[str], bool]] = {
    "pirate": is_pirate,
    "french": is_french,
    "json": is_json,
    "short": is_short,
}


def shows(behaviour: str, text: str) -> bool:
    return CHECKS[behaviour](text)
