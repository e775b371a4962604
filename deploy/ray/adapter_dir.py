"""The shared adapter directory: where an upload made through the front door is kept so
that every replica, and every replica Serve starts later, serves it.

    <state_dir>/adapters/<id>/    adapter_config.json + adapter_model.safetensors
    <state_dir>/replicas/<name>   one line of JSON per live replica: its server's URL

Why one shared directory rather than fanning each upload out to every replica: Serve
addresses a deployment, not a replica, so a fan-out could not reach a replica that is
restarting, and a replica Serve starts after a failure would come up without the
adapters uploaded before. With one directory, a new replica passes it to its server as
an --adapter-dir and has every adapter at start; a running replica registers what
appeared since (on its own request for an unknown id at once, otherwise every
SYNC_INTERVAL_S). On several machines the directory is a shared volume (NFS, a
ReadWriteMany volume).

A published adapter appears in one rename, so no replica reads a half-copied one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from loramux.adapter_store.format import CONFIG_NAME, WEIGHTS_NAME
from loramux.adapter_store.ids import is_valid_adapter_id

SYNC_INTERVAL_S = 1.0
_FILES = (CONFIG_NAME, WEIGHTS_NAME)


class SharedAdapterDir:
    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.adapters = self.state_dir / "adapters"
        self.replicas = self.state_dir / "replicas"

    def prepare(self) -> SharedAdapterDir:
        self.adapters.mkdir(parents=True, exist_ok=True)
        self.replicas.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------ adapters

    def path(self, adapter_id: str) -> Path | None:
        """The adapter's folder, or None: built only from an id that passed the store's check."""
        if not is_valid_adapter_id(adapter_id):
            return None
        return self.adapters / adapter_id

    def publish(self, adapter_id: str, source: Path) -> Path:
        """Copy a validated adapter's two files in, replacing any previous version at once."""
        target = self.path(adapter_id)
        if target is None:
            raise ValueError(f"invalid adapter id {adapter_id!r}")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.adapters))
        try:
            for name in _FILES:
                shutil.copyfile(source / name, staging / name)
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=".old-", dir=self.adapters))
                os.replace(target, old / "v")
            os.replace(staging, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def remove(self, adapter_id: str) -> bool:
        target = self.path(adapter_id)
        if target is None or not target.exists():
            return False
        trash = Path(tempfile.mkdtemp(prefix=".old-", dir=self.adapters))
        os.replace(target, trash / "v")
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def snapshot(self) -> dict[str, int]:
        """{adapter id: version stamp} of every complete adapter (the weights' mtime_ns)."""
        found: dict[str, int] = {}
        try:
            entries = list(os.scandir(self.adapters))
        except FileNotFoundError:
            return found
        for entry in entries:
            if entry.name.startswith(".") or not is_valid_adapter_id(entry.name):
                continue
            stamp = self.stamp(entry.name)
            if stamp is not None:
                found[entry.name] = stamp
        return found

    def stamp(self, adapter_id: str) -> int | None:
        target = self.path(adapter_id)
        if target is None:
            return None
        try:
            return os.stat(target / WEIGHTS_NAME).st_mtime_ns if (target / CONFIG_NAME).is_file() else None
        except OSError:
            return None

    # ------------------------------------------------------------------ replicas

    def announce(self, name: str, url: str, server_pid: int, replica_pid: int) -> None:
        """Say where a replica's server listens (for monitoring, tests and benchmarks)."""
        line = json.dumps({"replica": name, "url": url, "pid": server_pid, "replica_pid": replica_pid})
        tmp = self.replicas / f".{_safe_name(name)}.tmp"
        tmp.write_text(line + "\n")
        os.replace(tmp, self.replicas / _safe_name(name))

    def withdraw(self, name: str) -> None:
        (self.replicas / _safe_name(name)).unlink(missing_ok=True)

    def live_replicas(self) -> list[dict]:
        """The announced replicas whose server process is still running on this machine."""
        out = []
        for path in sorted(self.replicas.glob("[!.]*")):
            try:
                record = json.loads(path.read_text())
                os.kill(int(record["pid"]), 0)
            except (OSError, ValueError, KeyError):
                continue
            out.append(record)
        return out


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "replica"
