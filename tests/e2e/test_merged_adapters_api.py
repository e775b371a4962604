"""`merged_adapters` over HTTP against the tiny-model server: lorax-client on /generate, the
openai package's extra_body on chat and completions, and 4xx answers naming the field.

Expected tokens come from the offline reference engine serving the same merge
(tests/e2e/conftest.py); the tiny server has `alpha` (rank 8) and `beta` (rank 4)."""

from __future__ import annotations

import httpx
import openai
import pytest
from lorax import Client, MergedAdapters

from loramux.adapter_store.merge import MergeSpec
from tests.e2e.conftest import API_KEY, TINY_NAME

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # lorax-client's .dict()

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Name three colors."}]
MAX_NEW = 8
MERGE = {"ids": ["alpha"], "weights": [0.4], "merge_strategy": "ties", "density": 0.6, "majority_sign_method": "total"}


@pytest.fixture(scope="module")
def merged_id(tiny_reference):
    return tiny_reference.parts.store.merges.resolve(MergeSpec.create(**MERGE))


def test_generate_with_merged_adapters_matches_the_reference(tiny_server, tiny_reference, merged_id):
    lorax = Client(tiny_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    ids = tiny_reference.prompt_ids(PROMPT)
    expected = tiny_reference.greedy(ids, merged_id, MAX_NEW)
    assert expected.token_ids != tiny_reference.greedy(ids, "alpha", MAX_NEW).token_ids  # 0.4 x alpha is not alpha
    r = lorax.generate(PROMPT, merged_adapters=MergedAdapters(**MERGE), max_new_tokens=MAX_NEW, details=True)
    assert [t.id for t in r.details.tokens] == expected.token_ids
    listed = {a["id"]: a for a in httpx.get(f"{tiny_server.url}/v1/adapters", headers=tiny_server.headers(admin=True))
              .json()["data"]}
    assert [a for a in listed.values() if a.get("source") == "merge"], listed  # an adapter like the others


def test_openai_routes_take_merged_adapters_as_extra_body(tiny_server, tiny_reference, merged_id):
    with openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as client:
        chat = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=MAX_NEW, temperature=0,
                                              extra_body={"merged_adapters": MERGE})
        completion = client.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=MAX_NEW, temperature=0,
                                               extra_body={"merged_adapters": MERGE})
    assert chat.choices[0].message.content == tiny_reference.greedy(
        tiny_reference.chat_ids(MESSAGES), merged_id, MAX_NEW).text
    assert completion.choices[0].text == tiny_reference.greedy(tiny_reference.prompt_ids(PROMPT), merged_id,
                                                               MAX_NEW).text


@pytest.mark.parametrize("merged,status,field", [
    ({"ids": ["alpha", "nope"]}, 404, "merged_adapters.ids"),
    ({"ids": ["alpha", "beta"]}, 422, "merged_adapters.ids"),  # ranks 8 and 4
    ({"ids": ["alpha"], "density": 0}, 422, "merged_adapters.density"),
    ({"ids": ["alpha"], "weights": [1, 2]}, 422, "merged_adapters.weights"),
    ({"ids": ["alpha"], "merge_strategy": "svd"}, 422, "merged_adapters.merge_strategy"),
    ({"ids": ["alpha"], "majority_sign_method": "mean"}, 422, "merged_adapters.majority_sign_method"),
    ({"ids": ["alpha"] * 3}, 422, "merged_adapters.ids"),
    ({"ids": [f"a{i}" for i in range(9)]}, 422, "merged_adapters.ids"),
    ({"ids": ["alpha"], "extra": 1}, 422, "merged_adapters.extra"),
    ({"weights": [1]}, 422, "merged_adapters.ids"),
])
def test_bad_merges_are_refused_naming_the_field(tiny_server, merged, status, field):
    with tiny_server.client() as http:
        r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"merged_adapters": merged}})
        assert r.status_code == status and field in r.json()["error"], r.text
        oa = http.post("/v1/completions", json={"model": TINY_NAME, "prompt": PROMPT, "merged_adapters": merged})
        assert oa.status_code == (404 if status == 404 else 400) and oa.json()["error"]["param"] == field, oa.text


def test_adapter_and_merge_together_are_refused(tiny_server):
    with tiny_server.client() as http:
        r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "alpha",
                                                                           "merged_adapters": {"ids": ["alpha"]}}})
        assert r.status_code == 422 and "merged_adapters" in r.json()["error"]
        oa = http.post("/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES,
                                                     "merged_adapters": {"ids": ["alpha"]}})
        assert oa.status_code == 400 and oa.json()["error"]["param"] == "merged_adapters"
