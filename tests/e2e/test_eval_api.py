"""`loramux eval` against a real server: perplexity of a text file under the base model and
an adapter, equal to the offline engine's prompt logprobs of the same chunks."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from loramux.server.eval import text_chunks
from tests.e2e.conftest import API_KEY, REPO

TEXT = (
    "The lighthouse keeper climbed the stairs every evening to light the lamp.\n\n"
    "Ships far out at sea saw the beam and steered away from the rocks. " * 3
)


def offline_perplexity(reference, text: str, adapter: str | None, max_chars: int) -> tuple[int, float]:
    logprobs = []
    for chunk in text_chunks(text, max_chars):
        result = reference.run([(reference.prompt_ids(chunk), adapter, {"max_tokens": 1, "temperature": 0.0,
                                                                          "prompt_logprobs": 0})])[0]
        logprobs += [lp.logprob for lp in result.prompt_logprobs]
    return len(logprobs), math.exp(-sum(logprobs) / len(logprobs))


def test_loramux_eval_matches_the_engine(tiny_server, tiny_reference, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    command = [sys.executable, "-m", "loramux.server.cli", "eval", str(path), "--url", tiny_server.url,
               "--api-key", API_KEY, "--adapter", "alpha", "--base", "--chunk-chars", "120", "--json"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["adapter"] for r in rows] == ["base", "alpha"]
    for row in rows:
        adapter = None if row["adapter"] == "base" else row["adapter"]
        tokens, expected = offline_perplexity(tiny_reference, TEXT, adapter, 120)
        assert row["num_chunks"] == len(text_chunks(TEXT, 120)) > 1
        assert row["num_tokens"] == tokens
        assert row["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert rows[0]["perplexity"] != pytest.approx(rows[1]["perplexity"], rel=1e-6)  # the adapter counts


def test_loramux_eval_unknown_adapter_fails_cleanly(tiny_server, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("a few words of text")
    command = [sys.executable, "-m", "loramux.server.cli", "eval", str(path), "--url", tiny_server.url,
               "--api-key", API_KEY, "--adapter", "no-such-adapter"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("loramux: error:")
    missing = subprocess.run([*command[:4], str(tmp_path / "absent.txt"), *command[5:]], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "loramux: error:" in missing.stderr
