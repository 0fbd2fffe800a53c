"""Pure manifest builders: what the operator would create, checked without a cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")

from faastube import workflow as wf
from faastube_operator import manifests
from faastube_operator.manifests import Where
from faastube_operator.settings import OperatorSettings

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
    placed = manifests.resolve_placement(w, placement or {
        "decode": Where("node-b"), "detect": Where("node-a", 1), "post": Where(None),
        "classify": Where("node-c", 3)})
    objs = manifests.workflow_children(w, namespace="team-a", spec=SPEC, placement=placed,
                                       settings=SETTINGS)
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_one_deployment_per_function_plus_gateway_deployment_and_service() -> None:
    assert set(_children()) == {"Deployment/traffic-decode", "Deployment/traffic-detect",
                                "Deployment/traffic-post", "Deployment/traffic-classify",
                                "Deployment/traffic-gateway", "Service/traffic-gateway"}


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
    assert container["resources"] == {"limits": {"faastube.io/gpu-1": 1}}
    env = _env(container)
    assert env["FAASTUBE_WORKFLOW"] == "traffic" and env["FAASTUBE_FUNCTION"] == "detect"
    assert env["FAASTUBE_GPU_INDEX"] == "1"
    assert env["FAASTUBE_SOCKET"] == "/var/run/faastube/faastube.sock"
    terms = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In",
                                            "values": ["node-a"]}]}]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["volumes"][0]["hostPath"]["path"] == "/var/run/faastube"


def test_cpu_function_follows_the_gpu_function_it_feeds() -> None:
    children = _children()
    decode = children["Deployment/traffic-decode"]["spec"]["template"]["spec"]
    post = children["Deployment/traffic-post"]["spec"]["template"]["spec"]
    node_of = (lambda s: s["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"][0]["values"])
    assert node_of(decode) == ["node-a"]  # placement said node-b; detect is on node-a
    assert node_of(post) == ["node-c"]
    assert "resources" not in decode["containers"][0]
    assert decode["containers"][0]["image"] == "example/fn:1"
    assert post["containers"][0]["image"] == SETTINGS.image  # no image: the runtime image


def test_an_unplaced_function_has_no_pin_and_the_null_removes_an_old_one() -> None:
    placed = {"decode": Where(None), "detect": Where("node-a", 0), "post": Where(None),
              "classify": Where("node-a", 0)}
    w = _workflow()
    dep = manifests.function_deployment(w, w.function("post"), namespace="ns",
                                        where=Where(None), settings=SETTINGS,
                                        workflow_spec_hash="h")
    assert dep["spec"]["template"]["spec"]["affinity"] is None
    assert manifests.resolve_placement(w, placed)["post"] == Where("node-a")


def test_gateway_runs_the_runtime_image_with_the_workflow_and_prefers_the_entry_node() -> None:
    children = _children()
    pod = children["Deployment/traffic-gateway"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/faastube/faastube:9"
    assert container["command"][:2] == ["faastube", "gateway"] and "9000" in container["command"]
    doc = json.loads(_env(container)["FAASTUBE_WORKFLOW_DOCUMENT"])
    assert doc["spec"] == SPEC and doc["metadata"]["name"] == "traffic"
    preferred = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0]["preference"]["matchExpressions"][0]["values"] == ["node-a"]
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


def test_no_socket_mount_when_the_device_plugin_adds_it() -> None:
    w = _workflow()
    settings = OperatorSettings(mount_socket_dir=False)
    dep = manifests.function_deployment(w, w.function("decode"), namespace="ns",
                                        where=Where("n"), settings=settings,
                                        workflow_spec_hash="h")
    assert dep["spec"]["template"]["spec"]["volumes"] == []


def test_settings_reject_bad_values_naming_the_field() -> None:
    with pytest.raises(ValueError, match="gateway_port"):
        OperatorSettings(gateway_port=0)
    with pytest.raises(ValueError, match="image_pull_policy"):
        OperatorSettings(image_pull_policy="Sometimes")
