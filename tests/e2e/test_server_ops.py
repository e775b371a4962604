"""What operators rely on: /metrics, API keys, request ids, and a client that goes away."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import ADMIN_KEY, API_KEY, MAX_LORAS, TINY_NAME

PROMPT = "Metrics are"
VLLM_FAMILIES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:lora_requests_info")


def scrape(url: str) -> dict[str, list]:
    """family name -> its samples, as Prometheus would parse them."""
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(r.text)}


def value(metrics: dict, family: str, sample: str | None = None, **labels) -> float:
    """Sum of the samples of `family` named `sample` (default: the family) whose labels include `labels`."""
    name = sample or family
    return sum(s.value for s in metrics.get(family, []) if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items()))


# --------------------------------------------------------------------------- metrics


def test_metrics_move_with_an_adapter_request(tiny_server):
    before = scrape(tiny_server.url)
    for family in (*VLLM_FAMILIES, "loramux_requests", "loramux_time_to_first_token_seconds",
                   "loramux_request_generation_tokens", "loramux_adapters", "loramux_adapter_loads",
                   "loramux_kv_cache_usage_ratio", "loramux_num_requests_running"):
        assert family in before, family
    with tiny_server.client() as c:
        r = c.post("/v1/completions", json={"model": "beta", "prompt": PROMPT, "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200
        r = c.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "alpha", "max_new_tokens": 3}})
        assert r.status_code == 200
    after = scrape(tiny_server.url)

    def moved(family, sample=None, **labels):
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    assert moved("loramux_requests", "loramux_requests_total", endpoint="completions", adapter="beta",
                 outcome="length") == 1
    assert moved("loramux_requests", "loramux_requests_total", endpoint="generate", adapter="alpha",
                 outcome="length") == 1
    assert moved("loramux_time_to_first_token_seconds", "loramux_time_to_first_token_seconds_count") == 2
    assert moved("loramux_e2e_request_latency_seconds", "loramux_e2e_request_latency_seconds_count") == 2
    assert moved("loramux_request_generation_tokens", "loramux_request_generation_tokens_sum") == 8
    assert moved("loramux_request_prompt_tokens", "loramux_request_prompt_tokens_count") == 2
    assert moved("loramux_batch_size_tokens", "loramux_batch_size_tokens_count") >= 5
    # The adapters are on the device now and were loaded at least once.
    assert value(after, "loramux_adapters", tier="device") >= 2
    assert value(after, "loramux_adapters", tier="disk") >= 2
    assert value(after, "loramux_adapter_loads", "loramux_adapter_loads_total") >= 2
    assert value(after, "loramux_adapter_slots", state="total") == MAX_LORAS
    assert value(after, "loramux_adapter_load_seconds", "loramux_adapter_load_seconds_count") >= 2
    # The Gateway API Inference Extension's families, exactly as vLLM names them.
    info = [s for s in after["vllm:lora_requests_info"] if s.name == "vllm:lora_requests_info"]
    assert len(info) == 1
    assert info[0].labels["max_lora"] == str(MAX_LORAS)
    assert {"running_lora_adapters", "waiting_lora_adapters"} <= set(info[0].labels)
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0


# --------------------------------------------------------------------------- auth


def test_api_keys(tiny_server):
    url = tiny_server.url
    generate = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    chat = {"model": TINY_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    user = {"Authorization": f"Bearer {API_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=url, timeout=60) as c:
        # No key, or a wrong one: 401 on every non-public route, in each API's error shape.
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = c.post("/generate", json=generate, headers=headers)
            assert r.status_code == 401 and r.json()["error_type"] == "authentication"
            assert r.headers["www-authenticate"] == "Bearer"
            r = c.post("/v1/chat/completions", json=chat, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == 401
            assert c.get("/v1/models", headers=headers).status_code == 401
            assert c.get("/v1/adapters", headers=headers).status_code == 401
        # The user key generates; the admin key may too.
        assert c.post("/generate", json=generate, headers=user).status_code == 200
        assert c.post("/generate", json=generate, headers={"X-Api-Key": API_KEY}).status_code == 200
        assert c.post("/v1/chat/completions", json=chat, headers=user).status_code == 200
        assert c.post("/v1/chat/completions", json=chat, headers=admin).status_code == 200
        # Adapter management: the user key is known but not allowed (403); the admin key is.
        for method, path in (("GET", "/v1/adapters"), ("GET", "/v1/adapters/alpha"), ("DELETE", "/v1/adapters/alpha"),
                             ("POST", "/v1/adapters/alpha/pin"), ("POST", "/v1/adapters")):
            r = c.request(method, path, headers=user)
            assert r.status_code == 403, (method, path)
            assert r.json()["error"]["type"] == "PermissionDeniedError"
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"}, headers=user)
        assert r.status_code == 403
        assert c.get("/v1/adapters", headers=admin).status_code == 200
        assert c.get("/v1/adapters/alpha", headers=admin).json()["id"] == "alpha"
        # Health, info and metrics stay open.
        assert c.get("/health").status_code == 200
        assert c.get("/info").status_code == 200
        assert c.get("/metrics").status_code == 200


# --------------------------------------------------------------------------- request ids


def test_every_response_carries_a_request_id(tiny_server):
    with tiny_server.client() as c:
        responses = [
            c.get("/health"),
            c.get("/metrics"),
            c.get("/v1/models"),
            c.post("/v1/completions", json={"model": "nope", "prompt": PROMPT}),  # 404
            c.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 1}}),
            c.post("/generate", json={}),  # 422
            httpx.post(f"{tiny_server.url}/generate", json={"inputs": PROMPT}),  # 401
            c.get("/no/such/route"),
        ]
        ids = [r.headers.get("x-request-id") for r in responses]
        assert all(ids) and len(set(ids)) == len(ids), ids

        mine = {"X-Request-Id": "client-chosen-id-42"}
        r = c.post("/v1/chat/completions", headers=mine,
                   json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.headers["x-request-id"] == "client-chosen-id-42"
        assert r.json()["id"] == "chatcmpl-client-chosen-id-42"
        with c.stream("POST", "/generate_stream", headers=mine,
                      json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}) as r:
            assert r.headers["x-request-id"] == "client-chosen-id-42"
            r.read()
        r = c.post("/v1/completions", headers=mine, json={"model": "nope", "prompt": PROMPT})
        assert r.status_code == 404 and r.headers["x-request-id"] == "client-chosen-id-42"


def test_reused_client_request_id_does_not_collide(tiny_server):
    """Two requests in flight with the same X-Request-Id both run (the id traces, it does not key)."""
    def run(_):
        with tiny_server.client() as c:
            return c.post("/v1/completions", headers={"X-Request-Id": "same-id"},
                          json={"model": TINY_NAME, "prompt": PROMPT, "max_tokens": 40, "ignore_eos": True,
                                "temperature": 0})

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(run, range(3)))
    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 1


# --------------------------------------------------------------------------- client disconnect


def _wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "alpha", "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True,
                         "temperature": 0, "stream": True}),
    ("/v1/chat/completions", {"model": TINY_NAME, "messages": [{"role": "user", "content": "go"}], "n": 2,
                              "max_tokens": 900, "ignore_eos": True, "temperature": 0, "stream": True}),
    ("/generate_stream", {"inputs": PROMPT, "parameters": {"adapter_id": "beta", "max_new_tokens": 1000,
                                                           "ignore_eos_token": True}}),
])
def test_client_disconnect_aborts_the_request(tiny_server, path, body):
    url = tiny_server.url
    aborted_before = value(scrape(url), "loramux_requests", "loramux_requests_total", outcome="abort")
    events = 0
    with tiny_server.client() as c, c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped iterator closes the connection when collected
        while events < 3:
            line = next(lines)
            if line.startswith("data:"):
                assert "error" not in json.loads(line[len("data:"):])
                events += 1
        metrics = scrape(url)  # still connected: the request runs
        assert value(metrics, "vllm:num_requests_running") == body.get("n", 1)
        assert value(metrics, "loramux_kv_cache_usage_ratio") > 0
    # The connection is closed: the server must abort, free the KV blocks and count it.
    n = body.get("n", 1)

    def freed():
        m = scrape(url)
        return (value(m, "vllm:num_requests_running") == 0 and value(m, "loramux_kv_cache_usage_ratio") == 0
                and value(m, "loramux_requests", "loramux_requests_total", outcome="abort") == aborted_before + n
                and m)

    metrics = _wait_for(freed)
    assert metrics, scrape(url).get("vllm:num_requests_running")
    assert value(metrics, "vllm:kv_cache_usage_perc") == 0
    assert value(metrics, "loramux_adapter_slots", state="leased") == 0
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "alpha", "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "n": 2}),
    ("/v1/chat/completions", {"model": TINY_NAME, "messages": [{"role": "user", "content": "go"}],
                              "max_tokens": 900, "ignore_eos": True}),
    ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1000, "ignore_eos_token": True}}),
])
def test_client_timeout_aborts_a_non_streaming_request(tiny_server, path, body):
    """A client that gives up on a long non-streaming request frees the engine at once
    (as vLLM's with_cancellation does), instead of generating up to max_tokens for nobody."""
    url = tiny_server.url
    aborted_before = value(scrape(url), "loramux_requests", "loramux_requests_total", outcome="abort")
    with pytest.raises(httpx.ReadTimeout), tiny_server.client() as c:
        c.post(path, json=body, timeout=httpx.Timeout(60.0, read=0.3))
    n = body.get("n", 1)

    def freed():
        m = scrape(url)
        return (value(m, "vllm:num_requests_running") == 0
                and value(m, "loramux_requests", "loramux_requests_total", outcome="abort") == aborted_before + n)

    assert _wait_for(freed)  # an abort, not a run to max_tokens (outcome "length")
