"""Pure manifest builders: what the operator would create, checked without a cluster."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")

from faastube_operator import cli as operator_cli
from faastube_operator import manifests
from faastube_operator.podresources import ContainerResources, canonical_quantity
from faastube_operator.settings import OperatorSettings
from faastube_placement import Where, follow_consumers
from faastube_spec import workflow as wf

SPEC: dict[str, Any] = {
    "slo": "800ms",
    "functions": [
        {"name": "decode", "handler": "functions:decode", "image": "example/fn:1"},
        {"name": "detect", "handler": "functions:detect", "image": "example/fn:1",
         "gpu": {"memory": "8Gi"}, "replicas": 2},
        {"name": "post", "handler": "functions:post"},
        {"name": "classify", "handler": "functions:classify", "gpu": True},
    ],
    "edges": [{"from": "decode", "to": "detect", "size": "130MB"},
              {"from": "detect", "to": "post", "size": "20MB"},
              {"from": "post", "to": "classify", "size": "10MB"}],
}
SETTINGS = OperatorSettings(image="ghcr.io/faastube/faastube:9", gateway_port=9000)


def _workflow() -> wf.Workflow:
    return wf.parse_workflow({"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow",
                              "metadata": {"name": "traffic"}, "spec": SPEC})


def _children(placement: dict[str, Where] | None = None) -> dict[str, dict[str, Any]]:
    w = _workflow()
    placed = follow_consumers(w, placement or {
        "decode": Where("node-b"), "detect": Where("node-a", 1), "post": Where(None),
        "classify": Where("node-c", 3)})
    objs = manifests.workflow_children(w, namespace="team-a", spec=SPEC, placement=placed,
                                       settings=SETTINGS)
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_one_deployment_and_headless_service_per_function_plus_the_gateway() -> None:
    functions = ("decode", "detect", "post", "classify")
    assert set(_children()) == {*(f"Deployment/traffic-{f}" for f in functions),
                                *(f"Service/traffic-{f}" for f in functions),
                                "Deployment/traffic-gateway", "Service/traffic-gateway"}


def test_function_service_is_headless_and_selects_only_that_functions_pods() -> None:
    svc = _children()["Service/traffic-detect"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"faastube.io/workflow": "traffic", "faastube.io/function": "detect"}
    assert svc["spec"]["ports"] == [{"name": "http", "port": SETTINGS.worker_port, "targetPort": "http",
                                     "protocol": "TCP"}]
    assert svc["metadata"]["namespace"] == "team-a"
    assert svc["metadata"]["labels"]["faastube.io/workflow"] == "traffic"  # found (and deleted) by label


def test_function_container_runs_the_worker_on_its_port_with_the_workflow_document() -> None:
    container = _children()["Deployment/traffic-post"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["faastube", "worker", "--listen",
                                    f"tcp://0.0.0.0:{SETTINGS.worker_port}"]
    assert container["ports"] == [{"name": "http", "containerPort": SETTINGS.worker_port,
                                   "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # /healthz answers 503 until the worker is warm; a slow model load gets ten minutes, not three probes
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    env = _env(container)
    document = json.loads(env["FAASTUBE_WORKFLOW_DOCUMENT"])
    assert wf.parse_workflow(document) == _workflow()
    assert env["FAASTUBE_HANDLER"] == "functions:post" and env["FAASTUBE_NAMESPACE"] == "team-a"
    assert "FAASTUBE_GPU_INDEX" not in env  # a CPU function


def test_the_function_env_configures_a_real_worker_command_line() -> None:
    worker_cli = pytest.importorskip("faastube_runtime.worker_cli")
    import argparse

    container = _children()["Deployment/traffic-detect"]["spec"]["template"]["spec"]["containers"][0]
    environ = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    parser = argparse.ArgumentParser()
    worker_cli.add_arguments(parser)
    config = worker_cli.build_config(parser.parse_args(container["command"][2:]), environ)
    assert (config.function, config.gpu_index, config.sidecar_socket) == (
        "detect", 1, "/var/run/faastube/faastube.sock")
    assert str(config.listen) == f"tcp://0.0.0.0:{SETTINGS.worker_port}"
    assert config.workflow == _workflow()


def test_every_built_object_is_a_valid_kubernetes_object() -> None:
    for obj in _children().values():
        kubernetes_validate.validate(obj, "1.30", strict=True)


def test_gpu_function_gets_its_gpu_resource_labels_env_and_node_pin() -> None:
    dep = _children()["Deployment/traffic-detect"]
    pod = dep["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert dep["spec"]["replicas"] == 2
    assert pod["metadata"]["labels"]["faastube.io/workflow"] == "traffic"
    assert pod["metadata"]["labels"]["faastube.io/function"] == "detect"
    assert dep["spec"]["selector"]["matchLabels"] == {"faastube.io/workflow": "traffic",
                                                      "faastube.io/function": "detect"}
    # Its GPU, and CPU/memory so that the pod is not BestEffort (a Workflow declares neither).
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"},
                                      "limits": {"memory": "8Gi", "faastube.io/gpu-1": 1}}
    env = _env(container)
    assert env["FAASTUBE_WORKFLOW"] == "traffic" and env["FAASTUBE_FUNCTION"] == "detect"
    assert env["FAASTUBE_GPU_INDEX"] == "1"
    assert env["FAASTUBE_SOCKET"] == "/var/run/faastube/faastube.sock"
    terms = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In",
                                            "values": ["node-a"]}]}]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # The device plugin's Allocate mounts the socket directory: no hostPath in a GPU pod.
    assert pod["spec"]["volumes"] == [] and container["volumeMounts"] == []


def test_cpu_function_follows_the_gpu_function_it_feeds() -> None:
    children = _children()
    decode = children["Deployment/traffic-decode"]["spec"]["template"]["spec"]
    post = children["Deployment/traffic-post"]["spec"]["template"]["spec"]
    node_of = (lambda s: s["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"][0]["values"])
    assert node_of(decode) == ["node-a"]  # placement said node-b; detect is on node-a
    assert node_of(post) == ["node-c"]
    assert "faastube.io/gpu-1" not in decode["containers"][0]["resources"]["limits"]
    assert decode["containers"][0]["image"] == "example/fn:1"
    assert post["containers"][0]["image"] == SETTINGS.image  # no image: the runtime image
    # No device plugin allocation for a CPU function: it mounts the socket directory itself.
    assert decode["volumes"][0]["hostPath"]["path"] == "/var/run/faastube"
    assert decode["containers"][0]["volumeMounts"][0]["mountPath"] == "/var/run/faastube"


def test_an_unplaced_function_has_no_pin_and_the_null_removes_an_old_one() -> None:
    placed = {"decode": Where(None), "detect": Where("node-a", 0), "post": Where(None),
              "classify": Where("node-a", 0)}
    w = _workflow()
    dep = manifests.function_deployment(w, w.function("post"), namespace="ns",
                                        where=Where(None), settings=SETTINGS,
                                        workflow_spec_hash="h")
    affinity = dep["spec"]["template"]["spec"]["affinity"]
    assert affinity["nodeAffinity"] is None  # a merge patch drops an old pin
    # ... but the workflow's pods still share one node: refs are node-local
    term = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term == {"labelSelector": {"matchLabels": {"faastube.io/workflow": "traffic"}},
                    "topologyKey": "kubernetes.io/hostname"}
    assert follow_consumers(w, placed)["post"] == Where("node-a")
    pinned = manifests.function_deployment(w, w.function("post"), namespace="ns",
                                           where=Where("node-a"), settings=SETTINGS,
                                           workflow_spec_hash="h")
    assert pinned["spec"]["template"]["spec"]["affinity"]["podAffinity"] is None


def test_unplaced_workflow_objects_are_valid_and_the_gateway_joins_the_functions() -> None:
    children = _children({name: Where(None) for name in ("decode", "detect", "post", "classify")})
    for obj in children.values():
        kubernetes_validate.validate(obj, "1.30", strict=True)
    gateway = children["Deployment/traffic-gateway"]["spec"]["template"]["spec"]
    assert gateway["affinity"]["nodeAffinity"] is None
    assert gateway["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0][
        "topologyKey"] == "kubernetes.io/hostname"


def test_gateway_runs_the_runtime_image_with_the_workflow_on_the_entry_node() -> None:
    children = _children()
    template = children["Deployment/traffic-gateway"]["spec"]["template"]
    pod = template["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/faastube/faastube:9"
    assert container["command"][:4] == ["faastube", "gateway", "--port", "9000"]
    services = [a for a in container["command"] if a.startswith("--function-service=")]
    assert services == [f"--function-service={f}=traffic-{f}.team-a.svc:{SETTINGS.worker_port}"
                        for f in ("decode", "detect", "post", "classify")]
    doc = json.loads(_env(container)["FAASTUBE_WORKFLOW_DOCUMENT"])
    assert doc["spec"] == SPEC and doc["metadata"]["name"] == "traffic"
    # The gateway stores inputs and reads outputs through the node's sidecar: same node,
    # required (decode, the entry, follows detect to node-a).
    required = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["node-a"]
    # The sidecar admits only pods labelled with a workflow and a function.
    assert template["metadata"]["labels"]["faastube.io/function"] == "gateway"
    assert children["Deployment/traffic-gateway"]["spec"]["selector"]["matchLabels"] == {
        "faastube.io/workflow": "traffic", "faastube.io/component": "gateway"}
    svc = children["Service/traffic-gateway"]
    assert svc["spec"]["ports"][0]["port"] == 9000
    assert svc["spec"]["selector"] == {"faastube.io/workflow": "traffic",
                                       "faastube.io/component": "gateway"}


def test_a_spec_change_changes_the_pod_template_so_functions_roll() -> None:
    before = _children()["Deployment/traffic-post"]["spec"]["template"]["metadata"]
    changed = json.loads(json.dumps(SPEC))
    changed["slo"] = "900ms"
    assert manifests.spec_hash(changed) != manifests.spec_hash(SPEC)
    assert before["annotations"]["faastube.io/spec-hash"] == manifests.spec_hash(SPEC)


def test_the_builders_are_deterministic() -> None:
    assert _children() == _children()


def test_long_names_are_shortened_to_a_stable_valid_label() -> None:
    name = manifests.child_name("w" * 40, "f" * 40)
    assert len(name) <= 63 and name == manifests.child_name("w" * 40, "f" * 40)
    assert name != manifests.child_name("w" * 40, "f" * 39 + "g")
    assert manifests.child_name("traffic", "decode") == "traffic-decode"


def test_without_the_socket_mount_pods_without_a_gpu_ask_the_device_plugin_for_the_socket() -> None:
    w = _workflow()
    settings = OperatorSettings(mount_socket_dir=False)
    placed = follow_consumers(w, {"detect": Where("n", 0), "classify": Where("n", 1)})
    children = {o["metadata"]["name"]: o for o in manifests.workflow_children(
        w, namespace="ns", spec=SPEC, placement=placed, settings=settings) if o["kind"] == "Deployment"}
    for name, dep in children.items():
        pod = dep["spec"]["template"]["spec"]
        # No hostPath anywhere: every workflow pod passes Pod Security "baseline".
        assert pod["volumes"] == [] and pod["containers"][0]["volumeMounts"] == [], name
        limits = pod["containers"][0]["resources"]["limits"]
        if name in ("traffic-detect", "traffic-classify"):
            assert "faastube.io/socket" not in limits  # the GPU's allocation brings the mount
        else:
            assert limits["faastube.io/socket"] == 1, name
        kubernetes_validate.validate(dep, "1.30", strict=True)


def test_gpu_pods_run_under_the_configured_runtime_class_and_others_drop_it() -> None:
    w = _workflow()
    settings = OperatorSettings(gpu_runtime_class="nvidia")
    placed = follow_consumers(w, {"detect": Where("n", 0), "classify": Where("n", 1)})
    pods = {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in manifests.workflow_children(
        w, namespace="ns", spec=SPEC, placement=placed, settings=settings) if o["kind"] == "Deployment"}
    assert pods["traffic-detect"]["runtimeClassName"] == "nvidia"
    assert pods["traffic-decode"]["runtimeClassName"] is None  # a merge patch removes an old one
    assert "runtimeClassName" not in pods["traffic-gateway"]
    plain = _children()["Deployment/traffic-detect"]["spec"]["template"]["spec"]
    assert plain["runtimeClassName"] is None  # the CDI exposure needs no runtime class


def test_every_workflow_pod_tolerates_the_gpu_node_taint() -> None:
    for obj in _children().values():
        if obj["kind"] == "Deployment":
            assert obj["spec"]["template"]["spec"]["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_function_and_gateway_resources_come_from_the_settings() -> None:
    settings = OperatorSettings(
        function_resources=ContainerResources.parse({"requests": {"cpu": "2", "memory": "4Gi"},
                                                     "limits": {"cpu": "4", "memory": "16Gi"}}),
        gateway_resources=ContainerResources.parse({"requests": {"cpu": "0.25", "memory": "512Mi"}}))
    w = _workflow()
    placed = follow_consumers(w, {"detect": Where("n", 0)})
    deps = {o["metadata"]["name"]: o for o in manifests.workflow_children(
        w, namespace="ns", spec=SPEC, placement=placed, settings=settings) if o["kind"] == "Deployment"}
    resources = {name: d["spec"]["template"]["spec"]["containers"][0]["resources"] for name, d in deps.items()}
    assert resources["traffic-detect"] == {"requests": {"cpu": "2", "memory": "4Gi"},
                                           "limits": {"cpu": "4", "memory": "16Gi", "faastube.io/gpu-0": 1}}
    assert resources["traffic-post"] == {"requests": {"cpu": "2", "memory": "4Gi"},
                                         "limits": {"cpu": "4", "memory": "16Gi"}}
    assert resources["traffic-gateway"] == {"requests": {"cpu": "250m", "memory": "512Mi"}}


@pytest.mark.parametrize(("given", "canonical"), [
    ("0.5", "500m"), ("250m", "250m"), ("2000", "2k"), ("1500", "1500"), ("1024Mi", "1Gi"),
    ("1.5Gi", "1536Mi"), ("512", "512"), ("0.5Ki", "512"), ("0", "0"), ("8Gi", "8Gi"),
])
def test_quantities_are_written_as_the_api_server_returns_them(given: str, canonical: str) -> None:
    # What the operator writes, it reads back unchanged: no endless re-patching.
    assert canonical_quantity(given) == canonical


@pytest.mark.parametrize(("doc", "why"), [
    ({"requests": {"gpu": "1"}}, "requests.gpu: not one of cpu, memory, ephemeral-storage"),
    ({"limits": {"memory": "lots"}}, "limits.memory: 'lots' is not a quantity"),
    ({"limits": {"memory": "1e9"}}, "limits.memory: '1e9' is not a quantity"),
    ({"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}, "requests.memory 2Gi is above limits.memory 1Gi"),
    ({"request": {}}, "unknown keys ['request']"),
    ([], "expected a mapping"),
])
def test_bad_resources_are_refused_naming_the_key(doc: Any, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        ContainerResources.parse(doc)


def test_the_operator_command_line_sets_runtime_class_and_resources() -> None:
    parser = argparse.ArgumentParser()
    operator_cli.add_arguments(parser)
    args = parser.parse_args(["--gpu-runtime-class", "nvidia", "--function-resources",
                              '{"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}'])
    settings = operator_cli.settings_from_args(args)
    assert settings.gpu_runtime_class == "nvidia"
    assert settings.function_resources.to_kubernetes() == {"requests": {"cpu": "1", "memory": "2Gi"},
                                                           "limits": {"memory": "4Gi"}}
    assert settings.gateway_resources == OperatorSettings().gateway_resources
    with pytest.raises(SystemExit):
        parser.parse_args(["--function-resources", '{"limits": {"memory": "x"}}'])


def test_settings_reject_bad_values_naming_the_field() -> None:
    with pytest.raises(ValueError, match="gateway_port"):
        OperatorSettings(gateway_port=0)
    with pytest.raises(ValueError, match="image_pull_policy"):
        OperatorSettings(image_pull_policy="Sometimes")
    with pytest.raises(ValueError, match="worker_port"):
        OperatorSettings(worker_port=70000)
    with pytest.raises(ValueError, match="gpu_runtime_class"):
        OperatorSettings(gpu_runtime_class="NVIDIA runtime")


def test_pods_that_reach_the_sidecar_join_its_socket_group() -> None:
    w = _workflow()
    placed = follow_consumers(w, {"decode": Where("node-b"), "detect": Where("node-a", 1),
                                             "post": Where(None), "classify": Where("node-c", 3)})
    settings = OperatorSettings(image="x", socket_group=2350)
    objs = manifests.workflow_children(w, namespace="team-a", spec=SPEC, placement=placed, settings=settings)
    deployments = [o for o in objs if o["kind"] == "Deployment"]
    assert deployments and all(
        d["spec"]["template"]["spec"]["securityContext"] == {"supplementalGroups": [2350]} for d in deployments)
    plain = [o for o in _children().values() if o["kind"] == "Deployment"]
    assert all("securityContext" not in d["spec"]["template"]["spec"] for d in plain)
