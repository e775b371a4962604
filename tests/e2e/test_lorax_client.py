"""The LoRAX/TGI API through `lorax-client`, unmodified, against a real tiny-model server."""

from __future__ import annotations

import httpx
import pytest
from lorax import Client
from lorax.errors import NotFoundError, ValidationError

from tests.e2e.conftest import API_KEY

# lorax-client calls pydantic's deprecated .dict(); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT = "Once upon a time"
MAX_NEW = 8


@pytest.fixture(scope="module")
def lorax(tiny_server):
    return Client(tiny_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


@pytest.fixture(scope="module")
def prompt_ids(tiny_reference):
    return tiny_reference.prompt_ids(PROMPT)


def test_generate_with_adapter_and_details(lorax, tiny_reference, prompt_ids):
    ref = tiny_reference.greedy(prompt_ids, "alpha", MAX_NEW, logprobs=0)
    assert ref.text != tiny_reference.greedy(prompt_ids, None, MAX_NEW).text
    r = lorax.generate(PROMPT, adapter_id="alpha", max_new_tokens=MAX_NEW, details=True)
    assert r.generated_text == ref.text
    d = r.details
    assert d.finish_reason == "length"
    assert d.generated_tokens == MAX_NEW == len(d.tokens)
    assert d.prompt_tokens == len(prompt_ids)
    assert d.prefill == [] and d.seed is None
    assert [t.id for t in d.tokens] == ref.token_ids
    for token, want in zip(d.tokens, ref.logprobs):
        assert isinstance(token.logprob, float) and token.logprob <= 0.0
        assert token.logprob == pytest.approx(want.logprob, abs=1e-3)
    assert "".join(t.text for t in d.tokens) == r.generated_text


def test_generate_decoder_input_details(lorax, tiny_reference, prompt_ids):
    ref = tiny_reference.greedy(prompt_ids, "beta", 4, prompt_logprobs=0)
    r = lorax.generate(PROMPT, adapter_id="beta", max_new_tokens=4, decoder_input_details=True)
    prefill = r.details.prefill
    assert [t.id for t in prefill] == prompt_ids
    assert prefill[0].logprob is None
    assert [t.logprob for t in prefill[1:]] == pytest.approx([p.logprob for p in ref.prompt_logprobs], abs=1e-3)
    assert r.generated_text == ref.text


def test_generate_stream_with_adapter(lorax, tiny_reference, prompt_ids):
    ref = tiny_reference.greedy(prompt_ids, "beta", MAX_NEW)
    events = list(lorax.generate_stream(PROMPT, adapter_id="beta", max_new_tokens=MAX_NEW))
    assert len(events) == MAX_NEW
    assert all(isinstance(e.token.logprob, float) for e in events)
    assert [e.token.id for e in events] == ref.token_ids
    assert all(e.details is None and e.generated_text is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == ref.text == "".join(e.token.text for e in events)
    assert last.details.finish_reason == "length"
    assert last.details.generated_tokens == MAX_NEW
    assert last.details.prompt_tokens == len(prompt_ids)


def test_base_model_stop_sequence(lorax, tiny_reference, prompt_ids):
    full = tiny_reference.greedy(prompt_ids, None, 12).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    r = lorax.generate(PROMPT, max_new_tokens=12, stop_sequences=[stop], details=True)
    assert r.generated_text == full[: full.index(stop)]
    assert r.details.finish_reason == "stop_sequence"


def test_unknown_adapter_raises_not_found(lorax, tiny_server):
    with pytest.raises(NotFoundError, match="no-such-adapter"):
        lorax.generate(PROMPT, adapter_id="no-such-adapter", max_new_tokens=2)
    with pytest.raises(NotFoundError):
        next(iter(lorax.generate_stream(PROMPT, adapter_id="no-such-adapter", max_new_tokens=2)))
    with httpx.Client(base_url=tiny_server.url, headers=tiny_server.headers()) as c:
        r = c.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "no-such-adapter"}})
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"


def test_validation_error_is_422(lorax, tiny_server):
    with pytest.raises(ValidationError, match="max_new_tokens"):
        lorax.generate(PROMPT, max_new_tokens=5000)
    with httpx.Client(base_url=tiny_server.url, headers=tiny_server.headers()) as c:
        for body in (
            {"inputs": PROMPT, "parameters": {"max_new_tokens": 5000}},
            {"inputs": "", "parameters": {"max_new_tokens": 2}},
            {"inputs": PROMPT, "parameters": {"max_new_tokens": "many"}},
            {"parameters": {}},
        ):
            r = c.post("/generate", json=body)
            assert r.status_code == 422, body
            payload = r.json()
            assert set(payload) == {"error", "error_type"} and payload["error_type"] == "validation"
            assert payload["error"]
        # The server keeps serving.
        assert c.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_compat_route_and_info(tiny_server):
    with httpx.Client(base_url=tiny_server.url, headers=tiny_server.headers()) as c:
        r = c.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200 and isinstance(r.json(), list) and len(r.json()) == 1
        info = c.get("/info").json()
    assert info["model_id"] == "tiny-llama" and info["max_total_tokens"] == 1024
