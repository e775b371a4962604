"""The README shows adapter composition and export with commands tests/test_readme.py runs."""

from __future__ import annotations

from tests.test_readme import BLOCKS


def test_readme_runs_merged_adapters_and_export():
    run = [b for b in BLOCKS if not b.skipped and not b.slow]
    bash = "\n".join(b.code for b in run if b.language == "bash")
    python = "\n".join(b.code for b in run if b.language == "python")
    assert '"merged_adapters": {' in bash and '"merge_strategy": "ties"' in bash  # /generate parameters
    assert 'extra_body={"merged_adapters": merge}' in python  # the OpenAI routes
    assert "MergedAdapters(" in python  # lorax-client
    assert "loramux export pirate" in bash and "loramux export '{\"ids\"" in bash  # an adapter and a merge
