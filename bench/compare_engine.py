"""bench-engine on two checkouts of the project, side by side in one run.

Runs `python -m bench.bench_engine --skip-hf` in each checkout (each with its own .venv),
alternating before/after for `--rounds` rounds so both see the same machine noise, and
compares the medians of their base and mixed8 tok/s. Used to show that a refactor (the
model seam) costs no speed: `python -m bench.compare_engine --before DIR --after DIR`.

Last line: `compare-engine: base_before=A base_after=B mixed8_before=C mixed8_after=D`.
Result: bench/results/<--name>.json (with the CPU flags).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import write_result

LAST_LINE = re.compile(r"bench-engine: base=([\d.]+) mixed8=([\d.]+)")


def run_once(checkout: Path) -> tuple[float, float]:
    """(base, mixed8) tok/s of one bench-engine run in `checkout`."""
    done = subprocess.run(
        [str(checkout / ".venv/bin/python"), "-m", "bench.bench_engine", "--skip-hf"],
        cwd=checkout, capture_output=True, text=True, check=True,
    )
    match = LAST_LINE.search(done.stdout)
    if match is None:
        raise RuntimeError(f"no bench-engine line from {checkout}:\n{done.stdout[-2000:]}")
    return float(match.group(1)), float(match.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the earlier commit")
    parser.add_argument("--after", type=Path, required=True, help="checkout of the later commit")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--name", default="bench_engine_compare", help="result file name")
    args = parser.parse_args(argv)
    runs: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    for round_index in range(args.rounds):
        order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
        for label in order:
            runs[label].append(run_once(getattr(args, label)))
            print(f"  round {round_index} {label}: base={runs[label][-1][0]:.1f} mixed8={runs[label][-1][1]:.1f}")
    medians = {
        label: {"base": statistics.median(r[0] for r in values), "mixed8": statistics.median(r[1] for r in values)}
        for label, values in runs.items()
    }
    commits = {
        label: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=getattr(args, label),
                              capture_output=True, text=True).stdout.strip()
        for label in runs
    }
    write_result(args.name, {"commits": commits, "runs": runs, "medians": medians})
    print(
        f"compare-engine: base_before={medians['before']['base']:.1f} base_after={medians['after']['base']:.1f}"
        f" mixed8_before={medians['before']['mixed8']:.1f} mixed8_after={medians['after']['mixed8']:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
