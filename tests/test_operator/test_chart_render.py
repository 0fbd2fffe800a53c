"""The Helm chart: lint, render every values combination that matters, validate the objects
strictly against Kubernetes 1.30 and the newest schema kubernetes-validate has, and check
that what the chart passes the programs is what the programs accept."""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from faastube import cli as faastube_cli
from faastube_operator import cli as operator_cli
from faastube_operator import manifests
from faastube_placement import Where, follow_consumers
from faastube_spec import workflow as wf

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "faastube"
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
CUSTOM = {
    "image": {"repository": "registry.example/faastube", "tag": "1.2.3"},
    "socketDir": "/run/ft",
    "operator": {"watchNamespaces": ["team-a", "team-b"], "mountSocketDir": True,
                 "runtimeImage": "registry.example/runtime:7", "gatewayPort": 9000},
    "sidecar": {"privileged": True, "nvidia": {"runtimeClassName": ""}, "backend": "cuda",
                "gpuNodes": {"selectors": [], "exclusive": False}},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "podMonitor": {"enabled": True}},
}
# Every combination that changes what is rendered.
COMBINATIONS: dict[str, dict[str, Any] | None] = {
    "defaults": None,
    "custom": CUSTOM,
    "cdi": {"sidecar": {"devicePlugin": {"gpuExposure": "cdi"}}},
    "cdi-annotations-by-index": {"sidecar": {"devicePlugin": {
        "gpuExposure": "cdi-annotations",
        "cdi": {"kind": "k8s.device-plugin.nvidia.com/gpu", "deviceName": "index", "specDirs": ["/var/run/cdi"]}}}},
    "hostpath-socket": {"operator": {"mountSocketDir": True}, "sidecar": {"devicePlugin": {"socketDevices": 0}}},
    "no-device-plugin": {"operator": {"mountSocketDir": True}, "sidecar": {"devicePlugin": {"enabled": False}}},
    "any-node": {"sidecar": {"gpuNodes": {"selectors": [], "exclusive": False}, "nodeSelector": {"pool": "gpu"},
                             "priorityClassName": ""}},
    "own-affinity": {"sidecar": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]}}}}},
    "big-host-pool": {"sidecar": {"hostPoolMax": "64Gi", "memoryHeadroom": "4Gi",
                                  "resources": {"limits": {"memory": "80Gi", "cpu": "8"}}}},
    "kata-functions": {"functions": {"runtimeClassName": "kata-nvidia", "resources": {
        "requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}}}},
    "monitoring": {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
                               "gatewayPodMonitor": {"enabled": True},
                               "grafanaDashboard": {"enabled": True, "namespace": "grafana",
                                                    "annotations": {"grafana_folder": "FaaSTube"}}}},
    "single-operator": {"operator": {"replicas": 1}},
    "static-pools": {"sidecar": {"memory": {"policy": "static"}}},
    "lru-small-cap": {"sidecar": {"memory": {"policy": "lru", "floor": "0", "capShare": 0.1}}},
    "three-operators-fast-failover": {"operator": {"replicas": 3, "peeringLifetimeSeconds": 15},
                                      "gpuNodeHealth": {"heartbeatSeconds": 2.5, "missedHeartbeats": 4}},
    "external-scaler": {"operator": {"autoscaling": {"enabled": False}}},
    "own-cluster-domain": {"clusterDomain": "corp.internal",
                           "operator": {"autoscaling": {"intervalSeconds": 0.5, "scrapeTimeoutSeconds": 3}}},
    "gateway-url-template": {"operator": {"autoscaling": {
        "gatewayUrlTemplate": "http://{workflow}-gateway.{namespace}.svc.mesh.local:{port}"}}},
    "operator-only": {"sidecar": {"enabled": False}},
    "sidecar-only": {"operator": {"enabled": False}},
}


def _render_files(values: dict[str, Any] | None = None) -> dict[str, str]:
    chart = helm.Chart.load(str(CHART))
    try:
        return chart.render(values, name="ft", namespace="faastube", is_install=True)
    finally:
        chart.close()


def _render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for path, text in sorted(_render_files(values).items()):
        if path.endswith(".yaml"):
            objs.extend(d for d in yaml.safe_load_all(text) if d)
    return objs


def _one(objs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def _sidecar_pod(values: dict[str, Any] | None = None) -> dict[str, Any]:
    return _one(_render(values), "DaemonSet")["spec"]["template"]["spec"]


def _args(values: dict[str, Any] | None, kind: str) -> list[str]:
    objs = _render(values)
    if kind == "DaemonSet":
        return _one(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    return _one(objs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]["args"]


def _parse_command(argv: list[str]) -> argparse.Namespace:
    """What `faastube ARGV` parses ARGV into, as the container's entrypoint does."""
    known, rest = faastube_cli.build_parser().parse_known_args(argv)
    module = __import__(faastube_cli.SUBCOMMANDS[known.command][0], fromlist=["add_arguments"])
    sub = argparse.ArgumentParser(prog=f"faastube {known.command}")
    module.add_arguments(sub)
    return sub.parse_args(rest)


# --- CRDs ------------------------------------------------------------------------------------


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


# --- every combination: lint, render, validate -------------------------------------------------


@pytest.mark.parametrize("values", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_chart_lints_clean(values: dict[str, Any] | None) -> None:
    report = helm.lint(str(CHART), values, strict=True)
    assert report["errors"] == [] and report["messages"] == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_rendered_objects_are_valid_kubernetes(values: dict[str, Any] | None, version: str) -> None:
    objs = _render(values)
    assert objs
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # custom resources: kubernetes-validate has no schema for them
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_crds_helm_installs_are_valid_custom_resource_definitions(version: str) -> None:
    crds = [yaml.safe_load(p.read_text()) for p in sorted((CHART / "crds").glob("*.yaml"))]
    assert {c["metadata"]["name"] for c in crds} >= {
        "workflows.faastube.io", "gpunodes.faastube.io", "clusterkopfpeerings.kopf.dev"}
    for crd in crds:
        kubernetes_validate.validate(crd, version, strict=True)


@pytest.mark.parametrize(("values", "field"), [
    ({"operator": {"replicas": 0}}, "replicas"),
    ({"operator": {"replica": 2}}, "replica"),
    ({"operator": {"peeringLifetimeSeconds": 1}}, "peeringLifetimeSeconds"),
    ({"gpuNodeHealth": {"heartbeatSeconds": 0.5}}, "heartbeatSeconds"),  # timestamps have seconds
    ({"gpuNodeHealth": {"missedHeartbeats": 0}}, "missedHeartbeats"),
    ({"operator": {"autoscaling": {"intervalSeconds": 0}}}, "intervalSeconds"),
    ({"operator": {"autoscaling": {"gatewayUrlTemplate": "gateway:8080"}}}, "gatewayUrlTemplate"),
    ({"operator": {"autoscaling": {"interval": 2}}}, "interval"),
    ({"clusterDomain": "Cluster_Local"}, "clusterDomain"),
])
def test_the_values_schema_refuses_operator_values_the_operator_would_refuse(
        values: dict[str, Any], field: str) -> None:
    report = helm.lint(str(CHART), values, strict=True)
    assert any(field in e for e in report["errors"]), report


def test_the_values_schema_refuses_a_typo_before_anything_reaches_a_node() -> None:
    report = helm.lint(str(CHART), {"sidecar": {"devicePlugin": {"gpuExposure": "cdl"}}}, strict=True)
    assert any("gpuExposure" in e for e in report["errors"])
    report = helm.lint(str(CHART), {"sidecar": {"hostPoolMax": "8GB"}}, strict=True)
    assert any("hostPoolMax" in e for e in report["errors"])


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


# --- the sidecar DaemonSet -------------------------------------------------------------------


def test_sidecar_daemonset_mounts_the_socket_directory_and_kubelet_sockets() -> None:
    pod = _sidecar_pod()
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


def test_sidecar_runs_as_root_in_the_socket_group_though_the_image_user_is_not_root() -> None:
    # The daemon image runs as 65532 (images/daemon.Containerfile); the kubelet's sockets
    # and the socket directory are root's, and root without CAP_CHOWN may give the socket
    # to the socket group only as a member (tests/e2e/test_images_podman.py runs this).
    pod = _sidecar_pod()
    assert pod["securityContext"]["runAsUser"] == 0
    assert pod["securityContext"]["runAsGroup"] == 0
    assert pod["securityContext"]["supplementalGroups"] == [2350]
    assert "--socket-group=2350" in pod["containers"][0]["args"]
    for no_group in (0, ""):
        pod = _sidecar_pod({"socketGroup": no_group})
        assert "supplementalGroups" not in pod["securityContext"]
        assert not [a for a in pod["containers"][0]["args"] if a.startswith("--socket-group")]


def test_sidecar_runs_on_any_labelled_gpu_node_where_nvidias_device_plugin_is_off() -> None:
    terms = _sidecar_pod()["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    off = {"key": "nvidia.com/gpu.deploy.device-plugin", "operator": "In", "values": ["false"]}
    # Terms are ORed (any one GPU label), expressions ANDed (and NVIDIA's plugin is off).
    assert [t["matchExpressions"] for t in terms] == [
        [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}, off],
        [{"key": "feature.node.kubernetes.io/pci-10de.present", "operator": "In", "values": ["true"]}, off],
        [{"key": "nvidia.com/gpu.deploy.container-toolkit", "operator": "In", "values": ["true"]}, off]]
    assert "nodeSelector" not in _sidecar_pod()  # no hard GPU-feature-discovery label


def test_exclusive_mode_without_gpu_labels_still_requires_the_plugin_off() -> None:
    terms = _sidecar_pod({"sidecar": {"gpuNodes": {"selectors": []}}})["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [
        {"key": "nvidia.com/gpu.deploy.device-plugin", "operator": "In", "values": ["false"]}]}]


def test_shared_mode_with_no_labels_runs_everywhere_and_own_affinity_replaces_ours() -> None:
    pod = _sidecar_pod(COMBINATIONS["any-node"])
    assert "affinity" not in pod and pod["nodeSelector"] == {"pool": "gpu"}
    assert "priorityClassName" not in pod
    own = _sidecar_pod(COMBINATIONS["own-affinity"])
    assert own["affinity"] == COMBINATIONS["own-affinity"]["sidecar"]["affinity"]  # type: ignore[index]


def test_sidecar_memory_limit_covers_the_pinned_host_pool() -> None:
    limits = _sidecar_pod()["containers"][0]["resources"]["limits"]
    assert limits == {"memory": f"{8 * 1024 + 2 * 1024}Mi"}  # hostPoolMax 8Gi + memoryHeadroom 2Gi
    given = _sidecar_pod(COMBINATIONS["big-host-pool"])["containers"][0]["resources"]
    assert given["limits"] == {"memory": "80Gi", "cpu": "8"}
    derived = _sidecar_pod({"sidecar": {"hostPoolMax": "1.5G", "memoryHeadroom": "512Mi"}})
    assert derived["containers"][0]["resources"]["limits"]["memory"] == "1943Mi"  # ceil((1.5e9 + 2^29) / 2^20)


@pytest.mark.parametrize("values", [
    {"sidecar": {"resources": {"limits": {"memory": "2Gi"}}}},
    {"sidecar": {"hostPoolMax": "64Gi", "resources": {"limits": {"memory": "65Gi"}}}},
])
def test_a_memory_limit_below_the_host_pool_is_refused(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmRenderError, match="must cover sidecar.hostPoolMax"):
        _render(values)


def test_cdi_exposure_passes_the_cdi_flags_and_mounts_the_spec_directories_read_only() -> None:
    pod = _sidecar_pod(COMBINATIONS["cdi"])
    args = pod["containers"][0]["args"]
    assert {"--gpu-exposure=cdi", "--cdi-kind=nvidia.com/gpu", "--cdi-device-name=uuid",
            "--cdi-spec-dir=/etc/cdi", "--cdi-spec-dir=/var/run/cdi", "--socket-devices=1000"} <= set(args)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    for directory in ("/etc/cdi", "/var/run/cdi"):
        assert mounts[directory]["readOnly"] is True
        assert volumes[mounts[directory]["name"]]["hostPath"] == {"path": directory, "type": "DirectoryOrCreate"}
    default_args = _args(None, "DaemonSet")
    assert "--gpu-exposure=envvar" in default_args and not any(a.startswith("--cdi") for a in default_args)


def test_socket_through_the_device_plugin_needs_the_socket_resource() -> None:
    with pytest.raises(helm.HelmRenderError, match="needs sidecar.devicePlugin.enabled"):
        _render({"sidecar": {"devicePlugin": {"socketDevices": 0}}})
    with pytest.raises(helm.HelmRenderError, match="needs sidecar.devicePlugin.enabled"):
        _render({"sidecar": {"devicePlugin": {"enabled": False}}})


# --- what the programs receive ---------------------------------------------------------------


@pytest.mark.parametrize("values", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_the_sidecar_accepts_every_flag_the_chart_passes(values: dict[str, Any] | None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    objs = _render(values)
    daemonsets = [o for o in objs if o["kind"] == "DaemonSet"]
    if not daemonsets:
        return
    monkeypatch.setenv("NODE_NAME", "node-a")  # the DaemonSet sets it from spec.nodeName
    from faastube_sidecar import cli as sidecar_cli
    from faastube_sidecar import kube

    container = daemonsets[0]["spec"]["template"]["spec"]["containers"][0]
    settings = sidecar_cli.settings_from(_parse_command(container["args"]))
    if settings.kube.device_plugin:
        kube._exposure(settings.kube)  # what the sidecar checks before binding its socket
    assert settings.host_limits.max_bytes > 0


@pytest.mark.parametrize("values", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_the_operator_accepts_every_flag_the_chart_passes(values: dict[str, Any] | None) -> None:
    objs = _render(values)
    deployments = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-operator")]
    if not deployments:
        return
    args = deployments[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    operator_cli.settings_from_args(_parse_command(args))


def _operator_settings(values: dict[str, Any] | None = None):
    return operator_cli.settings_from_args(_parse_command(_args(values, "Deployment")))


def test_gpu_function_pods_get_the_runtime_class_the_exposure_needs() -> None:
    assert _operator_settings().gpu_runtime_class == "nvidia"  # envvar: NVIDIA's runtime
    assert _operator_settings(COMBINATIONS["cdi"]).gpu_runtime_class == ""  # CDI: none needed
    assert _operator_settings({"functions": {"runtimeClassName": ""}}).gpu_runtime_class == ""
    assert _operator_settings(COMBINATIONS["kata-functions"]).gpu_runtime_class == "kata-nvidia"
    assert _operator_settings({"sidecar": {"nvidia": {"runtimeClassName": ""}}}).gpu_runtime_class == ""


WORKFLOW = wf.parse_workflow({
    "apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "traffic"},
    "spec": {"slo": "800ms",
             "functions": [{"name": "decode", "handler": "f:decode"},
                           {"name": "detect", "handler": "f:detect", "gpu": True}],
             "edges": [{"from": "decode", "to": "detect", "size": "10MB"}]}})


def _workflow_pods(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The pods the operator, configured by this chart, builds for a small workflow."""
    settings = _operator_settings(values)
    placed = follow_consumers(WORKFLOW, {"detect": Where("node-a", 1)})
    objs = manifests.workflow_children(WORKFLOW, namespace="team-a", spec={}, placement=placed,
                                       settings=settings)
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objs if o["kind"] == "Deployment"}


def _baseline_violations(pod: dict[str, Any]) -> list[str]:
    """The Pod Security "baseline" rules a FaaSTube pod could break (host namespaces, hostPath,
    privileged, added capabilities, host ports)."""
    found = [f"spec.{k}" for k in ("hostPID", "hostIPC", "hostNetwork") if pod.get(k)]
    found += [f"volume {v['name']}: hostPath" for v in pod.get("volumes", []) if "hostPath" in v]
    for c in pod["containers"]:
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"{c['name']}: privileged")
        if (sc.get("capabilities") or {}).get("add"):
            found.append(f"{c['name']}: capabilities.add")
        found += [f"{c['name']}: hostPort" for p in c.get("ports", []) if p.get("hostPort")]
    return found


def test_with_the_defaults_every_workflow_pod_passes_pod_security_baseline() -> None:
    pods = _workflow_pods()
    assert set(pods) == {"traffic-decode", "traffic-detect", "traffic-gateway"}
    for name, pod in pods.items():
        assert _baseline_violations(pod) == [], name
        requests = pod["containers"][0]["resources"]["requests"]
        assert requests["cpu"] and requests["memory"], name  # never BestEffort
    limits = {name: pod["containers"][0]["resources"]["limits"] for name, pod in pods.items()}
    assert limits["traffic-detect"] == {"memory": "8Gi", "faastube.io/gpu-1": 1}
    assert limits["traffic-decode"] == {"memory": "8Gi", "faastube.io/socket": 1}
    assert limits["traffic-gateway"] == {"memory": "6Gi", "faastube.io/socket": 1}
    assert pods["traffic-detect"]["runtimeClassName"] == "nvidia"
    # ... while the sidecar itself needs a privileged namespace.
    assert set(_baseline_violations(_sidecar_pod())) == {
        "spec.hostPID", "volume socket-dir: hostPath", "volume device-plugins: hostPath",
        "volume pod-resources: hostPath"}


def test_with_the_hostpath_socket_cpu_pods_need_an_exempt_namespace() -> None:
    pods = _workflow_pods(COMBINATIONS["hostpath-socket"])
    assert _baseline_violations(pods["traffic-detect"]) == []  # the GPU's Allocate adds the mount
    assert _baseline_violations(pods["traffic-decode"]) == ["volume faastube-socket: hostPath"]
    assert _baseline_violations(pods["traffic-gateway"]) == ["volume faastube-socket: hostPath"]


def test_function_resources_reach_the_pods() -> None:
    pods = _workflow_pods(COMBINATIONS["kata-functions"])
    assert pods["traffic-detect"]["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "4", "memory": "16Gi", "faastube.io/gpu-1": 1}}
    assert pods["traffic-detect"]["runtimeClassName"] == "kata-nvidia"


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
    single = _render(COMBINATIONS["single-operator"])
    assert not [o for o in single if o["kind"] == "PodDisruptionBudget"]
    assert _one(single, "Deployment", "-operator")["spec"]["replicas"] == 1
    three = _render(COMBINATIONS["three-operators-fast-failover"])
    assert _one(three, "Deployment", "-operator")["spec"]["replicas"] == 3
    assert _one(three, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("name", ["defaults", "three-operators-fast-failover"])
def test_the_operator_expects_heartbeats_as_often_as_the_sidecars_send_them(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from faastube_sidecar import cli as sidecar_cli

    monkeypatch.setenv("NODE_NAME", "node-a")
    values = COMBINATIONS[name]
    operator = _operator_settings(values)
    sidecar = sidecar_cli.settings_from(_parse_command(_args(values, "DaemonSet")))
    health = (values or {}).get("gpuNodeHealth", {"heartbeatSeconds": 10, "missedHeartbeats": 3})
    assert sidecar.kube.publish_node
    assert sidecar.kube.heartbeat_s == operator.node_health.heartbeat_s == health["heartbeatSeconds"]
    assert operator.node_health.missed_heartbeats == health["missedHeartbeats"]
    lifetime_s = (values or {}).get("operator", {}).get("peeringLifetimeSeconds", 60)
    assert operator.peering.enabled and operator.peering.lifetime_s == lifetime_s
    assert operator.peering.name == _one(_render(values), "Deployment", "-operator")["metadata"]["name"]


@pytest.mark.parametrize(("memory", "policy", "floor", "share"), [
    (None, "static", 300 << 20, 0.5),
    ({"policy": "elastic+eviction"}, "elastic+eviction", 300 << 20, 0.5),
    ({"policy": "elastic", "floor": "1Gi", "capShare": 0.25}, "elastic", 1 << 30, 0.25),
    ({"policy": "lru", "capShare": 1}, "lru", 300 << 20, 1.0),
    ({"policy": "static"}, "static", 300 << 20, 0.5),
])
def test_the_memory_policy_values_reach_the_sidecar(memory: dict[str, Any] | None, policy: str, floor: int,
                                                    share: float, monkeypatch: pytest.MonkeyPatch) -> None:
    from faastube_sidecar import cli as sidecar_cli

    monkeypatch.setenv("NODE_NAME", "node-a")
    args = _args({"sidecar": {"memory": memory}} if memory else None, "DaemonSet")
    settings = sidecar_cli.settings_from(_parse_command(args))
    assert (settings.memory.name, settings.memory.floor_bytes, settings.memory.cap_share) == (policy, floor, share)
    if policy == "static":
        assert not any(a.startswith(("--pool-floor", "--pool-cap-share")) for a in args), \
            "the sidecar refuses elastic knobs with static pools"


@pytest.mark.parametrize(("memory", "field"), [({"policy": "elastic+lru"}, "policy"), ({"capShare": 0}, "capShare"),
                                               ({"capShare": 1.5}, "capShare"), ({"floor": "300MB"}, "floor"),
                                               ({"evictWait": "2s"}, "evictWait")])
def test_the_values_schema_refuses_a_memory_policy_the_sidecar_would_refuse(memory: dict[str, Any],
                                                                          field: str) -> None:
    report = helm.lint(str(CHART), {"sidecar": {"memory": memory}}, strict=True)
    assert any(field in e for e in report["errors"]), report


@pytest.mark.parametrize(("name", "enabled", "interval_s", "timeout_s", "template"), [
    ("defaults", True, 2.0, 1.0, "http://{service}.{namespace}.svc.cluster.local:{port}"),
    ("own-cluster-domain", True, 0.5, 3.0, "http://{service}.{namespace}.svc.corp.internal:{port}"),
    ("gateway-url-template", True, 2.0, 1.0, "http://{workflow}-gateway.{namespace}.svc.mesh.local:{port}"),
    ("external-scaler", False, 2.0, 1.0, "http://{service}.{namespace}.svc:{port}"),
])
def test_the_operator_scales_as_the_autoscaling_values_say(
        name: str, enabled: bool, interval_s: float, timeout_s: float, template: str) -> None:
    scaling = _operator_settings(COMBINATIONS[name]).autoscaling
    assert (scaling.enabled, scaling.interval_s, scaling.timeout_s) == (enabled, interval_s, timeout_s)
    assert scaling.gateway_url_template == template  # (disabled: the flag's default, unused)
    url = scaling.gateway_url(service="traffic-gateway", namespace="team-a", port=8080, workflow="traffic")
    assert url.startswith("http://traffic-gateway.team-a.svc") and url.endswith(":8080")


def test_the_operator_may_scale_deployments_without_the_scale_subresource() -> None:
    # The scaling loop applies spec.replicas on the Deployment itself (field manager
    # faastube-autoscaler): patch on deployments, nothing on deployments/scale.
    operator = _one(_render(), "ClusterRole", "-operator")
    grants = {(g, r): set(rule["verbs"]) for rule in operator["rules"]
              for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"get", "list", "patch"} <= grants[("apps", "deployments")]
    assert ("apps", "deployments/scale") not in grants
    assert {"list"} <= grants[("faastube.io", "workflows")] and "create" in grants[("", "events")]


def test_custom_values_reach_the_objects() -> None:
    objs = _render(CUSTOM)
    args = _one(objs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--no-socket-mount" not in args and "--image=registry.example/runtime:7" in args
    assert "--gateway-port=9000" in args and "--socket-dir=/run/ft" in args
    ds = _one(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/faastube:1.2.3"
    assert pod["containers"][0]["securityContext"] == {"privileged": True}
    assert "runtimeClassName" not in pod and "nodeSelector" not in pod and "affinity" not in pod
    assert {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v} >= {"/run/ft"}
    monitor = _one(objs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "interval": "30s"}]
    _one(objs, "PodMonitor")


# --- NOTES -----------------------------------------------------------------------------------


def test_notes_list_the_prerequisites() -> None:
    notes = _render_files()["faastube/templates/NOTES.txt"]
    assert "kubectl label namespace faastube pod-security.kubernetes.io/enforce=privileged" in notes
    assert "kubectl label node <gpu-node> nvidia.com/gpu.deploy.device-plugin=false" in notes
    assert "runtimeClassName nvidia" in notes
    assert 'Pod Security "baseline" is enough' in notes
    cdi = _render_files(COMBINATIONS["cdi"])["faastube/templates/NOTES.txt"]
    assert "nvidia.com/gpu=<uuid>" in cdi and "Kubernetes >= 1.29" in cdi
    hostpath = _render_files(COMBINATIONS["hostpath-socket"])["faastube/templates/NOTES.txt"]
    assert "mount the hostPath /var/run/faastube" in hostpath
    shared = _render_files(COMBINATIONS["any-node"])["faastube/templates/NOTES.txt"]
    assert "a GPU can then be given to a FaaSTube function and to another pod" in shared


def test_notes_give_the_uninstall_order_with_the_peering_object_helm_does_not_know() -> None:
    notes = _render_files()["faastube/templates/NOTES.txt"]
    steps = ["kubectl delete ftwf --all -A --wait", "helm uninstall ft -n faastube",
             "kubectl delete clusterkopfpeering ft-faastube-operator"]
    assert all(step in notes for step in steps)
    assert [notes.index(step) for step in steps] == sorted(notes.index(step) for step in steps)
    operator = _one(_render(), "Deployment", "-operator")
    assert steps[2].endswith(f" {operator['metadata']['name']}")  # the --peering name
    sidecar_only = _render_files(COMBINATIONS["sidecar-only"])["faastube/templates/NOTES.txt"]
    assert "clusterkopfpeering" not in sidecar_only


# --- monitoring and the Grafana dashboard ----------------------------------------------------


DASHBOARD = CHART / "dashboards" / "faastube.json"


def _metric_labels() -> dict[str, set[str]]:
    """Every sample name the code can expose, with its label names, from the real metric
    definitions on fresh registries (the pool collector over an empty data plane snapshot)."""
    from faastube_operator.metrics import OperatorMetrics
    from faastube_runtime.metrics import GatewayMetrics
    from faastube_sidecar.metrics import PoolCollector, SidecarMetrics
    from prometheus_client import CollectorRegistry

    families: list[tuple[str, str, tuple[str, ...], str]] = []
    for build, component in ((SidecarMetrics, "sidecar"), (GatewayMetrics.create, "gateway"),
                             (OperatorMetrics.build, "operator")):
        holder = build(CollectorRegistry())
        for metric in vars(holder).values():
            if hasattr(metric, "_labelnames") and hasattr(metric, "_type"):
                families.append((metric._name, metric._type, tuple(metric._labelnames), component))
    from faastube_sidecar.dataplane import Snapshot

    empty = SimpleNamespace(snapshot=Snapshot())
    for family in PoolCollector(lambda: empty).collect():  # type: ignore[arg-type, return-value]
        families.append((family.name, family.type, tuple(family._labelnames), "sidecar"))
    samples: dict[str, set[str]] = {}
    for name, kind, labels, component in families:
        target = {"node"} if component == "sidecar" else set()  # added by the sidecar PodMonitor
        if kind == "counter":
            samples[f"{name}_total"] = {*labels, *target}
        elif kind == "histogram":
            samples[f"{name}_bucket"] = {*labels, "le", *target}
            samples[f"{name}_sum"] = samples[f"{name}_count"] = {*labels, *target}
        else:
            samples[name] = {*labels, *target}
    return samples


def _queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    return exprs


def test_the_dashboard_is_valid_json_with_unique_panels_on_the_grid() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "FaaSTube"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_every_metric_and_label_the_dashboard_queries_exists_in_the_code() -> None:
    samples = _metric_labels()
    for expr in _queries(json.loads(DASHBOARD.read_text())):
        names = set(re.findall(r"\bfaastube_[a-z0-9_]+\b", expr))
        assert names, expr
        unknown = names - set(samples)
        assert not unknown, f"{sorted(unknown)} in {expr}"
        allowed = set().union(*(samples[n] for n in names))
        used = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}
        used |= {m for sel in re.findall(r"\{([^}]*)\}", expr)
                 for m in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", sel)}
        used |= set(re.findall(r"label_values\([a-z0-9_]+, ([a-z_]+)\)", expr))
        assert used <= allowed, f"labels {sorted(used - allowed)} of {expr} are not on {sorted(names)}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) not installed")
def test_prometheus_parses_every_dashboard_query(tmp_path: Path) -> None:
    # Grafana's variables, as Grafana would substitute them.
    variables = {"$__rate_interval": "2m", "$node": ".*", "$workflow": ".*", "$slo": "0.5"}
    rules = []
    for i, expr in enumerate(_queries(json.loads(DASHBOARD.read_text()))):
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        for name, value in variables.items():
            expr = expr.replace(name, value)
        rules.append({"record": f"faastube:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_the_dashboard_covers_pools_requests_transfers_functions_gateways_and_the_operator() -> None:
    queried = {n for e in _queries(json.loads(DASHBOARD.read_text())) for n in re.findall(r"faastube_[a-z0-9_]+", e)}
    assert {"faastube_pool_reserved_bytes", "faastube_pool_used_bytes", "faastube_pool_limit_bytes",
            "faastube_pool_quota_bytes", "faastube_request_seconds_bucket", "faastube_transfer_bytes_total",
            "faastube_transfer_routes_total", "faastube_function_transfer_bytes_total",
            "faastube_frames_rejected_total", "faastube_gateway_request_duration_seconds_bucket",
            "faastube_gateway_requests_total", "faastube_operator_reconciliations_total"} <= queried


def test_the_latency_bound_choices_are_real_histogram_buckets() -> None:
    from faastube_runtime.metrics import GatewayMetrics
    from prometheus_client import CollectorRegistry
    from prometheus_client.utils import floatToGoString

    histogram = GatewayMetrics.create(CollectorRegistry()).request_seconds
    bounds = {floatToGoString(b) for b in histogram._upper_bounds}
    slo = next(v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == "slo")
    choices = [o["value"] for o in slo["options"]]
    assert choices and set(choices) <= bounds  # le="$slo" must name an exported bucket
    assert slo["current"]["value"] in choices


def test_the_dashboard_ships_in_a_configmap_for_grafanas_sidecar() -> None:
    objs = _render(COMBINATIONS["monitoring"])
    cm = _one(objs, "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "grafana"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "FaaSTube"}
    assert json.loads(cm["data"]["faastube.json"]) == json.loads(DASHBOARD.read_text())
    assert not [o for o in _render() if o["kind"] == "ConfigMap"]


def test_monitors_scrape_sidecars_with_their_node_and_every_gateway() -> None:
    objs = _render(COMBINATIONS["monitoring"])
    sidecars = _one(objs, "PodMonitor", "-sidecar")["spec"]["podMetricsEndpoints"][0]
    assert sidecars["honorLabels"] is True  # the workflow's `namespace` label survives
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in sidecars["relabelings"]
    gateways = _one(objs, "PodMonitor", "-gateways")["spec"]
    assert gateways["namespaceSelector"] == {"any": True}
    # It selects what the operator really labels gateway pods with, on the port they serve.
    gateway = next(o for o in manifests.workflow_children(
        WORKFLOW, namespace="team-a", spec={}, placement={}, settings=_operator_settings())
        if o["kind"] == "Deployment" and o["metadata"]["name"] == "traffic-gateway")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert gateways["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in gateway["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert gateways["podMetricsEndpoints"][0]["port"] in ports


# --- cross-node passing ----------------------------------------------------------------------


def test_cross_node_passing_is_off_by_default() -> None:
    objs = _render()
    pod = _one(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert not any(a.startswith("--peer-port") for a in pod["containers"][0]["args"])
    assert "hostNetwork" not in pod and not [o for o in objs if o["kind"] == "Secret"]


def test_the_network_values_reach_the_sidecar_with_a_generated_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from faastube_sidecar import cli as sidecar_cli

    values = {"sidecar": {"network": {"enabled": True, "peerPort": 7411, "hostNetwork": True,
                                      "ucxTls": "rc,tcp,cuda_copy", "ucxNetDevices": "mlx5_0:1,mlx5_1:1",
                                      "nicsPerTransfer": 4, "bandwidth": "400Gb/s"}}}
    objs = _render(values)
    pod = _one(objs, "DaemonSet")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"name": "peer", "containerPort": 7411, "protocol": "TCP"} in container["ports"]
    assert any(e["name"] == "POD_IP" and e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
               for e in container["env"])
    secret = _one(objs, "Secret", "-peer")
    assert len(base64.b64decode(secret["data"]["secret"])) >= 32
    volume = next(v for v in pod["volumes"] if v["name"] == "peer-secret")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    monkeypatch.setenv("NODE_NAME", "node-a")
    monkeypatch.setenv("POD_IP", "10.0.0.7")
    settings = sidecar_cli.settings_from(_parse_command(container["args"]))
    net = settings.network
    assert (net.port, net.ucx_tls, net.ucx_net_devices, net.nics_per_transfer, net.advertise_address) == \
        (7411, "rc,tcp,cuda_copy", "mlx5_0:1,mlx5_1:1", 4, "10.0.0.7")
    assert net.bandwidth_bytes_per_s == 50e9 and str(net.secret_file) == "/etc/faastube/peer/secret"


def test_an_existing_secret_is_used_instead_of_a_generated_one() -> None:
    objs = _render({"sidecar": {"network": {"enabled": True, "existingSecret": "my-peer-secret"}}})
    assert not [o for o in objs if o["kind"] == "Secret"]
    pod = _one(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "peer-secret")["secret"]["secretName"] == "my-peer-secret"
