"""deploy/kubernetes, validated offline: every object against its Kubernetes or CRD schema,
and the wiring between them (Secret keys, probes, PDB/HPA/InferencePool targets, the GPU
overlay's command) checked against the server's own command line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from loramux.server.cli import build_parser
from tests.deploy.k8s_schemas import ManifestInvalid, validate
from tests.deploy.kustomize import load_documents, render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
OVERLAYS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
SECRET = "loramux-keys"
KEY_VARIABLES = {"LORAMUX_API_KEY", "LORAMUX_ADMIN_API_KEY"}


def rendered(overlay: str) -> list[dict]:
    return render(OVERLAYS[overlay])


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    (obj,) = by_kind(objects, kind)
    return obj


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_objects_match_their_schemas(overlay):
    objects = rendered(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "InferencePool",
            "HTTPRoute", "InferenceModelRewrite", "InferenceObjective"} <= kinds
    for obj in objects:
        validate(obj)


def test_the_single_file_manifest_matches_its_schemas():
    for obj in load_documents(K8S / "loramux.yaml"):
        validate(obj)


def test_the_validator_refuses_broken_objects():
    """The checks above can fail: a typo'd field, a wrong type, a bad enum, an unknown kind."""
    objects = rendered("cpu")
    broken = copy.deepcopy(one(objects, "Deployment"))
    container(broken)["livenessProbes"] = container(broken).pop("livenessProbe")
    with pytest.raises(ManifestInvalid, match="livenessProbes"):
        validate(broken)
    broken = copy.deepcopy(one(objects, "HorizontalPodAutoscaler"))
    broken["spec"]["maxReplicas"] = "eight"
    with pytest.raises(ManifestInvalid):
        validate(broken)
    broken = copy.deepcopy(one(objects, "InferencePool"))
    broken["spec"]["targetPorts"] = [{"number": 70000}]
    with pytest.raises(ManifestInvalid, match="targetPorts"):
        validate(broken)
    broken = copy.deepcopy(one(objects, "InferencePool"))
    broken["spec"]["endpointPickerRef"]["failureMode"] = "Sometimes"
    with pytest.raises(ManifestInvalid, match="failureMode"):
        validate(broken)
    broken = copy.deepcopy(one(objects, "InferenceModelRewrite"))
    broken["spec"]["rules"][0]["targets"] = []
    with pytest.raises(ManifestInvalid):
        validate(broken)
    with pytest.raises(ManifestInvalid, match="no (vendored|Kubernetes) schema"):
        validate({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceModel",
                  "metadata": {"name": "x"}, "spec": {}})


@pytest.mark.parametrize("source", ["cpu", "gpu", "loramux.yaml"])
def test_keys_come_from_the_secret_and_the_pod_drains(source):
    objects = load_documents(K8S / source) if source.endswith(".yaml") else rendered(source)
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    env = {e["name"]: e for e in c.get("env", [])}
    assert KEY_VARIABLES <= set(env)
    for name in KEY_VARIABLES:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == SECRET
    assert not any("key" in a.lower() for a in c["args"]), "keys never go on the command line"
    # Probes: startup (slow model load), readiness and liveness on /health.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_the_container_command_is_the_servers(overlay):
    """Every flag the manifests pass exists in `loramux serve`."""
    c = container(one(rendered(overlay), "Deployment"))
    assert c["args"][:2] == ["loramux", "serve"]
    args = build_parser().parse_args(c["args"][1:])
    assert args.host == "0.0.0.0" and args.port == c["ports"][0]["containerPort"]
    if overlay == "gpu":
        assert (args.device, args.dtype) == ("cuda", "bfloat16")
        assert c["image"].endswith(":cuda")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    else:
        assert args.device in (None, "cpu") and "nvidia.com/gpu" not in c["resources"].get("limits", {})


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_everything_points_at_the_deployment(overlay):
    objects = rendered(overlay)
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    port = container(deployment)["ports"][0]["containerPort"]

    def selects_pods(selector: dict) -> bool:
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    assert deployment["spec"]["replicas"] >= 2
    assert selects_pods(one(objects, "Service")["spec"]["selector"])
    assert selects_pods(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == ["vllm:num_requests_waiting"]
    pool = one(objects, "InferencePool")
    assert selects_pods(pool["spec"]["selector"]["matchLabels"])
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port]
    route = one(objects, "HTTPRoute")
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                         "name": pool["metadata"]["name"]}]
    for kind in ("InferenceModelRewrite", "InferenceObjective"):
        for obj in by_kind(objects, kind):
            assert obj["spec"]["poolRef"]["name"] == pool["metadata"]["name"], kind


def test_per_adapter_routes_name_the_shipped_adapters():
    rewrite = one(rendered("cpu"), "InferenceModelRewrite")
    shipped = {p.name for p in (REPO / "examples" / "adapters").iterdir() if p.is_dir()}
    identity = {r["matches"][0]["model"]["value"] for r in rewrite["spec"]["rules"]
                if [t["modelRewrite"] for t in r["targets"]] == [r["matches"][0]["model"]["value"]]}
    assert shipped and shipped <= identity
