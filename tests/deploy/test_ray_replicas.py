"""loramux on Ray Serve, for real: two replicas of the default model behind `loramux-ray`.

- Routing is adapter-affine: on one Zipf workload over 50 adapters, the affine app loads
  each adapter from disk on one replica only, round-robin routing loads many on both.
- An adapter uploaded through the front door reaches both replicas (and a replica started
  later), and a delete leaves both.
- A replica killed mid-run is replaced by Serve while the other keeps serving.
Slow (two model replicas on a small machine): `make test-slow`.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("ray", reason="Ray Serve is the optional extra loramux[ray]: `make install-ray`")

from bench.bench_replicas import (  # noqa: E402
    affinity,
    disk_loads,
    make_adapters,
    run_workload,
    start_app,
    stop_app,
    zipf_sequence,
)
from loramux.server.model_fetch import default_model_dir  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.model, pytest.mark.timeout(3600)]

NUM_ADAPTERS = 50
NUM_REQUESTS = 200
CONCURRENCY = 4
MAX_TOKENS = 2


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    if not (default_model_dir() / ".loramux-complete").exists():
        pytest.skip("the default model is not fetched (run `loramux fetch-model`)")
    root = tmp_path_factory.mktemp("ray-adapters")
    return root, make_adapters(root, NUM_ADAPTERS)


@pytest.fixture(scope="module")
def affine_app(adapters, tmp_path_factory):
    app = start_app("affine", tmp_path_factory.mktemp("ray-affine"), adapters[0])
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def affine_run(affine_app, adapters):
    """The Zipf workload on the fresh affine app (first thing it serves)."""
    sequence = zipf_sequence(adapters[1], NUM_REQUESTS, 1.0, seed=1)
    outcomes, _ = run_workload(affine_app.url, sequence, CONCURRENCY, MAX_TOKENS)
    return sequence, outcomes, disk_loads(affine_app)


def test_routing_is_adapter_affine_compared_with_round_robin(affine_run, adapters, tmp_path_factory):
    sequence, affine, affine_loads = affine_run
    app = start_app("round_robin", tmp_path_factory.mktemp("ray-rr"), adapters[0])
    try:
        round_robin, _ = run_workload(app.url, sequence, CONCURRENCY, MAX_TOKENS)
        rr_loads = disk_loads(app)
    finally:
        stop_app(app)
    distinct = len(set(sequence))
    for name, outcomes in (("affine", affine), ("round_robin", round_robin)):
        assert [o.status for o in outcomes] == [200] * NUM_REQUESTS, name
        assert len({o.replica for o in outcomes}) == 2, f"{name}: both replicas serve"
    cold_affine, cold_rr = sum(affine_loads.values()), sum(rr_loads.values())
    print(f"distinct={distinct} cold_affine={cold_affine} {affine_loads} cold_rr={cold_rr} {rr_loads} "
          f"affinity={affinity(affine):.3f}/{affinity(round_robin):.3f}")
    # Affine: (almost) every adapter is read from disk on one replica only.
    assert distinct <= cold_affine <= distinct * 1.1
    assert cold_affine * 1.25 <= cold_rr
    assert affinity(affine) >= 0.95 > 0.85 >= affinity(round_robin)


def _on_every_replica(app, adapter_id: str, present: bool, timeout_s: float = 30.0) -> list[str]:
    """The replicas whose server does (or does not) know the adapter, waiting up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = app.replicas()
        states = {r["replica"]: httpx.get(f"{r['url']}/v1/adapters/{adapter_id}", timeout=30).status_code == 200
                  for r in replicas}
        if (len(states) == 2 and all(v == present for v in states.values())) or time.monotonic() > deadline:
            return [name for name, known in states.items() if known == present]
        time.sleep(0.5)


def test_an_upload_reaches_both_replicas(affine_app, affine_run, adapters):
    source = adapters[0] / ".source" / "source"  # make_adapters writes its one trained adapter there
    files = [("file", (name, (source / name).read_bytes())) for name in ("adapter_config.json",
                                                                         "adapter_model.safetensors")]
    response = httpx.post(f"{affine_app.url}/v1/adapters", data={"adapter_id": "uploaded-one"}, files=files,
                          timeout=120)
    assert response.status_code == 201, response.text
    assert len(_on_every_replica(affine_app, "uploaded-one", present=True)) == 2
    # Requests through the front door, routed to either replica, use it.
    outcomes, _ = run_workload(affine_app.url, ["uploaded-one"] * 4, 2, MAX_TOKENS)
    assert [o.status for o in outcomes] == [200] * 4


def test_a_killed_replica_is_replaced_while_the_other_serves(affine_app, affine_run):
    _, outcomes, _ = affine_run
    home: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        home[o.adapter][o.replica] += 1
    before = {r["replica"]: r for r in affine_app.replicas()}
    assert len(before) == 2
    victim, survivor = sorted(before)
    survivor_adapters = [a for a, c in home.items() if c.most_common(1)[0][0] == survivor]
    assert survivor_adapters

    served: list = []
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            batch, _ = run_workload(affine_app.url, [survivor_adapters[i % len(survivor_adapters)]], 1, MAX_TOKENS)
            served.extend((time.monotonic(), o) for o in batch)
            i += 1

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    time.sleep(2.0)
    killed_at = time.monotonic()
    os.kill(before[victim]["replica_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 600
    replaced = None
    while time.monotonic() < deadline:
        now = {r["replica"] for r in affine_app.replicas()}
        if len(now) == 2 and victim not in now:
            replaced = now - {survivor}
            break
        time.sleep(1.0)
    time.sleep(2.0)
    stop.set()
    thread.join(120)
    assert replaced, f"Serve did not replace the killed replica:\n{affine_app.log()}"
    during = [o for t, o in served if t >= killed_at]
    assert during, "no request was served while the replica was being replaced"
    assert all(o.status == 200 for _, o in served), [o for _, o in served if o.status != 200][:5]
    assert {o.replica for _, o in served} == {survivor}

    # The new replica serves too, and has the adapter uploaded before it started.
    (new,) = replaced
    assert len(_on_every_replica(affine_app, "uploaded-one", present=True)) == 2
    sequence = [a for a in home if a not in survivor_adapters][:10] or ["uploaded-one"]
    outcomes, _ = run_workload(affine_app.url, sequence, 2, MAX_TOKENS)
    assert [o.status for o in outcomes] == [200] * len(sequence)


def test_a_delete_leaves_both_replicas(affine_app, affine_run):
    response = httpx.delete(f"{affine_app.url}/v1/adapters/uploaded-one", timeout=60)
    assert response.status_code == 200, response.text
    assert len(_on_every_replica(affine_app, "uploaded-one", present=False)) == 2
    r = httpx.post(f"{affine_app.url}/v1/completions", json={"model": "uploaded-one", "prompt": "x", "max_tokens": 1},
                   timeout=60)
    assert r.status_code == 404, r.text
