"""The hostile-input harness: send one bad request, and meanwhile poll /health every 100 ms.

A hostile request passes only if it is refused with the expected 4xx AND the server kept
answering everyone else: no /health poll during the request (and a short while after it)
took over 1 s or failed. Add a case by calling `check_hostile(server, send, statuses)` with
a function that sends the request (tests/e2e/test_hostile.py has the HTTP-side cases).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

POLL_INTERVAL_S = 0.1
HEALTH_BOUND_S = 1.0
SETTLE_S = 0.3  # keep polling this long after the request: work it left behind shows up here


@dataclass
class HealthWatch:
    """Polls `url`/health every 100 ms on a thread; records each poll's latency (s) or error."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="health-watch", daemon=True)

    def _poll(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=5.0) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = client.get("/health").status_code
                    if status != 200:
                        self.failures.append(f"/health answered {status}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"/health failed: {type(exc).__name__}")
                elapsed = time.perf_counter() - started
                self.latencies.append(elapsed)
                self._stop.wait(max(0.0, POLL_INTERVAL_S - elapsed))

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(SETTLE_S)
        self._stop.set()
        self._thread.join(10)

    @property
    def worst_s(self) -> float:
        return max(self.latencies, default=0.0)

    def assert_responsive(self, bound_s: float = HEALTH_BOUND_S) -> None:
        assert self.latencies, "/health was never polled"
        assert not self.failures, self.failures[:5]
        assert self.worst_s <= bound_s, f"/health took {self.worst_s:.2f} s (bound {bound_s} s)"


def check_hostile(
    url: str,
    send: Callable[[httpx.Client], httpx.Response],
    statuses: int | tuple[int, ...],
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> httpx.Response:
    """Send one hostile request with `send(client)` while /health is watched; assert the
    answer's status is one of `statuses` and that /health stayed under 1 s throughout."""
    expected = (statuses,) if isinstance(statuses, int) else statuses
    with HealthWatch(url) as watch, httpx.Client(base_url=url, headers=headers or {}, timeout=timeout_s) as client:
        response = send(client)
    assert response.status_code in expected, (response.status_code, response.text[:500])
    watch.assert_responsive()
    return response
