"""The CRDs: structural schemas that accept the example workflows and reject bad ones."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

osv = pytest.importorskip("openapi_schema_validator")
from faastube_spec import gpunode, topology
from faastube_spec import workflow as wf
from jsonschema.exceptions import ValidationError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*/workflow.yaml"))


def _crd(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "crds" / name).read_text()))


def _schema(crd: Mapping[str, Any]) -> dict[str, Any]:
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def _validate(crd_name: str, obj: Mapping[str, Any]) -> None:
    osv.validate(obj, _schema(_crd(crd_name)), cls=osv.OAS30Validator)


def _nodes(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any], bool]]:
    """Every schema node with its path and whether it sits inside a junctor (anyOf...)."""
    yield path, schema, False
    for key, sub in (schema.get("properties") or {}).items():
        yield from _nodes(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), Mapping):
        yield from _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from _nodes(schema["additionalProperties"], f"{path}{{}}")
    for junctor in ("anyOf", "allOf", "oneOf"):
        for i, sub in enumerate(schema.get(junctor) or []):
            yield f"{path}.{junctor}[{i}]", sub, True


@pytest.mark.parametrize("name", ["workflows.faastube.io.yaml", "gpunodes.faastube.io.yaml",
                                  "clusterkopfpeerings.kopf.dev.yaml"])
def test_crd_schema_is_structural(name: str) -> None:
    for path, node, in_junctor in _nodes(_schema(_crd(name))):
        if in_junctor:
            # Inside anyOf: only the int-or-string form's types, or which fields are required.
            if "required" in node:
                assert set(node) == {"required"}, path
            else:
                assert set(node) <= {"type"} and node.get("type") in ("integer", "string"), path
            continue
        untyped_ok = node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields")
        assert "type" in node or untyped_ok, f"{path}: structural schemas need a type"
        assert not ("properties" in node and "additionalProperties" in node), path


def test_workflow_crd_names_and_columns_follow_the_conventions() -> None:
    crd = _crd("workflows.faastube.io.yaml")
    names = crd["spec"]["names"]
    assert crd["spec"]["group"] == "faastube.io" and crd["spec"]["scope"] == "Namespaced"
    assert names["shortNames"] == ["ftwf"] and "wf" not in names["shortNames"]
    assert names["categories"] == ["faastube"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert {"Phase", "Functions", "Age"} <= set(columns)


def test_gpunode_crd_is_cluster_scoped_with_contract_columns() -> None:
    crd = _crd("gpunodes.faastube.io.yaml")
    assert crd["spec"]["scope"] == "Cluster"
    assert crd["spec"]["names"]["shortNames"] == ["ftnode"]
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[:3] == ["GPUs", "Free-Pool", "Ready"] and "Age" in columns


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.parent.name for p in EXAMPLES])
def test_example_workflows_pass_the_crd_schema_and_the_runtime_parser(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    _validate("workflows.faastube.io.yaml", doc)
    wf.parse_workflow(doc)  # the operator's check agrees


def _good() -> dict[str, Any]:
    return {"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow",
            "metadata": {"name": "w", "namespace": "team-a"},
            "spec": {"slo": "1.5s", "entry": "a",
                     "functions": [{"name": "a", "handler": "fns.mod:run", "image": "x:1",
                                    "replicas": 2, "computeTime": "500us"},
                                   {"name": "b", "handler": "fns:run", "gpu": {"memory": "8Gi"}}],
                     "edges": [{"from": "a", "to": "b", "size": "130MB"},
                               {"from": "a", "to": "b", "size": 4096}]}}


def _batched() -> dict[str, Any]:
    doc = _good()
    doc["spec"]["functions"][1]["batch"] = {"maxSize": 8, "maxDelay": "5ms"}
    doc["spec"]["edges"][0] = {"from": "a", "to": "b", "shape": [21, 3, 736, 736], "dtype": "float32"}
    doc["spec"]["edges"][1]["shape"], doc["spec"]["edges"][1]["dtype"] = [1024], "int32"
    return doc


def test_a_workflow_with_shapes_dtypes_and_a_batch_policy_passes() -> None:
    _validate("workflows.faastube.io.yaml", _batched())


def test_a_hand_written_workflow_passes() -> None:
    _validate("workflows.faastube.io.yaml", _good())


def test_an_autoscaled_workflow_passes_the_schema_and_gets_no_replicas_default() -> None:
    doc = _good()
    doc["spec"]["functions"][1].update(minReplicas=0, replicas=0, maxReplicas=4, targetConcurrency=1.5)
    doc["spec"]["functions"][0].update(minReplicas=2, maxReplicas=3)
    doc["spec"]["functions"][0].pop("replicas")
    doc["spec"]["edges"].pop()  # the schema lets a duplicate edge through; the parser does not
    _validate("workflows.faastube.io.yaml", doc)
    # An API-server default of replicas: 1 would make minReplicas: 2 invalid.
    fields = _schema(_crd("workflows.faastube.io.yaml"))["properties"]["spec"]["properties"]["functions"]
    assert "default" not in fields["items"]["properties"]["replicas"]
    assert wf.parse_workflow(doc).function("a").replicas == 2


BAD_WORKFLOWS = {
    "no spec": (lambda d: d.pop("spec")),
    "no slo": (lambda d: d["spec"].pop("slo")),
    "slo without unit": (lambda d: d["spec"].__setitem__("slo", "800")),
    "slo with unknown unit": (lambda d: d["spec"].__setitem__("slo", "8 days")),
    "no functions": (lambda d: d["spec"].__setitem__("functions", [])),
    "upper-case function name": (lambda d: d["spec"]["functions"][0].__setitem__("name", "Decode")),
    "function name too long": (lambda d: d["spec"]["functions"][0].__setitem__("name", "a" * 64)),
    "negative replicas": (lambda d: d["spec"]["functions"][0].__setitem__("replicas", -1)),
    "negative minReplicas": (lambda d: d["spec"]["functions"][0].__setitem__("minReplicas", -1)),
    "zero maxReplicas": (lambda d: d["spec"]["functions"][0].__setitem__("maxReplicas", 0)),
    "maxReplicas over a Deployment's limit": (lambda d: d["spec"]["functions"][0].__setitem__("maxReplicas",
                                                                                              2**31)),
    "zero targetConcurrency": (lambda d: d["spec"]["functions"][0].__setitem__("targetConcurrency", 0)),
    "targetConcurrency as text": (lambda d: d["spec"]["functions"][0].__setitem__("targetConcurrency", "2")),
    "replicas as text": (lambda d: d["spec"]["functions"][0].__setitem__("replicas", "2")),
    "handler without function": (lambda d: d["spec"]["functions"][0].__setitem__("handler", "mod")),
    "edge without size": (lambda d: d["spec"]["edges"][0].pop("size")),
    "negative size": (lambda d: d["spec"]["edges"][1].__setitem__("size", -1)),
    "size with unknown unit": (lambda d: d["spec"]["edges"][0].__setitem__("size", "12 parsecs")),
    "edge to a bad name": (lambda d: d["spec"]["edges"][0].__setitem__("to", "B_2")),
    "bad compute time": (lambda d: d["spec"]["functions"][0].__setitem__("computeTime", "fast")),
    "edge with a shape but neither dtype nor size": (
        lambda d: d["spec"]["edges"][0].update({"shape": [2, 3]}) or d["spec"]["edges"][0].pop("size")),
    "zero dimension": (lambda d: d["spec"]["edges"][0].update({"shape": [2, 0], "dtype": "uint8"})),
    "shape as text": (lambda d: d["spec"]["edges"][0].update({"shape": "2x3", "dtype": "uint8"})),
    "unknown dtype": (lambda d: d["spec"]["edges"][0].update({"shape": [2], "dtype": "float"})),
    "batch without maxSize": (lambda d: d["spec"]["functions"][1].__setitem__("batch", {"maxDelay": "5ms"})),
    "zero maxSize": (lambda d: d["spec"]["functions"][1].__setitem__("batch", {"maxSize": 0})),
    "maxSize over the limit": (lambda d: d["spec"]["functions"][1].__setitem__("batch", {"maxSize": 1025})),
    "maxDelay without unit": (
        lambda d: d["spec"]["functions"][1].__setitem__("batch", {"maxSize": 4, "maxDelay": "5"})),
}


@pytest.mark.parametrize("change", BAD_WORKFLOWS.values(), ids=BAD_WORKFLOWS.keys())
def test_the_workflow_schema_rejects(change: Any) -> None:
    doc = copy.deepcopy(_good())
    change(doc)
    with pytest.raises(ValidationError):
        _validate("workflows.faastube.io.yaml", doc)


def test_the_workflow_status_the_operator_writes_passes() -> None:
    doc = _good()
    doc["status"] = {
        "phase": "Running", "observedGeneration": 3, "functionCount": 2,
        "placementCostSeconds": 0.0052, "gateway": "w-gateway.team-a.svc:8080",
        "placement": {"a": {"node": "node-a"}, "b": {"node": "node-a", "gpu": 1}},
        "conditions": [{"type": "Ready", "status": "True", "reason": "AllFunctionsAvailable",
                        "message": "ok", "lastTransitionTime": "2026-11-27T18:00:00Z",
                        "observedGeneration": 3}],
    }
    _validate("workflows.faastube.io.yaml", doc)
    doc["status"]["conditions"][0]["reason"] = "not camel case"
    with pytest.raises(ValidationError):
        _validate("workflows.faastube.io.yaml", doc)


def _gpunode() -> dict[str, Any]:
    node = topology.dump_node(topology.builtin_node("dgx-h100"))
    return {"apiVersion": "faastube.io/v1alpha1", "kind": "GpuNode",
            "metadata": {"name": node["name"]}, "spec": {"topology": node},
            "status": {"gpus": [{"index": 0, "uuid": "GPU-0", "healthy": True,
                                 "poolReservedBytes": 0, "poolUsedBytes": 0,
                                 "freeMemoryBytes": 80 << 30}],
                       "freePoolBytes": 80 << 30, "lastHeartbeatTime": "2026-11-27T18:00:00Z",
                       "conditions": [{"type": "Ready", "status": "True", "reason": "Heartbeat",
                                       "message": "up", "lastTransitionTime": "2026-11-27T18:00:00Z"}]}}


@pytest.mark.parametrize("name", topology.builtin_names())
def test_every_builtin_node_topology_passes_the_gpunode_schema(name: str) -> None:
    for node in topology.builtin(name).nodes:
        doc = _gpunode()
        doc["spec"]["topology"] = topology.dump_node(node)
        _validate("gpunodes.faastube.io.yaml", doc)


def test_the_gpunode_schema_rejects_a_bad_status_and_a_bad_link() -> None:
    doc = _gpunode()
    doc["status"]["gpus"][0]["healthy"] = "yes"
    with pytest.raises(ValidationError):
        _validate("gpunodes.faastube.io.yaml", doc)
    doc = _gpunode()
    doc["spec"]["topology"]["links"][0]["kind"] = "infiniband"
    with pytest.raises(ValidationError):
        _validate("gpunodes.faastube.io.yaml", doc)
    doc = _gpunode()
    del doc["spec"]["topology"]
    with pytest.raises(ValidationError):
        _validate("gpunodes.faastube.io.yaml", doc)


def _networked_gpunode() -> dict[str, Any]:
    doc = _gpunode()
    doc["status"]["nics"] = [gpunode.Nic("eno1", 3_125_000_000).to_body(),
                             gpunode.Nic("ibp24s0", 50_000_000_000, "mlx5_0").to_body(),
                             gpunode.Nic("ens5", None).to_body()]
    doc["status"]["network"] = gpunode.PeerNetwork("10.1.2.3", 7400, "dgx-h100").to_body()
    return doc


def test_a_gpunode_with_nics_and_a_network_block_passes_and_parses_back() -> None:
    doc = _networked_gpunode()
    _validate("gpunodes.faastube.io.yaml", doc)
    assert gpunode.parse_network(doc["status"]["network"]) == gpunode.PeerNetwork("10.1.2.3", 7400, "dgx-h100")
    assert len(gpunode.parse_nics(doc["status"]["nics"])) == 3


BAD_NETWORKS = {
    "nic without name": (lambda s: s["nics"][0].pop("name")),
    "nic without rdma": (lambda s: s["nics"][0].pop("rdma")),
    "nic name with a slash": (lambda s: s["nics"][0].__setitem__("name", "eth/0")),
    "nic name over 15 characters": (lambda s: s["nics"][0].__setitem__("name", "e" * 16)),
    "zero speed": (lambda s: s["nics"][0].__setitem__("speedBytesPerSecond", 0)),
    "speed as text": (lambda s: s["nics"][0].__setitem__("speedBytesPerSecond", "100Gbit")),
    "rdma as text": (lambda s: s["nics"][1].__setitem__("rdma", "yes")),
    "network without address": (lambda s: s["network"].pop("address")),
    "network without peerPort": (lambda s: s["network"].pop("peerPort")),
    "network without agent": (lambda s: s["network"].pop("agent")),
    "port 0": (lambda s: s["network"].__setitem__("peerPort", 0)),
    "port over 65535": (lambda s: s["network"].__setitem__("peerPort", 65536)),
    "empty agent": (lambda s: s["network"].__setitem__("agent", "")),
    "zero nicsPerTransfer": (lambda s: s["network"].__setitem__("nicsPerTransfer", 0)),
}


@pytest.mark.parametrize("change", BAD_NETWORKS.values(), ids=BAD_NETWORKS.keys())
def test_the_gpunode_schema_and_the_reader_both_reject(change: Any) -> None:
    doc = _networked_gpunode()
    change(doc["status"])
    with pytest.raises(ValidationError):
        _validate("gpunodes.faastube.io.yaml", doc)
    with pytest.raises(gpunode.GpuNodeFieldInvalid, match=r"^status\.(nics\[\d\]|network)"):
        gpunode.parse_nics(doc["status"]["nics"])
        gpunode.parse_network(doc["status"]["network"])


def test_the_reader_rejects_what_the_schema_cannot_express() -> None:
    doc = _networked_gpunode()
    doc["status"]["network"]["address"] = "not an address!"
    _validate("gpunodes.faastube.io.yaml", doc)  # a plain string to the schema
    with pytest.raises(gpunode.GpuNodeFieldInvalid,
                       match=r"status.network.address: must be an IP address or a DNS name"):
        gpunode.parse_network(doc["status"]["network"])
    doc["status"]["nics"][1]["rdma"] = False  # an RDMA device on a NIC said to have none
    with pytest.raises(gpunode.GpuNodeFieldInvalid, match=r"status.nics\[1\].rdmaDevice: given, but rdma is false"):
        gpunode.parse_nics(doc["status"]["nics"])
