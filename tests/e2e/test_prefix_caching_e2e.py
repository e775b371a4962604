"""Prefix caching through the HTTP server: hits counted per adapter under vLLM's names, and a
replaced or deleted-then-re-uploaded adapter never reuses the old version's KV blocks."""

from __future__ import annotations

import pytest

from tests.e2e.test_adapter_management import files_of, multipart
from tests.e2e.test_server_ops import scrape, value

# Long enough for several full KV blocks (block size 16).
PROMPT = ("A long shared preamble that several requests resend: the rules of the house, the names of "
          "the staff, the opening hours and the prices of every room, repeated so that it fills a few "
          "blocks of the cache. Now the question:")
MAX_TOKENS = 6
ADAPTER = "prefix-e2e"


@pytest.fixture(scope="module")
def expected(tiny_reference):
    ids = tiny_reference.prompt_ids(PROMPT)
    assert len(ids) >= 48
    names = ["gamma", "gamma-v2"]
    results = tiny_reference.run([(ids, n, {"max_tokens": MAX_TOKENS, "temperature": 0.0}) for n in names])
    texts = {n: r.text for n, r in zip(names, results)}
    assert texts["gamma"] != texts["gamma-v2"]
    return texts


def hits(url: str) -> float:
    return value(scrape(url), "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total", adapter=ADAPTER)


def text_of(client, model: str) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_hits_are_counted_and_new_versions_never_reuse_old_blocks(tiny_server, tiny_files, expected):
    with tiny_server.client(admin=True) as admin, tiny_server.client() as user:
        assert admin.post("/v1/adapters", **multipart(ADAPTER, files_of(tiny_files.spare / "gamma"))).status_code == 201
        assert text_of(user, ADAPTER) == expected["gamma"]
        first = hits(tiny_server.url)
        assert text_of(user, ADAPTER) == expected["gamma"]  # the same prompt again: cached
        assert hits(tiny_server.url) >= first + 48
        queries = value(scrape(tiny_server.url), "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total",
                        adapter=ADAPTER)
        assert queries >= 2 * 48

        # Replaced: version 2 computes its own K/V (its outputs are version 2's).
        before = hits(tiny_server.url)
        assert admin.post("/v1/adapters", **multipart(ADAPTER, files_of(tiny_files.spare / "gamma-v2"))).status_code == 201
        assert text_of(user, ADAPTER) == expected["gamma-v2"]
        assert hits(tiny_server.url) == before

        # Deleted and uploaded again with version 1's weights: a new version, nothing reused.
        assert admin.delete(f"/v1/adapters/{ADAPTER}").status_code == 200
        assert admin.post("/v1/adapters", **multipart(ADAPTER, files_of(tiny_files.spare / "gamma"))).status_code == 201
        before = hits(tiny_server.url)
        assert text_of(user, ADAPTER) == expected["gamma"]
        assert hits(tiny_server.url) == before
        assert admin.delete(f"/v1/adapters/{ADAPTER}").status_code == 200
