"""Summarize a pytest log: `python bench/summarize_pytest.py LABEL LOG`.

Reads pytest's final summary line (e.g. "403 passed, 2 skipped, 1 warning in 51.41s",
with or without the surrounding ===) and prints exactly `LABEL: P passed, F failed` as its
last line, F counting failures and errors. Exits 1 if F > 0, if nothing passed, or if the
log has no summary line (pytest crashed or was killed).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SUMMARY = re.compile(r"^=*\s*((?:\d+ [a-z]+(?:, )?)+|no tests ran)(?: in [0-9.]+s.*)?\s*=*$")
_COUNT = re.compile(r"(\d+) ([a-z]+)")


def parse_summary(text: str) -> dict[str, int] | None:
    """Counts by outcome ('passed', 'failed', 'error', ...) from the last summary line."""
    for line in reversed(text.splitlines()):
        line = _ANSI.sub("", line).strip()
        if " in " not in line and "no tests ran" not in line:
            continue
        match = _SUMMARY.match(line)
        if match is None:
            continue
        counts: dict[str, int] = {}
        for number, word in _COUNT.findall(match.group(1)):
            word = {"errors": "error", "warnings": "warning"}.get(word, word)
            counts[word] = counts.get(word, 0) + int(number)
        return counts
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: summarize_pytest.py LABEL LOG", file=sys.stderr)
        return 2
    label, log = argv[1], Path(argv[2])
    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        print(f"{label}: cannot read {log}: {exc}", file=sys.stderr)
        print(f"{label}: 0 passed, 0 failed")
        return 1
    counts = parse_summary(text)
    if counts is None:
        print(f"{label}: no pytest summary line in {log} (did pytest crash?)", file=sys.stderr)
        print(f"{label}: 0 passed, 0 failed")
        return 1
    passed = counts.get("passed", 0)
    failed = counts.get("failed", 0) + counts.get("error", 0)
    if passed == 0:
        print(f"{label}: nothing ran", file=sys.stderr)
    sys.stderr.flush()
    print(f"{label}: {passed} passed, {failed} failed")  # the last line, always
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
