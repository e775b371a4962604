"""Hostile adapter uploads against a real server: each gets its 4xx within seconds, while
/health, polled every 100 ms meanwhile, never takes over 1 s.

Archive bombs (.tar.xz of 400 MiB of zeros, .tar.gz of 200,000 empty members, zip bombs
in skipped members), corrupt zips, catastrophic PEFT patterns, absurd values, malformed
safetensors, bodies over the limit, too many uploads at once, and ids that differ only in
case.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import socket
import struct
import tarfile
import threading
import time
import zipfile
from contextlib import contextmanager
from urllib.parse import urlparse

import httpx
import pytest

from tests.e2e.conftest import MAX_UPLOAD_BYTES

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
HEALTH_PERIOD_S = 0.1
HEALTH_MAX_S = 1.0
ANSWER_MAX_S = 5.0  # "within seconds"
SLOW_PATTERN = r"(.*){1,32000}[XY]"  # backtracks for minutes under Python's re


class HealthPoller:
    """GET /health every 100 ms on its own connection; remembers each answer's latency."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10.0) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = client.get("/health").status_code
                    if status != 200:
                        self.failures.append(f"status {status}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.latencies.append(time.perf_counter() - started)
                self._stop.wait(HEALTH_PERIOD_S)

    def _wait_for_polls(self, count: int) -> None:
        deadline = time.monotonic() + 15
        while len(self.latencies) < count and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        self._wait_for_polls(1)  # polling runs before the case starts
        return self

    def __exit__(self, *exc_info) -> None:
        self._wait_for_polls(len(self.latencies) + 2)  # and a full poll after it ended
        self._stop.set()
        self._thread.join(15)

    def check(self) -> None:
        assert self.latencies, "/health was never polled"
        assert not self.failures, self.failures
        assert max(self.latencies) <= HEALTH_MAX_S, f"/health took {max(self.latencies):.3f} s"


@pytest.fixture(scope="module")
def admin(tiny_server):
    with tiny_server.client(admin=True) as c:
        yield c


@pytest.fixture(scope="module")
def good(tiny_files) -> dict[str, bytes]:
    return {name: (tiny_files.spare / "gamma" / name).read_bytes() for name in (CONFIG, WEIGHTS)}


# --------------------------------------------------------------------------- payloads


def files_form(adapter_id: str, files: dict[str, bytes]) -> dict:
    return {"data": {"adapter_id": adapter_id},
            "files": [("files", (name, data, "application/octet-stream")) for name, data in files.items()]}


def archive_form(name: str, data: bytes, adapter_id: str = "hostile") -> dict:
    return {"data": {"adapter_id": adapter_id}, "files": {"file": (name, data, "application/octet-stream")}}


def tar_xz_of_zeros(num_mib: int) -> bytes:
    """A .tar.xz holding num_mib MiB of zeros in one member (xz streams concatenate, so one
    compressed MiB is repeated: ~100 bytes per MiB)."""
    header = tarfile.TarInfo(WEIGHTS)
    header.size = num_mib << 20
    mib = lzma.compress(bytes(1 << 20), preset=0)
    return lzma.compress(header.tobuf(), preset=0) + mib * num_mib + lzma.compress(bytes(1024), preset=0)


def tar_gz_of_empty_members(count: int) -> bytes:
    """A .tar.gz of `count` empty members (one gzip member of 1000 headers, repeated)."""
    block = tarfile.TarInfo("empty").tobuf() * 1000
    return gzip.compress(block, 9) * (count // 1000) + gzip.compress(bytes(1024), 9)


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def corrupt_zip(good: dict[str, bytes]) -> bytes:
    data = bytearray(zip_of(good))
    at = data.find(b"PK\x03\x04", 10) - 200  # inside the first member's deflate data
    data[at : at + 100] = b"\xff" * 100  # zlib error or bad CRC
    return bytes(data)


def with_config(good: dict[str, bytes], **changes) -> dict[str, bytes]:
    config = json.loads(good[CONFIG])
    config.update(changes)
    return {**good, CONFIG: json.dumps(config).encode()}


def edit_header(weights: bytes, edit) -> bytes:
    n = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + n])
    raw = edit(header)
    return struct.pack("<Q", len(raw)) + raw + weights[8 + n :]


def unaligned(weights: bytes) -> bytes:
    """The same tensors with a header one byte longer: every tensor's data starts unaligned."""
    def edit(header):
        raw = json.dumps(header).encode()
        while (8 + len(raw)) % 4 == 0:
            raw += b" "
        return raw

    return edit_header(weights, edit)


def non_ascii_key(weights: bytes) -> bytes:
    def edit(header):
        key = next(k for k in header if k != "__metadata__")
        header[key.replace("self_attn", "sélf_attn") + "\u00e9"] = header.pop(key)
        return json.dumps(header, ensure_ascii=False).encode()

    return edit_header(weights, edit)


def cases(good: dict[str, bytes]) -> dict[str, tuple[dict, int, str]]:
    """name -> (httpx post kwargs, expected status, a word the message holds)."""
    xz = tar_xz_of_zeros(400)
    return {
        "tar-xz-400mib-zeros": (archive_form("adapter.tar.xz", xz), 400, "only .zip and .tar.gz"),
        "tar-xz-named-tar-gz": (archive_form("adapter.tar.gz", xz), 400, "gzip"),
        "tar-gz-200000-empty-members": (archive_form("adapter.tar.gz", tar_gz_of_empty_members(200_000)), 400,
                                        "members"),
        "corrupt-zip": (archive_form("adapter.zip", corrupt_zip(good)), 400, "zip"),
        "zip-bomb-in-a-skipped-member": (archive_form("adapter.zip", zip_of({**good, "README.md": bytes(64 << 20)})),
                                         400, "limit"),
        "catastrophic-target-regex": (files_form("hostile", with_config(good, target_modules=SLOW_PATTERN)), 422,
                                      "too long"),
        "catastrophic-rank-pattern": (files_form("hostile", with_config(good, rank_pattern={SLOW_PATTERN: 4})), 422,
                                      "too long"),
        "textbook-catastrophic-regex": (files_form("hostile", with_config(good, target_modules=r"(.*.*)*X")), 422,
                                        "match no projection"),
        "lora-alpha-1e38": (files_form("hostile", with_config(good, lora_alpha=1e38)), 422, "lora_alpha"),
        "r-10-to-the-400": (files_form("hostile", with_config(good, r=10**400)), 422, "'r'"),
        "unaligned-safetensors": (files_form("hostile", {**good, WEIGHTS: unaligned(good[WEIGHTS])}), 422,
                                  "unaligned"),
        "non-ascii-keys": (files_form("hostile", {**good, WEIGHTS: non_ascii_key(good[WEIGHTS])}), 422,
                           "unexpected tensor"),
        "pickled-weights-only": (files_form("hostile", {CONFIG: good[CONFIG], "adapter_model.bin": b"\x80\x04x"}),
                                 400, "pickled"),
    }


CASES = [
    "tar-xz-400mib-zeros", "tar-xz-named-tar-gz", "tar-gz-200000-empty-members", "corrupt-zip",
    "zip-bomb-in-a-skipped-member", "catastrophic-target-regex", "catastrophic-rank-pattern",
    "textbook-catastrophic-regex", "lora-alpha-1e38", "r-10-to-the-400", "unaligned-safetensors", "non-ascii-keys",
    "pickled-weights-only",
]


@pytest.fixture(scope="module")
def payloads(good):
    return cases(good)


@pytest.mark.parametrize("case", CASES)
def test_hostile_upload_is_refused_fast_while_health_stays_fast(tiny_server, tiny_files, admin, payloads, case):
    kwargs, status, word = payloads[case]
    with HealthPoller(tiny_server.url) as health:
        started = time.monotonic()
        r = admin.post("/v1/adapters", **kwargs)
        took = time.monotonic() - started
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert word.lower() in message.lower(), message
    assert str(tiny_files.uploads) not in message and "/tmp" not in message  # no server paths
    assert took < ANSWER_MAX_S, took
    if "catastrophic" in case:
        assert took < 2.0, took
    health.check()
    assert admin.get("/v1/adapters/hostile").status_code == 404


def _raw_post(url: str, headers: dict[str, str], body: bytes = b"") -> socket.socket:
    """Start a POST /v1/adapters by hand (headers as given, a partial body); returns the socket."""
    parsed = urlparse(url)
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=10)
    lines = [f"POST /v1/adapters HTTP/1.1", f"Host: {parsed.hostname}:{parsed.port}",
             *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    sock.sendall("\r\n".join(lines).encode() + body)
    return sock


def _read_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_a_declared_body_over_the_limit_gets_413_before_it_is_sent(tiny_server):
    headers = {**tiny_server.headers(admin=True), "Content-Type": "multipart/form-data; boundary=b",
               "Content-Length": str(64 * MAX_UPLOAD_BYTES)}
    with HealthPoller(tiny_server.url) as health:
        started = time.monotonic()
        sock = _raw_post(tiny_server.url, headers)  # no body at all: the answer cannot wait for it
        try:
            assert _read_status(sock) == 413
        finally:
            sock.close()
        assert time.monotonic() - started < ANSWER_MAX_S
    health.check()


@contextmanager
def _stalled_uploads(server, count: int):
    """`count` uploads that sent their headers and a part of their body, then stall."""
    headers = {**server.headers(admin=True), "Content-Type": "multipart/form-data; boundary=b",
               "Content-Length": str(MAX_UPLOAD_BYTES // 2)}
    part = b'--b\r\nContent-Disposition: form-data; name="adapter_id"\r\n\r\nstalled\r\n'
    sockets = [_raw_post(server.url, headers, part) for _ in range(count)]
    try:
        time.sleep(0.5)  # the server has taken them in
        yield
    finally:
        for sock in sockets:
            sock.close()


def test_uploads_beyond_the_bound_get_429_and_the_bound_frees_up(tiny_server, admin, good):
    form = files_form("hostile", with_config(good, lora_alpha=1e38))  # answered 422 once admitted
    with HealthPoller(tiny_server.url) as health:
        with _stalled_uploads(tiny_server, 2):  # the default bound: 2 uploads at once
            r = admin.post("/v1/adapters", **form)
            assert r.status_code == 429, r.text
            assert "in progress" in r.json()["error"]["message"] and r.headers.get("retry-after")
        deadline = time.monotonic() + 10
        while (r := admin.post("/v1/adapters", **form)).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.2)  # the server notices the closed connections
        assert r.status_code == 422, r.text
    health.check()


def test_ids_that_differ_only_in_case_never_share_files(tiny_server, tiny_files, admin, good):
    assert admin.post("/v1/adapters", **files_form("Tenant-X", good)).status_code == 201
    try:
        r = admin.post("/v1/adapters", **files_form("tenant-x", good))
        assert r.status_code == 409 and r.json()["error"]["param"] == "adapter_id"
        assert "case" in r.json()["error"]["message"]
        assert admin.get("/v1/adapters/tenant-x").status_code == 404
        assert [p.name for p in tiny_files.uploads.iterdir() if p.name.lower() == "tenant-x"] == ["Tenant-X"]
    finally:
        assert admin.delete("/v1/adapters/Tenant-X").status_code == 200
