"""PEFT's module-name patterns, matched in bounded time.

An adapter config is a stranger's input, and PEFT's patterns are regular expressions
(target_modules / exclude_modules as a string, rank_pattern and alpha_pattern keys,
layers_pattern): a pattern such as `(.*){1,32000}[XY]` backtracks for minutes under
Python's `re`, which holds the GIL all along, so one upload would freeze the event loop
and the engine thread.

Matching here uses the `regex` module (already installed with transformers) with
`timeout=` and `concurrent=True`:
- one `PatternMatcher` resolves one config and gives all of its matches together one
  budget (`MATCH_BUDGET_S`); a config whose patterns need more is refused with
  AdapterInvalid naming the key, so an upload is answered well within 2 s;
- `concurrent=True` releases the GIL while matching, so the other threads run meanwhile.
Measured (2-core machine): `(.*){1,32000}[XY]` against a module name stops 0.25 s after a
0.25 s timeout; a 5 ms sleeper in another thread wakes within 5-11 ms with
concurrent=True, but only after the whole match (250-1000 ms) without it. `regex` also
fails most textbook-catastrophic patterns (`(.*.*)*X`, `(a|aa)*b`) in well under 1 ms,
where `re` never returns.
google-re2 was measured too (linear time, same speed on these names) but refuses
lookarounds and backreferences, which PEFT (Python `re`) accepts and real configs use,
e.g. `^(?!.*vision).*q_proj`. `regex` in its default VERSION0 mode follows `re`'s syntax;
patterns are still compiled with `re` first, so what PEFT refuses is refused here too.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import regex

from loramux.adapter_store.errors import AdapterInvalid

# re's own parser gives a pattern's tree without expanding it (private, stable since 3.11;
# the project needs Python >= 3.11).
sre_constants = re._constants  # type: ignore[attr-defined]
sre_parser = re._parser  # type: ignore[attr-defined]
_REPEATS = (
    sre_constants.MAX_REPEAT,
    sre_constants.MIN_REPEAT,
    sre_constants.POSSESSIVE_REPEAT,
)

# All matches of one config resolution together; real configs need well under 10 ms.
MATCH_BUDGET_S = 0.3
# Longest pattern, and all patterns of one config together: real ones are a few hundred
# characters (an alternation of module names at most). Checking and compiling cost up to
# ~25 us a character with the GIL held (no timeout applies there), so the total bounds that
# to ~0.4 s per config.
MAX_PATTERN_CHARS = 8 << 10
MAX_CONFIG_PATTERN_CHARS = 16 << 10
# `regex` expands counted repeats when it compiles (no timeout applies there): `x{4294967294}`
# exhausts memory and `((a{100}){100}){100}` takes 0.65 s, while `a{100000}` takes 40 ms.
# So the pattern's size with every count multiplied out is bounded before it is compiled.
MAX_EXPANDED_SIZE = 100_000


class PatternMatcher:
    """Matches PEFT patterns against module names within one shared time budget.

    Every method raises AdapterInvalid (naming `key`, the config key the pattern came from)
    once the budget is spent.
    """

    def __init__(
        self,
        adapter_id: str,
        path: str | Path | None,
        budget_s: float = MATCH_BUDGET_S,
        clock=time.monotonic,
    ) -> None:
        self.adapter_id = adapter_id
        self.path = path
        self._clock = clock
        self._deadline = clock() + budget_s
        self._budget_s = budget_s
        self._compiled: dict[str, regex.Pattern] = {}  # compiled once per config

    def fullmatch(self, key: str, pattern: str, name: str) -> bool:
        """re.fullmatch(pattern, name) is not None."""
        return self._run(key, pattern, name, full=True)

    def match(self, key: str, pattern: str, name: str) -> regex.Match | None:
        """re.match(pattern, name): anchored at the start only."""
        return self._run(key, pattern, name, full=False)

    def _run(self, key: str, pattern: str, name: str, full: bool):
        left = self._deadline - self._clock()
        if left <= 0:
            raise self._too_slow(key, pattern)
        compiled = self._compiled.get(pattern)
        if compiled is None:
            compiled = self._compiled[pattern] = compile_pattern(pattern)
        try:
            if full:
                return compiled.fullmatch(name, timeout=left, concurrent=True) is not None
            return compiled.match(name, timeout=left, concurrent=True)
        except TimeoutError:
            raise self._too_slow(key, pattern) from None

    def _too_slow(self, key: str, pattern: str) -> AdapterInvalid:
        shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
        return AdapterInvalid(
            self.adapter_id,
            self.path,
            f"{key!r} holds a regex that takes too long to match module names "
            f"(more than {self._budget_s:g} s): {shown!r}",
        )


def compile_pattern(pattern: str) -> regex.Pattern:
    """The `regex` compilation of a pattern already checked by check_pattern."""
    return regex.compile(pattern, cache_pattern=False)


def check_pattern(pattern: str) -> str | None:
    """Why `pattern` cannot be used (too long, or not a regex for `re` or `regex`), or None."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"is {len(pattern)} characters long, more than {MAX_PATTERN_CHARS}"
    try:
        # PEFT's own syntax: what re's parser refuses, we refuse. Parsed, not compiled:
        # re.compile holds the GIL for ~15 ms per wide character class ([\u0100-\uffff]),
        # seconds for a config full of them.
        size = _expanded_size(sre_parser.parse(pattern))
        if size > MAX_EXPANDED_SIZE:
            return (
                f"repeats its parts {size:,} times when counted repeats are multiplied out, "
                f"more than {MAX_EXPANDED_SIZE:,}"
            )
        regex.compile(pattern)
    except (re.error, regex.error) as e:
        return f"is not a valid regex: {e}"
    except (RecursionError, OverflowError, MemoryError) as e:  # absurd nesting or counts
        return f"cannot be compiled: {type(e).__name__}"
    return None


def _expanded_size(parsed) -> int:
    """Items of a parsed pattern (re's parser: a tree, never expanded), with each counted
    repeat's body counted max-count times (min-count when unbounded); stops growing past
    MAX_EXPANDED_SIZE so an absurd pattern costs no more than a sane one."""
    total = 0
    for op, av in parsed:
        if op in _REPEATS:
            low, high, body = av
            count = low if high == sre_constants.MAXREPEAT else high
            total += max(count, 1) * _expanded_size(body)
        elif op is sre_constants.SUBPATTERN:
            total += _expanded_size(av[-1])
        elif op is sre_constants.BRANCH:
            total += sum(_expanded_size(branch) for branch in av[1])
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            total += _expanded_size(av[1])
        elif op is sre_constants.ATOMIC_GROUP:
            total += _expanded_size(av)
        elif op is sre_constants.GROUPREF_EXISTS:
            total += sum(_expanded_size(branch) for branch in av[1:] if branch is not None)
        else:
            total += 1
        if total > MAX_EXPANDED_SIZE:
            return total
    return total
