"""A small, strict kustomize renderer for the manifests' tests (no kubectl here).

It understands exactly what deploy/kubernetes uses -- `resources` (files and folders),
`labels` (metadata labels) and JSON 6902 `patches` with a target -- and refuses any
other kustomization field, so a field it would silently ignore cannot slip in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonpatch
import yaml

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "labels", "patches"}


class KustomizeError(ValueError):
    pass


def load_documents(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise KustomizeError(f"{path}: a document is not a mapping")
    return docs


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` would print."""
    kustomization = directory / "kustomization.yaml"
    (spec,) = load_documents(kustomization)
    unknown = set(spec) - KNOWN_FIELDS
    if unknown:
        raise KustomizeError(f"{kustomization}: fields this renderer does not handle: {sorted(unknown)}")
    if spec.get("kind") != "Kustomization":
        raise KustomizeError(f"{kustomization}: kind must be Kustomization")
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += render(path)
        elif path.is_file():
            objects += [copy.deepcopy(d) for d in load_documents(path)]
        else:
            raise KustomizeError(f"{kustomization}: resource {entry!r} does not exist")
    for patch in spec.get("patches", []):
        target = patch.get("target") or {}
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        if not isinstance(operations, list):
            raise KustomizeError(f"{patch['path']}: expected a list of JSON 6902 operations")
        matched = [o for o in objects if _matches(o, target)]
        if not matched:
            raise KustomizeError(f"{kustomization}: patch {patch['path']} matches no object ({target})")
        for obj in matched:
            patched = jsonpatch.apply_patch(obj, operations)
            obj.clear()
            obj.update(patched)
    for label_set in spec.get("labels", []):
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label_set["pairs"])
    return objects


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    checks = {"kind": obj.get("kind"), "name": obj.get("metadata", {}).get("name"), "group": group,
              "version": version}
    return all(checks[key] == value for key, value in target.items())
