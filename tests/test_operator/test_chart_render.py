"""The Helm chart: lint, render with default and custom values, validate the objects."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "faastube"
CUSTOM = {
    "image": {"repository": "registry.example/faastube", "tag": "1.2.3"},
    "socketDir": "/run/ft",
    "operator": {"watchNamespaces": ["team-a", "team-b"], "mountSocketDir": False,
                 "runtimeImage": "registry.example/runtime:7", "gatewayPort": 9000},
    "sidecar": {"privileged": True, "nvidia": {"runtimeClassName": ""}, "gpuNodeLabel": "",
                "backend": "cuda"},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "podMonitor": {"enabled": True}},
}


def _render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    chart = helm.Chart.load(str(CHART))
    try:
        files = chart.render(values, name="ft", namespace="faastube", is_install=True)
    finally:
        chart.close()
    objs: list[dict[str, Any]] = []
    for path, text in sorted(files.items()):
        if path.endswith(".yaml"):
            objs.extend(d for d in yaml.safe_load_all(text) if d)
    return objs


def _one(objs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def test_chart_crds_are_an_exact_copy_of_the_top_level_crds() -> None:
    top = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert top and top == chart, "run charts/sync-crds.sh"


def test_sync_script_regenerates_the_chart_crds(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    (copy / "charts" / "faastube" / "crds").mkdir(parents=True)
    (copy / "crds").mkdir()
    for p in (ROOT / "crds").glob("*.yaml"):
        (copy / "crds" / p.name).write_bytes(p.read_bytes())
    (copy / "charts" / "faastube" / "crds" / "stale.yaml").write_text("old: true\n")
    script = copy / "charts" / "sync-crds.sh"
    script.write_bytes((ROOT / "charts" / "sync-crds.sh").read_bytes())
    subprocess.run(["sh", str(script)], check=True, capture_output=True)
    got = sorted(p.name for p in (copy / "charts" / "faastube" / "crds").iterdir())
    assert got == sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))


@pytest.mark.parametrize("values", [None, CUSTOM], ids=["defaults", "custom"])
def test_chart_lints_clean(values: dict[str, Any] | None) -> None:
    report = helm.lint(str(CHART), values, strict=True)
    assert report["errors"] == [] and report["messages"] == []


@pytest.mark.parametrize("values", [None, CUSTOM], ids=["defaults", "custom"])
def test_rendered_objects_are_valid_kubernetes(values: dict[str, Any] | None) -> None:
    objs = _render(values)
    assert objs
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # custom resources: kubernetes-validate has no schema for them
        kubernetes_validate.validate(obj, "1.30", strict=True)


def test_default_render_has_operator_sidecar_rbac_and_no_monitors() -> None:
    kinds = sorted(o["kind"] for o in _render())
    assert kinds == ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding",
                     "DaemonSet", "Deployment", "PodDisruptionBudget", "Service",
                     "ServiceAccount", "ServiceAccount"]


def test_rbac_is_least_privilege() -> None:
    objs = _render()
    for role in (o for o in objs if o["kind"] == "ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            assert "*" not in rule["apiGroups"], rule
    operator = _one(objs, "ClusterRole", "-operator")
    grants = {(g, r): set(rule["verbs"]) for rule in operator["rules"]
              for g in rule["apiGroups"] for r in rule["resources"]}
    assert grants[("faastube.io", "workflows/status")] >= {"patch"}
    assert grants[("faastube.io", "gpunodes")] == {"get", "list", "watch"}
    assert {"create", "patch", "delete"} <= grants[("apps", "deployments")]
    assert {"create", "patch", "delete"} <= grants[("", "services")]
    assert "create" in grants[("", "events")]
    assert "delete" not in grants[("faastube.io", "workflows")]


def test_sidecar_daemonset_mounts_the_socket_directory_and_kubelet_sockets() -> None:
    ds = _one(_render(), "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["runtimeClassName"] == "nvidia"
    host_paths = {v["hostPath"]["path"]: v["hostPath"].get("type") for v in pod["volumes"]
                  if "hostPath" in v}
    assert host_paths == {"/var/run/faastube": "DirectoryOrCreate",
                          "/var/lib/kubelet/device-plugins": "Directory",
                          "/var/lib/kubelet/pod-resources": "Directory"}
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "--socket=/var/run/faastube/faastube.sock" in container["args"]
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"


def test_operator_deployment_runs_faastube_operator_with_metrics_and_liveness() -> None:
    dep = _one(_render(), "Deployment", "-operator")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["faastube"] and "operator" in container["args"]
    assert "--metrics-port=9090" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_operator_replicas_peer_are_probed_for_readiness_and_have_a_disruption_budget() -> None:
    objs = _render()
    dep = _one(objs, "Deployment", "-operator")
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert dep["spec"]["replicas"] == 2
    assert "strategy" not in dep["spec"]  # rolling updates: a new replica peers with the old
    assert f"--peering={dep['metadata']['name']}" in container["args"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == \
        dep["spec"]["selector"]["matchLabels"]
    pdb = _one(objs, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": dep["spec"]["selector"]}
    operator = _one(objs, "ClusterRole", "-operator")
    grants = {(g, r): set(rule["verbs"]) for rule in operator["rules"]
              for g in rule["apiGroups"] for r in rule["resources"]}
    assert grants[("kopf.dev", "clusterkopfpeerings")] == {"get", "list", "watch", "create",
                                                           "patch"}
    assert grants[("faastube.io", "gpunodes/status")] == {"patch"}
    # One replica: no budget (there would be nothing for it to keep up).
    single = _render({"operator": {"replicas": 1}})
    assert not [o for o in single if o["kind"] == "PodDisruptionBudget"]


def test_custom_values_reach_the_objects() -> None:
    objs = _render(CUSTOM)
    args = _one(objs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--no-socket-mount" in args and "--image=registry.example/runtime:7" in args
    assert "--gateway-port=9000" in args and "--socket-dir=/run/ft" in args
    ds = _one(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/faastube:1.2.3"
    assert pod["containers"][0]["securityContext"] == {"privileged": True}
    assert "runtimeClassName" not in pod and "nodeSelector" not in pod
    assert {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v} >= {"/run/ft"}
    monitor = _one(objs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "interval": "30s"}]
    _one(objs, "PodMonitor")
