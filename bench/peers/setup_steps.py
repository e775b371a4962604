"""Running the heavy set-up steps (builds, pip installs) niced, once, with a marker per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from loramux.server.model_fetch import loramux_home

# Builds and installs share the machine with whatever else runs: the lowest priority.
NICE = ["nice", "-n", "19"]


class PeerSetupError(RuntimeError):
    """A set-up step of a peer failed; the message names the command and its log."""


def peers_home() -> Path:
    """Where the peers live: $LORAMUX_HOME/peers."""
    return loramux_home() / "peers"


def say(message: str) -> None:
    print(f"[bench-peers] {message}", file=sys.stderr, flush=True)


def run_step(command: Sequence[str], log: Path, cwd: Path | None = None, env: dict | None = None,
             niced: bool = True) -> None:
    """Run `command` (appending its output to `log`); a failure raises PeerSetupError."""
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [*NICE, *command] if niced else list(command)
    say(f"$ {' '.join(map(str, argv))}")
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(map(str, argv))}\n")
        out.flush()
        result = subprocess.run(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise PeerSetupError(f"exit {result.returncode}: {' '.join(map(str, argv))}\n(log: {log})\n"
                             + "\n".join(tail))


class Marker:
    """A step's completion marker: done only when it records the very settings asked for now."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path, self.settings = path, settings

    def done(self) -> bool:
        try:
            return json.loads(self.path.read_text()) == self.settings
        except (OSError, ValueError):
            return False

    def mark(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.settings, sort_keys=True))


def pip_env() -> dict:
    """The environment for a peer's pip: no inherited virtualenv, no user site."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def make_venv(venv: Path, log: Path) -> Path:
    """A fresh virtualenv at `venv` (made with this interpreter); returns its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        run_step([sys.executable, "-m", "venv", str(venv)], log, env=pip_env())
    return python
