"""Hostile requests against real servers: each is refused with a 4xx naming what is wrong,
fast, while /health (polled every 100 ms by tests/e2e/hostile.py) never takes over 1 s.

Also here: the loopback browser guard, keys from the environment, admission (429 before a
stream starts, the biggest request does not lock out others), SIGTERM draining, and the
engine faults (a failing forward fails only its culprit; a dead engine exits non-zero).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import (
    MAX_MODEL_LEN,
    TINY_NAME,
    Server,
    start_server,
    stop_server,
    tiny_server_args,
)
from tests.e2e.hostile import HealthWatch, check_hostile

PROMPT = "Hostile inputs are"
BODY_LIMIT = 4 << 20  # the server's default --max-request-body-bytes
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat(**fields) -> dict:
    return {"model": TINY_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def completion(**fields) -> dict:
    return {"model": TINY_NAME, "prompt": PROMPT, "max_tokens": 2, **fields}


def generate(**parameters) -> dict:
    return {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, **parameters}}


def _raw_json(text: str) -> dict:
    """A body Python's json would accept but strict JSON would not (NaN, Infinity)."""
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def _chunked(total: int, chunk: int = 1 << 16):
    """A body without Content-Length (chunked transfer): the limit must hold while it streams."""
    yield b'{"model": "x", "prompt": "'
    sent = 0
    while sent < total:
        yield b"a" * chunk
        sent += chunk
    yield b'"}'


def _nested(depth: int) -> bytes:
    return b'{"model": "x", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


# (path, request kwargs, allowed statuses, words the error must contain)
CASES = {
    # Bodies: the limit holds before parsing, declared or streamed.
    "body-over-limit": (COMPLETIONS, {"json": completion(prompt="a" * (BODY_LIMIT + 10))}, 413, "too large"),
    "body-over-limit-tgi": ("/generate", {"json": {"inputs": "a" * (BODY_LIMIT + 10)}}, 413, "too large"),
    "body-chunked-over-limit": (COMPLETIONS, {"content": _chunked(BODY_LIMIT + (1 << 20)),
                                              "headers": {"content-type": "application/json"}}, 413, "too large"),
    "json-nested-deep": (COMPLETIONS, {"content": _nested(200_000), "headers": {"content-type": "application/json"}},
                         (400, 422), ""),
    "json-not-utf8": (COMPLETIONS, {"content": b'{"prompt": "\xff\xfe"}', "headers": {"content-type": "application/json"}},
                      (400, 422), ""),
    # A prompt too long to fit is refused by its length, before it is tokenized.
    "prompt-3mb": (COMPLETIONS, {"json": completion(prompt="word " * 600_000)}, 400, "characters"),
    "inputs-3mb": ("/generate", {"json": {"inputs": "word " * 600_000}}, 422, "characters"),
    "chat-3mb": (CHAT, {"json": chat(messages=[{"role": "user", "content": "word " * 600_000}])}, 400, "characters"),
    # Client templates.
    "chat-template": (CHAT, {"json": chat(chat_template="{% for i in range(10**9) %}x{% endfor %}")}, 400,
                      "chat_template"),
    "chat-template-kwargs-nested": (CHAT, {"json": chat(chat_template_kwargs={"docs": [[[1] * 10] * 10]})}, 400,
                                    "chat_template_kwargs"),
    # Fan-out: prompts x n is capped.
    "prompts-times-n": (COMPLETIONS, {"json": completion(prompt=[PROMPT] * 8, n=4)}, 400, "prompts x n"),
    "n-too-big": (CHAT, {"json": chat(n=10**6)}, 400, "n must be"),
    # Fields: counts, lengths, ranges, types.
    "stop-count": (COMPLETIONS, {"json": completion(stop=[f"s{i}" for i in range(1000)])}, 400, "stop"),
    "stop-length": (COMPLETIONS, {"json": completion(stop=["x" * 100_000])}, 400, "stop"),
    "stop-tgi-count": ("/generate", {"json": generate(stop=[f"s{i}" for i in range(1000)])}, 422, "stop"),
    "stop-token-ids-count": (COMPLETIONS, {"json": completion(stop_token_ids=list(range(1000)))}, 400,
                             "stop_token_ids"),
    "stop-token-id-out-of-vocab": (COMPLETIONS, {"json": completion(stop_token_ids=[10**9])}, 400, "stop_token_ids"),
    "prompt-token-out-of-vocab": (COMPLETIONS, {"json": completion(prompt=[1, 2, 10**9])}, 400, "prompt"),
    "prompt-token-negative": (COMPLETIONS, {"json": completion(prompt=[[1, -5]])}, 400, "prompt"),
    "seed-huge": (COMPLETIONS, {"json": completion(seed=2**80, temperature=1.0)}, 400, "seed"),
    "seed-huge-tgi": ("/generate", {"json": generate(seed=2**80, do_sample=True)}, 422, "seed"),
    "max-tokens-huge": (COMPLETIONS, {"json": completion(max_tokens=10**30)}, 400, "max_tokens"),
    "temperature-nan": (COMPLETIONS, _raw_json('{"model": "%s", "prompt": "x", "temperature": NaN}' % TINY_NAME), 400,
                        "temperature"),
    "top-p-infinity": (CHAT, _raw_json('{"model": "%s", "messages": [{"role": "user", "content": "x"}], '
                                       '"top_p": Infinity}' % TINY_NAME), 400, "top_p"),
    "tgi-temperature-nan": ("/generate", _raw_json('{"inputs": "x", "parameters": {"temperature": NaN}}'), 422,
                            "temperature"),
    "temperature-negative": (COMPLETIONS, {"json": completion(temperature=-1)}, 400, "temperature"),
    "content-part-not-text": (CHAT, {"json": chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}])}, 400, "content"),
    "content-part-text-not-string": (CHAT, {"json": chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": {"nested": [1, 2]}}]}])}, 400, "text"),
    "content-part-not-object": (CHAT, {"json": chat(messages=[{"role": "user", "content": [5]}])}, 400, "content"),
    "message-extra-nested": (CHAT, {"json": chat(messages=[{"role": "user", "content": "x", "tool_calls": [{}]}])}, 400,
                             "tool_calls"),
    "messages-empty": (CHAT, {"json": chat(messages=[])}, 400, "messages"),
    "logprobs-huge": (COMPLETIONS, {"json": completion(logprobs=10**6)}, 400, "logprobs"),
    "top-k-negative": (COMPLETIONS, {"json": completion(top_k=-5)}, 400, "top_k"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_request_is_refused_fast(tiny_server, case):
    path, kwargs, statuses, words = CASES[case]
    started = time.perf_counter()
    r = check_hostile(tiny_server.url, lambda c: c.post(path, **kwargs), statuses, tiny_server.headers())
    assert time.perf_counter() - started < 10.0
    body = r.json()
    error = body["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert words.lower() in message.lower(), message
    assert "/tmp/" not in message and "/home/" not in message and os.sep + "work" not in message


def test_hostile_requests_leave_the_server_serving(tiny_server):
    with tiny_server.client() as c:
        r = c.post(COMPLETIONS, json=completion(max_tokens=3, temperature=0))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3


def test_info_tells_the_limits_it_enforces(tiny_server):
    info = httpx.get(f"{tiny_server.url}/info").json()
    limit = info["max_stop_sequences"]
    with tiny_server.client() as c:
        ok = c.post(COMPLETIONS, json=completion(stop=[f"zz{i}" for i in range(limit)]))
        assert ok.status_code == 200, ok.text
        over = c.post(COMPLETIONS, json=completion(stop=[f"zz{i}" for i in range(limit + 1)]))
        assert over.status_code == 400
        assert over.json()["error"]["param"] == "stop"
    assert info["max_input_length"] == MAX_MODEL_LEN - 1
    assert info["max_request_body_bytes"] == BODY_LIMIT


def _engine_steps(url: str) -> float:
    """Engine steps so far (each step observes one batch size)."""
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("loramux_batch_size_tokens_count"))


def test_the_biggest_request_does_not_lock_out_another_client(tiny_server):
    """One client streams the biggest request it may (prompts x n at the cap, each to the
    context's end); another client's small request is still answered promptly: it joins the
    running batch at once and finishes in about as many engine steps as it has tokens
    (wall time on this shared CPU is noisy, steps are not), long before the big one ends."""
    new_tokens = 8
    big = chat(n=16, max_tokens=MAX_MODEL_LEN - 40, ignore_eos=True, temperature=1.0, seed=1, stream=True)
    with tiny_server.client() as c, c.stream("POST", CHAT, json=big) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        for _ in range(40):  # the big request is running
            next(lines)
        with HealthWatch(tiny_server.url) as watch, tiny_server.client() as other:
            steps_before = _engine_steps(tiny_server.url)
            started = time.perf_counter()
            r = other.post("/generate", json=generate(max_new_tokens=new_tokens, ignore_eos_token=True))
            elapsed = time.perf_counter() - started
            steps = _engine_steps(tiny_server.url) - steps_before
        assert r.status_code == 200, r.text
        assert steps <= new_tokens + 6, f"the small request took {steps:.0f} engine steps for {new_tokens} tokens"
        assert elapsed < 30.0, f"a small request took {elapsed:.1f} s behind the biggest one"
        watch.assert_responsive()
        running = httpx.get(f"{tiny_server.url}/metrics").text
        assert "vllm:num_requests_running 16.0" in running  # the big one was still going


# --------------------------------------------------------------------------- a keyless loopback server


@pytest.fixture(scope="module")
def open_server(tiny_files, tmp_path_factory):
    """127.0.0.1, no keys (keyless management for local use), room for 4 sequences."""
    args = [a for a in tiny_server_args(tiny_files)]
    for flag in ("--api-key", "--admin-api-key"):
        i = args.index(flag)
        del args[i:i + 2]
    args[args.index("--log-level") + 1] = "info"  # the access log is read below
    args += ["--max-concurrent-requests", "4"]
    server = start_server(args, tmp_path_factory.mktemp("open") / "server.log")
    yield server
    stop_server(server)


def test_keyless_loopback_management_refuses_browsers(open_server):
    url = open_server.url
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/v1/adapters").status_code == 200  # local tools need no key
        assert c.post("/v1/adapters/alpha/pin").status_code == 200
        assert c.post("/v1/adapters/alpha/unpin").status_code == 200
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                        {"Host": "evil.example"}, {"Host": "rebound.example:8000"}):
            for method, path in (("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/alpha"),
                                 ("POST", "/v1/adapters/alpha/pin"), ("POST", "/v1/load_lora_adapter")):
                r = c.request(method, path, headers=headers, json={})
                assert r.status_code == 403, (headers, method, path, r.text)
                assert r.json()["error"]["type"] == "PermissionDeniedError"
        # A page on this machine is the same site.
        r = c.get("/v1/adapters", headers={"Origin": "http://localhost:3000", "Host": "localhost"})
        assert r.status_code == 200
        assert c.get("/v1/adapters/alpha").json()["id"] == "alpha"  # nothing was deleted


def test_request_paths_are_escaped_in_the_log(open_server):
    marker = "forged-line-7f3a"
    host, port = open_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:  # raw: no client normalises the path
        conn.sendall(f"GET /nothing%0A2026-01-01%20INFO%20{marker}%1B[31m HTTP/1.1\r\nHost: {host}\r\n"
                     "Connection: close\r\n\r\n".encode())
        assert conn.recv(64).startswith(b"HTTP/1.1 404")
    time.sleep(0.5)
    lines = [line for line in open_server.log(200_000).splitlines() if marker in line]
    assert len(lines) == 1, lines  # one request, one line: the newline did not start a forged one
    assert "GET /nothing\\x0a2026-01-01 INFO " + marker in lines[0], lines[0]
    assert "\x1b" not in lines[0]


def test_streaming_request_gets_429_before_its_stream_starts(open_server):
    long = completion(max_tokens=MAX_MODEL_LEN - 20, ignore_eos=True, n=3, stream=True)
    with httpx.Client(base_url=open_server.url, timeout=60) as c, c.stream("POST", COMPLETIONS, json=long) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        next(lines)
        # 3 of 4 sequences are in flight: a request for 2 is refused whole, before any 200.
        for path, body in ((COMPLETIONS, completion(n=2, stream=True)), (CHAT, chat(n=2, stream=True)),
                           (COMPLETIONS, completion(n=2))):
            r = c.post(path, json=body)
            assert r.status_code == 429, r.text
            assert r.json()["error"]["type"] == "RateLimitError"
            assert r.headers["retry-after"]
        r = c.post("/generate_stream", json=generate())
        assert r.status_code == 200  # the 4th slot is free
        r = c.post("/generate_stream", json=generate(max_new_tokens=1))
        assert r.status_code == 200
    # Everything reserved was given back.
    time.sleep(0.5)
    r = httpx.post(f"{open_server.url}{COMPLETIONS}", json=completion(n=4), timeout=60)
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- a public server: drain


@pytest.fixture(scope="module")
def public_server(tiny_files, tmp_path_factory):
    """Bound to all interfaces with no keys: adapter management must be refused."""
    args = [a for a in tiny_server_args(tiny_files)]
    for flag in ("--api-key", "--admin-api-key"):
        i = args.index(flag)
        del args[i:i + 2]
    args += ["--host", "0.0.0.0", "--drain-timeout", "2"]
    server = start_server(args, tmp_path_factory.mktemp("public") / "server.log")
    yield server
    stop_server(server)


def test_management_is_refused_without_an_admin_key_off_loopback(public_server):
    with httpx.Client(base_url=public_server.url, timeout=30) as c:
        for method, path in (("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/alpha"),
                             ("POST", "/v1/adapters/alpha/pin"), ("POST", "/v1/adapters/alpha/unpin"),
                             ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")):
            r = c.request(method, path, json={"lora_name": "alpha", "lora_path": "/tmp"})
            assert r.status_code == 403, (method, path, r.text)
            assert "admin" in r.json()["error"]["message"]
        assert c.post(COMPLETIONS, json=completion()).status_code == 200  # generation stays open


def test_sigterm_drains_then_exits(public_server):
    url = public_server.url
    events: list[dict] = []
    done = threading.Event()

    def stream_long() -> None:
        body = completion(max_tokens=MAX_MODEL_LEN - 20, ignore_eos=True, stream=True)
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", COMPLETIONS, json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    payload = line[len("data: "):]
                    events.append({"done": True} if payload == "[DONE]" else json.loads(payload))
        done.set()

    thread = threading.Thread(target=stream_long, daemon=True)
    thread.start()
    while len(events) < 3:
        time.sleep(0.05)
    public_server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert httpx.get(f"{url}/health", timeout=5).status_code == 503
    r = httpx.post(f"{url}{COMPLETIONS}", json=completion(), timeout=5)
    assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
    r = httpx.post(f"{url}/generate", json=generate(), timeout=5)
    assert r.status_code == 503
    assert done.wait(15), "the running stream was not ended within the drain bound"
    # It ended properly: a final chunk with a finish reason, then [DONE] (no error event).
    assert events[-1] == {"done": True}
    assert events[-2]["choices"][0]["finish_reason"] in ("abort", "length", "stop")
    assert not any("error" in e for e in events)
    assert public_server.process.wait(15) == 0


# --------------------------------------------------------------------------- faults

FORWARD_POISON = 13
ENGINE_POISON = 17
SLOW_LOAD_MS = 3000  # every adapter load of the fault server: requests on it wait queued


@pytest.fixture(scope="module")
def fault_server(tiny_files, tmp_path_factory):
    """Keys from the environment (not the command line), /metrics behind the key, faults."""
    args = [a for a in tiny_server_args(tiny_files)]
    for flag in ("--api-key", "--admin-api-key"):
        i = args.index(flag)
        del args[i:i + 2]
    args += ["--metrics-require-api-key"]
    env = {"LORAMUX_API_KEY": "env-user-key", "LORAMUX_ADMIN_API_KEY": "env-admin-key",
           "LORAMUX_TEST_FAULTS": f"forward:{FORWARD_POISON},engine:{ENGINE_POISON},slowload:{SLOW_LOAD_MS}"}
    server = start_server(args, tmp_path_factory.mktemp("faults") / "server.log", "env-user-key", "env-admin-key",
                          env=env, module="tests.e2e.fault_server")
    yield server
    stop_server(server)


def test_keys_come_from_the_environment(fault_server: Server):
    url = fault_server.url
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post(COMPLETIONS, json=completion()).status_code == 401
        assert c.post(COMPLETIONS, json=completion(), headers=fault_server.headers()).status_code == 200
        assert c.get("/v1/adapters", headers=fault_server.headers()).status_code == 403
        assert c.get("/v1/adapters", headers=fault_server.headers(admin=True)).status_code == 200
        # --metrics-require-api-key
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=fault_server.headers()).status_code == 200
        assert c.get("/health").status_code == 200


def test_a_failing_forward_fails_only_its_culprit(fault_server: Server):
    headers = fault_server.headers()
    results = {}

    def run(name: str, max_tokens: int) -> None:
        with httpx.Client(base_url=fault_server.url, headers=headers, timeout=60) as c:
            results[name] = c.post(COMPLETIONS, json=completion(prompt=PROMPT, max_tokens=max_tokens,
                                                                ignore_eos=True, temperature=0))

    alone = httpx.post(f"{fault_server.url}{COMPLETIONS}", headers=headers, timeout=60,
                       json=completion(max_tokens=40, ignore_eos=True, temperature=0)).json()["choices"][0]["text"]
    threads = [threading.Thread(target=run, args=(f"good{i}", 40)) for i in range(3)]
    threads.append(threading.Thread(target=run, args=("culprit", FORWARD_POISON)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["culprit"].status_code == 500
    assert "injected forward failure" in results["culprit"].json()["error"]["message"]
    for i in range(3):
        r = results[f"good{i}"]
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == alone  # as if the culprit had not been there
    assert httpx.get(f"{fault_server.url}/health").status_code == 200


def test_a_stream_whose_adapter_is_deleted_while_it_queues_gets_a_404_not_a_broken_200(fault_server: Server):
    """Deleted before its first token: the client named an adapter that is gone, which is
    a plain 404 before the stream starts on every route (never a 200, then an error event)."""
    streams = {
        "chat": (CHAT, chat(model="beta", stream=True)),
        "completions": (COMPLETIONS, completion(model="beta", stream=True)),
        "generate_stream": ("/generate_stream", {**generate(), "parameters": {"max_new_tokens": 2,
                                                                              "adapter_id": "beta"}}),
    }
    answers: dict[str, tuple[int, str]] = {}

    def run(name: str) -> None:
        path, body = streams[name]
        with httpx.Client(base_url=fault_server.url, headers=fault_server.headers(), timeout=60) as c, \
                c.stream("POST", path, json=body) as r:
            answers[name] = (r.status_code, r.read().decode())

    threads = [threading.Thread(target=run, args=(name,)) for name in streams]
    for t in threads:
        t.start()
    time.sleep(SLOW_LOAD_MS / 3000)  # all three queued, the load of beta under way
    r = httpx.delete(f"{fault_server.url}/v1/adapters/beta", headers=fault_server.headers(admin=True), timeout=30)
    assert r.status_code == 200, r.text
    for t in threads:
        t.join(60)
    for name, (status, text) in answers.items():
        assert status == 404, (name, status, text)
        assert "beta" in text and "data:" not in text, (name, text)
    assert httpx.get(f"{fault_server.url}/health").status_code == 200


def test_a_dead_engine_fails_its_requests_and_exits_non_zero(fault_server: Server):
    """Runs last in this module: it ends the fault server."""
    headers = fault_server.headers()
    body = completion(max_tokens=MAX_MODEL_LEN - 20, ignore_eos=True, stream=True)
    with httpx.Client(base_url=fault_server.url, headers=headers, timeout=60) as c, \
            c.stream("POST", COMPLETIONS, json=body) as running:
        assert running.status_code == 200
        lines = running.iter_lines()
        next(lines)
        r = c.post(COMPLETIONS, json=completion(max_tokens=ENGINE_POISON))
        assert r.status_code == 500
        assert "engine" in r.json()["error"]["message"]
        rest = [line for line in lines if line.startswith("data: ")]
    assert any('"error"' in line for line in rest), rest[-3:]  # the running stream was failed, not left hanging
    assert fault_server.process.wait(20) != 0
