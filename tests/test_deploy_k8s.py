"""deploy/k8s/: schema validation with kubernetes-validate (the official
OpenAPI-derived JSON schemas, shipped offline in the package) in strict mode,
so unknown or misspelt fields fail too, plus the cross-manifest checks no
schema can make: probes on the right port, the GPU request, the HPA aiming
at the Deployment, names that refer to each other actually matching.
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from tests.test_deploy_dockerfile import image_user_uid

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"

# Oldest version we claim (native gRPC probes are GA since 1.27) and the
# newest the installed schemas cover.
OLDEST = "1.27.0"


def _versions() -> list[str]:
    latest = kubernetes_validate.latest_version()
    assert kv_utils.major_minor(latest) >= kv_utils.major_minor(OLDEST), latest
    return [OLDEST, latest]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def documents() -> list[tuple[str, dict]]:
    docs = []
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc is not None:
                docs.append((name, doc))
    return docs


def one(kind: str, name: str) -> dict:
    found = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


def teacher() -> dict:
    return one("Deployment", "edistill-teacher")


def teacher_container() -> dict:
    return teacher()["spec"]["template"]["spec"]["containers"][0]


# --------------------------------------------------------------------------
def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"not in kustomization: {on_disk - listed}; missing: {listed - on_disk}"


@pytest.mark.parametrize("version", _versions())
def test_manifests_validate_against_schemas(version: str) -> None:
    problems = []
    for name, doc in documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            problems.append(f"{name}: {doc['kind']} {doc['metadata'].get('name')}: {path}: {exc.message}")
    assert not problems, f"against Kubernetes {version}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"].__setitem__("replica", 2),  # typo: strict mode rejects it
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"].__setitem__("port", "grpc"),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),
    ],
    ids=["unknown-field", "grpc-probe-named-port", "missing-required"],
)
def test_schema_validation_catches_mistakes(mutate) -> None:
    broken = copy.deepcopy(teacher())
    mutate(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, _versions()[-1], strict=True)


def test_manifests_are_namespace_agnostic() -> None:
    assert "namespace" not in kustomization()
    namespaced = [f"{n}: {d['kind']}" for n, d in documents() if "namespace" in d["metadata"]]
    assert not namespaced, f"set the namespace with `kubectl apply -k ... -n NS`, not in {namespaced}"


def test_teacher_probes_speak_grpc_on_the_serving_port() -> None:
    c = teacher_container()
    grpc_ports = [p["containerPort"] for p in c["ports"] if p.get("name") == "grpc"]
    assert len(grpc_ports) == 1, c["ports"]
    config = one("ConfigMap", "edistill-teacher-config")["data"]
    assert str(grpc_ports[0]) == config["EDISTILL_PORT"], "ConfigMap port != containerPort"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe in c, f"teacher container has no {probe}"
        assert c[probe].get("grpc", {}).get("port") == grpc_ports[0], (
            f"{probe} must be the native gRPC health probe on port {grpc_ports[0]}: {c[probe]}")
    # Liveness must not kill a teacher still loading its model: a startup
    # probe with room holds it off.
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 120


def test_teacher_requests_a_gpu() -> None:
    limits = teacher_container()["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == 1, limits
    assert one("ConfigMap", "edistill-teacher-config")["data"]["EDISTILL_DEVICE"].startswith("cuda:")


def test_teacher_advertises_its_pod_ip() -> None:
    env = teacher_container()["env"]
    names = [e["name"] for e in env]
    pod_ip = next(e for e in env if e["name"] == "POD_IP")
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    advertise = next(e for e in env if e["name"] == "EDISTILL_ADVERTISE")
    port = one("ConfigMap", "edistill-teacher-config")["data"]["EDISTILL_PORT"]
    assert advertise["value"] == f"$(POD_IP):{port}"
    # $(VAR) only expands variables defined earlier in the same list.
    assert names.index("POD_IP") < names.index("EDISTILL_ADVERTISE")
    assert "EDISTILL_ADVERTISE" not in one("ConfigMap", "edistill-teacher-config")["data"]


def test_teacher_config_volume_and_lifecycle_wiring() -> None:
    pod = teacher()["spec"]["template"]["spec"]
    c = teacher_container()
    refs = [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]
    for ref in refs:
        one("ConfigMap", ref)
    assert refs, "the teacher takes its configuration from a ConfigMap"

    claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims and claims[0]["readOnly"] is True
    one("PersistentVolumeClaim", claims[0]["claimName"])
    model = one("ConfigMap", refs[0])["data"]["EDISTILL_MODEL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    mount = next((m for p, m in mounts.items() if model.startswith(p + "/")), None)
    assert mount is not None and mount.get("readOnly") is True, f"{model} is not on a read-only mount"

    # SIGTERM drains in-flight requests; the default 30 s can cut a big drain short.
    assert pod["terminationGracePeriodSeconds"] >= 30
    sec = pod["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] == image_user_uid(), (
        "runAsUser must be the image's USER from deploy/Dockerfile")


def test_selectors_match_pod_labels() -> None:
    for name, doc in documents():
        if doc["kind"] in {"Deployment", "Job"}:
            labels = doc["spec"]["template"]["metadata"]["labels"]
            selector = doc["spec"].get("selector", {}).get("matchLabels", {})
            assert selector.items() <= labels.items(), f"{name}: selector {selector} vs labels {labels}"
    pods = [d["spec"]["template"]["metadata"]["labels"] for _, d in documents() if d["kind"] == "Deployment"]
    for name, doc in documents():
        if doc["kind"] == "Service":
            sel = doc["spec"]["selector"]
            assert any(sel.items() <= p.items() for p in pods), f"{name}: Service selects no pod: {sel}"


def test_hpa_targets_the_teacher_deployment() -> None:
    hpas = [d for _, d in documents() if d["kind"] == "HorizontalPodAutoscaler"]
    assert len(hpas) == 1 and hpas[0]["apiVersion"] == "autoscaling/v2"
    hpa, dep = hpas[0], teacher()
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": dep["apiVersion"], "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Resource" and metric["resource"]["target"]["type"] == "Utilization":
            res = metric["resource"]["name"]
            assert res in teacher_container()["resources"]["requests"], (
                f"a {res} utilisation target needs a {res} request on the container")


def test_registry_urls_point_at_the_redis_service() -> None:
    redis_svc = one("Service", "edistill-redis")
    port = redis_svc["spec"]["ports"][0]["port"]
    expected = f"redis://edistill-redis:{port}/0"
    assert one("ConfigMap", "edistill-teacher-config")["data"]["EDISTILL_REGISTRY"] == expected
    job = one("Job", "edistill-student")
    c = job["spec"]["template"]["spec"]["containers"][0]
    argv = c.get("command", []) + c.get("args", [])
    # The student reads the URL from its environment, never from argv (ps
    # would show a password), and from the teachers' ConfigMap, so student
    # and teachers use one registry and one service name.
    assert not any("redis://" in a or "rediss://" in a for a in argv), argv
    env = {e["name"]: e.get("valueFrom", {}).get("configMapKeyRef", {}) for e in c.get("env", [])}
    for var in ("EDISTILL_REGISTRY", "EDISTILL_SERVICE"):
        assert env.get(var) == {"name": "edistill-teacher-config", "key": var}, f"student {var}: {env.get(var)}"
    assert "/app/examples/train_student.py" in argv
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}


def test_images_are_overridable_in_one_place() -> None:
    names = {i["name"] for i in kustomization().get("images", [])}
    for name, doc in documents():
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            image = c["image"].split(":")[0]
            assert image in names or image.startswith("redis"), (
                f"{name}: image {c['image']} is not covered by kustomization `images:`")
