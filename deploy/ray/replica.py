"""One Serve replica: a `loramux serve` on this node's loopback, and a proxy to it.

The replica owns its server process (it dies with the replica: PR_SET_PDEATHSIG), tells
Serve which adapters it holds through `@serve.multiplexed` (so the router sends an
adapter's requests here once it has served one), and keeps its server in step with the
shared adapter directory. Serve's health check asks the server's /health; when the
server is gone the check fails and Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from ray import serve

from loramux.ray_serve.adapter_dir import SYNC_INTERVAL_S, SharedAdapterDir
from loramux.ray_serve.options import ReplicaOptions

log = logging.getLogger("loramux.ray_serve")

# Request headers passed on to the server, and response headers passed back.
# Host and Origin go on so the server's own checks (DNS rebinding, cross-site posts) see
# what the client sent.
FORWARD_REQUEST_HEADERS = ("authorization", "content-type", "accept", "x-request-id", "origin", "user-agent", "host")
DROP_RESPONSE_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}
REPLICA_HEADER = "x-loramux-replica"
STARTUP_TIMEOUT_S = 900.0  # a cold start on a busy CPU: the model load and the C kernel build




def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the replica's process goes (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoramuxServerProcess:
    """`python -m loramux.server.cli serve` on 127.0.0.1, started and stopped here."""

    def __init__(self, options: ReplicaOptions, shared: SharedAdapterDir, name: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.upload_dir = Path(tempfile.mkdtemp(prefix="loramux-replica-uploads-"))
        self.log_path = shared.state_dir / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "loramux.server.cli", "serve", *options.server_args,
                "--host", "127.0.0.1", "--port", str(self.port),
                "--adapter-dir", str(shared.adapters), "--upload-dir", str(self.upload_dir)]
        for directory in options.adapter_dirs:
            args += ["--adapter-dir", directory]
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                            env={**os.environ, **options.env}, preexec_fn=_die_with_parent)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"loramux exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"loramux did not become healthy in {timeout_s:.0f} s; see {self.log_path}")

    def stop(self, grace_s: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the server drains its running requests
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class AdapterSync:
    """Keeps one server's adapters in step with the shared directory.

    `known` maps id -> the stamp this server registered; an id that is new or whose stamp
    changed is (re)registered with vLLM's load_lora_adapter (the path lies in one of the
    server's --adapter-dir folders), one that went is unloaded.
    """

    def __init__(self, shared: SharedAdapterDir, server_url: str, admin_key: str | None) -> None:
        self.shared = shared
        self.client = httpx.Client(base_url=server_url, timeout=120.0,
                                   headers={"Authorization": f"Bearer {admin_key}"} if admin_key else {})
        self.known: dict[str, int] = shared.snapshot()  # what the server scanned at its start
        self.lock = threading.Lock()

    def sync(self, only: str | None = None) -> None:
        with self.lock:
            current = self.shared.snapshot()
            targets = [only] if only is not None else sorted(set(current) | set(self.known))
            for adapter_id in targets:
                stamp, had = current.get(adapter_id), self.known.get(adapter_id)
                if stamp == had:
                    continue
                if stamp is None:
                    self._post("/v1/unload_lora_adapter", {"lora_name": adapter_id})
                    self.known.pop(adapter_id, None)
                    continue
                path = self.shared.path(adapter_id)
                ok = self._post("/v1/load_lora_adapter",
                                {"lora_name": adapter_id, "lora_path": str(path), "load_inplace": True})
                if ok:
                    self.known[adapter_id] = stamp

    def note_published(self, adapter_id: str) -> None:
        """This replica published the adapter: its server has it already."""
        with self.lock:
            stamp = self.shared.stamp(adapter_id)
            if stamp is not None:
                self.known[adapter_id] = stamp

    def note_removed(self, adapter_id: str) -> None:
        with self.lock:
            self.known.pop(adapter_id, None)

    def _post(self, path: str, body: dict) -> bool:
        try:
            response = self.client.post(path, json=body)
        except httpx.HTTPError as exc:
            log.warning("adapter sync %s %s: %s", path, body.get("lora_name"), exc)
            return False
        if response.status_code >= 400:
            log.warning("adapter sync %s %s: %s %s", path, body.get("lora_name"), response.status_code,
                        response.text[:200])
        return response.status_code < 400


def make_replica_class(max_adapters_per_replica: int):
    """The replica deployment class; Serve's routing table holds `max_adapters_per_replica`
    adapters per replica (least recently used leave it first)."""

    class LoramuxReplica:
        def __init__(self, options: ReplicaOptions) -> None:
            context = serve.get_replica_context()
            self.name = context.replica_id.unique_id if context else f"replica-{os.getpid()}"
            self.shared = SharedAdapterDir(options.state_dir).prepare()
            self.server = LoramuxServerProcess(options, self.shared, self.name)
            self.server.wait_ready()
            admin_key = options.env.get("LORAMUX_ADMIN_API_KEY") or os.environ.get("LORAMUX_ADMIN_API_KEY")
            self.sync = AdapterSync(self.shared, self.server.url, admin_key)
            self.client = httpx.AsyncClient(base_url=self.server.url, timeout=httpx.Timeout(None, connect=10.0))
            self.cold_adapters = 0  # adapters Serve asked this replica to take on
            self._stop = threading.Event()
            self._sync_thread = threading.Thread(target=self._sync_loop, name="adapter-sync", daemon=True)
            self._sync_thread.start()
            self.shared.announce(self.name, self.server.url, self.server.process.pid, os.getpid())

        def _sync_loop(self) -> None:
            while not self._stop.wait(SYNC_INTERVAL_S):
                try:
                    self.sync.sync()
                except Exception:  # noqa: BLE001 - a failed round is retried on the next
                    log.exception("adapter sync failed")

        @serve.multiplexed(max_num_models_per_replica=max_adapters_per_replica)
        async def take_adapter(self, adapter_id: str) -> str:
            """Serve routes `adapter_id` here from now on; make sure the server knows it.

            The server's own store pages the weights in on the first request; an id the
            server does not know yet (published by another replica a moment ago) is
            registered from the shared directory first.
            """
            self.cold_adapters += 1
            if adapter_id not in self.sync.known and self.shared.stamp(adapter_id) is not None:
                await asyncio.to_thread(self.sync.sync, adapter_id)
            return adapter_id

        async def handle(self, method: str, path: str, query: str, headers: dict[str, str],
                         body: bytes) -> AsyncIterator[object]:
            """Proxy one request. Yields (status, headers) first, then the body's chunks."""
            adapter_id = serve.get_multiplexed_model_id()
            if adapter_id:
                await self.take_adapter(adapter_id)
            request = self.client.build_request(
                method, path + (f"?{query}" if query else ""), content=body,
                headers={k: v for k, v in headers.items() if k in FORWARD_REQUEST_HEADERS})
            response = await self.client.send(request, stream=True)
            try:
                out_headers = {k: v for k, v in response.headers.items() if k.lower() not in DROP_RESPONSE_HEADERS}
                out_headers[REPLICA_HEADER] = self.name
                yield (response.status_code, out_headers)
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        async def admin(self, method: str, path: str, query: str, headers: dict[str, str],
                        body: bytes) -> AsyncIterator[object]:
            """Adapter management: done on this replica's server, then published to (or removed
            from) the shared directory, from which every other replica takes it."""
            await asyncio.to_thread(self.sync.sync)  # act on the newest state
            status, out_headers, chunks = None, {}, []
            async for item in self.handle(method, path, query, headers, body):
                if status is None:
                    status, out_headers = item
                else:
                    chunks.append(item)
            payload = b"".join(chunks)
            if status < 400:
                await asyncio.to_thread(self._publish, method, path, payload)
            yield (status, out_headers)
            yield payload

        def _publish(self, method: str, path: str, payload: bytes) -> None:
            import json

            parts = path.strip("/").split("/")  # v1 adapters [<id>]
            if method == "POST" and parts == ["v1", "adapters"]:
                info = json.loads(payload)
                adapter_id, version = info["id"], int(info["version"])
                source = self.server.upload_dir / adapter_id / str(version)
                if self.shared.path(adapter_id) is not None and source.is_dir():
                    self.shared.publish(adapter_id, source)
                    self.sync.note_published(adapter_id)
            elif method == "DELETE" and len(parts) == 3 and parts[:2] == ["v1", "adapters"]:
                self.shared.remove(parts[2])
                self.sync.note_removed(parts[2])

        async def stats(self) -> dict:
            return {"replica": self.name, "url": self.server.url, "cold_adapters": self.cold_adapters}

        async def check_health(self) -> None:
            """Serve's health check: a replica whose server died is replaced."""
            if self.server.process.poll() is not None:
                raise RuntimeError(f"the loramux server exited with {self.server.process.returncode}")
            response = await self.client.get("/health", timeout=10.0)
            if response.status_code != 200:
                raise RuntimeError(f"the loramux server's /health answered {response.status_code}")

        def __del__(self) -> None:
            stop = getattr(self, "_stop", None)
            if stop is not None:
                stop.set()
            if getattr(self, "shared", None) is not None:
                self.shared.withdraw(self.name)
            if getattr(self, "server", None) is not None:
                self.server.stop()

    return LoramuxReplica
