"""Validate Kubernetes objects offline: built-in kinds against the Kubernetes OpenAPI
schemas that `kubernetes-validate` ships (strict: unknown fields are errors), custom
resources (Gateway API, Inference Extension) against the CRD schemas vendored in
schemas/ (see each file's $comment for its source and version)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate

KUBERNETES_VERSION = "1.33.0"  # a release current clusters run; the package ships many
SCHEMAS = Path(__file__).parent / "schemas"
# apiVersion group -> the vendored schema files' prefix
CUSTOM_GROUPS = {"inference.networking.k8s.io", "llm-d.ai", "gateway.networking.k8s.io"}


class ManifestInvalid(ValueError):
    pass


@cache
def _crd_schema(kind: str, group: str, version: str) -> dict:
    path = SCHEMAS / f"{kind.lower()}-{group}-{version}.json"
    if not path.is_file():
        raise ManifestInvalid(f"no vendored schema for {group}/{version} {kind} ({path.name})")
    return json.loads(path.read_text())


def validate(obj: dict) -> None:
    """Raise ManifestInvalid naming the object and the first problem."""
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    name = obj.get("metadata", {}).get("name", "?")
    group, _, version = api_version.rpartition("/")
    where = f"{kind}/{name}"
    if group in CUSTOM_GROUPS:
        schema = _crd_schema(kind, group, version)
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            raise ManifestInvalid(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        _check_metadata(obj, where)
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise ManifestInvalid(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}") from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise ManifestInvalid(f"{where}: no Kubernetes schema for {api_version} {kind}: {exc}") from None


def _check_metadata(obj: dict, where: str) -> None:
    """What the API server checks of every object's metadata (CRD schemas leave it open)."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        raise ManifestInvalid(f"{where}: metadata.name is required")
    import re

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", metadata["name"]):
        raise ManifestInvalid(f"{where}: metadata.name is not a DNS subdomain name")
