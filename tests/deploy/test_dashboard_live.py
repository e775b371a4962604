"""`make test-dashboard`: a real Prometheus scrapes a real loramux (the default model) under
a short mixed load; every PromQL expression of the Grafana dashboard and of the alert
rules runs through Prometheus's HTTP API and must return data, and every metric it names
must be in the server's /metrics.

The alerts are made to fire for real: a burst past --max-num-seqs (queue growing), a KV
cache sized so that burst fills it (KV cache near full), an adapter whose weights are
corrupt (load failures), and at the end the server is stopped (engine down).
"""

from __future__ import annotations

import concurrent.futures
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from loramux.server.model_fetch import default_model_dir
from tests.deploy.promql import ALERTS, PROMETHEUS_SERIES, alert_expressions, dashboard_expressions, metric_names
from tests.e2e.conftest import start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.model]

REPO = Path(__file__).resolve().parents[2]
DEMO_ADAPTERS = REPO / "examples" / "adapters"
SCRAPE_S = 1
DATA_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test-dashboard` installs Debian's prometheus package")
    return path


@pytest.fixture(scope="module")
def loramux(tmp_path_factory):
    model = default_model_dir()
    if not (model / ".loramux-complete").exists():
        pytest.skip("the default model is not fetched (run `loramux fetch-model`)")
    root = tmp_path_factory.mktemp("dashboard")
    adapters = root / "adapters"
    adapters.mkdir()
    for name in ("pirate", "french"):
        if (DEMO_ADAPTERS / name).is_dir():
            shutil.copytree(DEMO_ADAPTERS / name, adapters / name)
    # Registration reads only the config and file sizes: garbage weights of the right size
    # register, then fail when a request makes the store load them.
    source = adapters / "pirate"
    broken = adapters / "broken"
    broken.mkdir()
    shutil.copy(source / "adapter_config.json", broken / "adapter_config.json")
    size = (source / "adapter_model.safetensors").stat().st_size
    (broken / "adapter_model.safetensors").write_bytes(b"\x07" * size)
    # 12 MB of fp32 KV for this model is ~256 tokens: two running requests fill it.
    args = ["--model", str(model), "--adapter-dir", str(adapters), "--upload-dir", str(root / "uploads"),
            "--max-loras", "2", "--kv-cache-bytes", "12M", "--max-model-len", "256", "--max-num-seqs", "2",
            "--threads", "1", "--log-level", "warning"]
    server = start_server(args, root / "server.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def prometheus(loramux, tmp_path_factory):
    root = tmp_path_factory.mktemp("prometheus")
    target = loramux.url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "loramux", "static_configs": [{"targets": [target]}]}],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = open(root / "prometheus.log", "wb")
    process = subprocess.Popen(
        [_tool("prometheus"), f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"prometheus did not start:\n{(root / 'prometheus.log').read_text()[-2000:]}")
    yield url
    process.terminate()
    process.wait(30)


def query(prometheus: str, expr: str) -> list[dict]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def wait_for_data(prometheus: str, expr: str, timeout_s: float = DATA_TIMEOUT_S) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = query(prometheus, expr)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(SCRAPE_S)


def _chat(client: httpx.Client, model: str, stream: bool, max_tokens: int = 8) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Say something about the sea."}],
            "max_tokens": max_tokens, "stream": stream}
    if stream:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            r.read()
    else:
        client.post("/v1/chat/completions", json=body)


def _generate(client: httpx.Client, adapter: str | None, stream: bool, max_tokens: int = 8) -> None:
    body = {"inputs": "Tell me a short story about a ship and its crew, in a few words.",
            "parameters": {"max_new_tokens": max_tokens, **({"adapter_id": adapter} if adapter else {})}}
    client.post("/generate_stream" if stream else "/generate", json=body)


def mixed_load(url: str, rounds: int) -> None:
    with httpx.Client(base_url=url, timeout=300) as client:
        base = client.get("/v1/models").json()["data"][0]["id"]
        for i in range(rounds):
            _chat(client, [base, "pirate", "french"][i % 3], stream=i % 2 == 0)
            _generate(client, [None, "pirate", "french"][i % 3], stream=i % 2 == 1)
        client.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": "broken", "max_new_tokens": 2}})
        client.post("/v1/chat/completions", json={"model": "no-such-adapter", "messages": [{"role": "user", "content": "x"}]})


def burst(url: str, num_requests: int) -> None:
    """More long requests than --max-num-seqs at once: a queue, and a full KV cache."""
    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            model = client.get("/v1/models").json()["data"][0]["id"] if i % 2 else "pirate"
            client.post("/v1/completions", json={"model": model, "prompt": "Once upon a time", "max_tokens": 120,
                                                 "ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(num_requests) as pool:
        list(pool.map(one, range(num_requests)))


def test_every_dashboard_and_alert_expression_returns_data(loramux, prometheus):
    result = subprocess.run([_tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

    exported = {line.split("{")[0].split(" ")[0] for line in httpx.get(f"{loramux.url}/metrics").text.splitlines()
                if line and not line.startswith("#")}
    mixed_load(loramux.url, rounds=6)

    alerts = dict(alert_expressions())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(burst, loramux.url, 16)
        queue = wait_for_data(prometheus, alerts["LoramuxQueueGrowing"], timeout_s=120)
        kv = wait_for_data(prometheus, alerts["LoramuxKVCacheNearlyFull"], timeout_s=120)
        running.result()
    assert queue, "the queue-growing alert did not fire during a burst past --max-num-seqs"
    assert kv, "the KV-cache alert did not fire while the burst filled the cache"

    exported |= {line.split("{")[0].split(" ")[0] for line in httpx.get(f"{loramux.url}/metrics").text.splitlines()
                 if line and not line.startswith("#")}
    empty = []
    for title, expr in dashboard_expressions() + [(a, alerts[a]) for a in ("LoramuxAdapterLoadFailures",)]:
        unknown = metric_names(expr) - exported - PROMETHEUS_SERIES
        assert not unknown, f"{title}: {expr} names {sorted(unknown)}, which /metrics does not have"
        if not wait_for_data(prometheus, expr, timeout_s=90):
            empty.append(f"{title}: {expr}")
    assert not empty, "expressions without data:\n" + "\n".join(empty)

    stop_server(loramux)  # the engine-down alert
    down = wait_for_data(prometheus, alerts["LoramuxDown"], timeout_s=60)
    assert down, "up == 0 never showed after the server stopped"
    assert set(alerts) == {"LoramuxDown", "LoramuxQueueGrowing", "LoramuxAdapterLoadFailures",
                           "LoramuxKVCacheNearlyFull"}
