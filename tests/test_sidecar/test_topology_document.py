"""The topology document: parsing, validation with field paths, dumping, built-ins."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
from faastube.errors import InvalidRequest
from faastube_spec import topology
from faastube_spec.topology import GBPS, TopologyError

SINGLE_NODE_BUILTINS = ("dgx1-v100", "dgx-a100", "dgx-h100", "4x-a10", "8x-l40s", "lent-4xh100")


def small_doc() -> dict[str, Any]:
    return {
        "apiVersion": "faastube.io/v1alpha1",
        "kind": "Topology",
        "nodes": [{
            "name": "node-a",
            "hostMemoryBytes": 549755813888,
            "gpus": [
                {"index": 0, "uuid": "GPU-0", "name": "NVIDIA H100 80GB HBM3",
                 "memoryBytes": 85520809984,
                 "pcie": {"busId": "0000:19:00.0", "generation": 5, "width": 16,
                          "bandwidthGBps": 55.0, "switch": "sw0"},
                 "numaNode": 0, "sharingSlots": 2},
                {"index": 1, "uuid": "GPU-1", "name": "NVIDIA H100 80GB HBM3",
                 "memoryBytes": 85520809984,
                 "pcie": {"busId": "0000:39:00.0", "generation": 5, "width": 16,
                          "bandwidthGBps": 55.0}},
                {"index": 2, "uuid": "GPU-2", "name": "NVIDIA H100 80GB HBM3",
                 "memoryBytes": 85520809984,
                 "pcie": {"busId": "0000:59:00.0", "generation": 4, "width": 8,
                          "bandwidthGBps": 13.0}},
            ],
            "links": [
                {"a": 0, "b": 1, "kind": "nvlink", "nvlinks": 18, "bandwidthGBps": 390.0,
                 "p2p": True},
                {"a": 0, "b": 2, "kind": "pcie", "pcieRelation": "cross-socket",
                 "bandwidthGBps": 8.0, "p2p": False},
            ],
        }, {
            "name": "node-b",
            "gpus": [],
        }],
        "network": {"defaultBandwidthGBps": 10.0,
                    "links": [{"a": "node-a", "b": "node-b", "bandwidthGBps": 25.0,
                               "latencySeconds": 0.00002}]},
    }


def test_a_document_parses_into_the_model_with_bytes_per_second_and_defaults() -> None:
    t = topology.parse_topology(small_doc())
    node = t.node("node-a")
    gpu0, gpu1 = node.gpu(0), node.gpu(1)
    assert gpu0.pcie_bandwidth_bytes_per_s == 55.0 * GBPS
    assert gpu0.pcie_switch == "sw0" and gpu1.pcie_switch is None
    assert gpu0.sharing_slots == 2 and gpu1.sharing_slots == topology.DEFAULT_SHARING_SLOTS
    assert gpu1.numa_node is None
    link = node.link(1, 0)
    assert link is not None and link.kind == "nvlink" and link.nvlink_count == 18
    assert node.link(1, 2) is None
    assert node.host_memory_bytes == 549755813888
    assert t.node("node-b").gpus == ()


def test_gpu_bandwidth_is_infinite_on_one_gpu_and_falls_back_to_the_host_pcie_path() -> None:
    node = topology.parse_topology(small_doc()).node("node-a")
    assert node.gpu_bandwidth_bytes_per_s(1, 1) == math.inf
    assert node.gpu_bandwidth_bytes_per_s(0, 1) == 390.0 * GBPS
    assert node.gpu_bandwidth_bytes_per_s(2, 0) == 8.0 * GBPS
    # No entry for (1, 2): through the host, limited by the narrower PCIe link.
    assert node.gpu_bandwidth_bytes_per_s(1, 2) == 13.0 * GBPS


def test_network_bandwidth_uses_the_link_entry_else_the_default() -> None:
    t = topology.parse_topology(small_doc())
    assert t.network_bandwidth_bytes_per_s("node-b", "node-a") == 25.0 * GBPS
    assert t.network_bandwidth_bytes_per_s("node-a", "node-a") == math.inf
    doc = small_doc()
    doc["network"]["links"] = []
    assert topology.parse_topology(doc).network_bandwidth_bytes_per_s("node-a", "node-b") \
        == 10.0 * GBPS
    del doc["network"]
    assert topology.parse_topology(doc).default_network_bandwidth_bytes_per_s \
        == topology.DEFAULT_NETWORK_BANDWIDTH_BYTES_PER_S
    with pytest.raises(KeyError, match="no node named 'node-z'"):
        t.node("node-z")


def test_dump_then_parse_gives_back_the_same_topology() -> None:
    t = topology.parse_topology(small_doc())
    dumped = topology.dump_topology(t)
    assert topology.parse_topology(json.loads(json.dumps(dumped))) == t
    assert topology.parse_node(topology.dump_node(t.nodes[0])) == t.nodes[0]


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    target: Any = out
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


_DELETE = object()
N0 = ("nodes", 0)


@pytest.mark.parametrize(("path", "value", "message"), [
    (("apiVersion",), "faastube.io/v2", "apiVersion: must be 'faastube.io/v1alpha1'"),
    (("kind",), "Workflow", "kind: must be 'Topology'"),
    (("nodes",), [], "nodes: must list at least one node"),
    (("nodes",), "node-a", "nodes: must be a list"),
    (N0 + ("name",), _DELETE, "nodes[0].name: is required"),
    (N0 + ("colour",), "red", "nodes[0].colour: unknown field"),
    (("nodes", 1, "name"), "node-a", "nodes[1].name: duplicate node name 'node-a'"),
    (N0 + ("gpus", 1, "index"), 0, "nodes[0].gpus[1].index: duplicate GPU index 0"),
    (N0 + ("gpus", 1, "uuid"), "GPU-0", "nodes[0].gpus[1].uuid: duplicate GPU uuid"),
    (N0 + ("gpus", 0, "memoryBytes"), "80Gi", "nodes[0].gpus[0].memoryBytes: must be an integer"),
    (N0 + ("gpus", 0, "index"), -1, "nodes[0].gpus[0].index: must be >= 0"),
    (N0 + ("gpus", 0, "sharingSlots"), 0, "nodes[0].gpus[0].sharingSlots: must be >= 1"),
    (N0 + ("gpus", 0, "pcie", "bandwidthGBps"), 0,
     "nodes[0].gpus[0].pcie.bandwidthGBps: must be a positive finite number"),
    (N0 + ("gpus", 0, "pcie", "width"), True, "nodes[0].gpus[0].pcie.width: must be an integer"),
    (N0 + ("gpus", 0, "pcie"), _DELETE, "nodes[0].gpus[0].pcie: is required"),
    (N0 + ("links", 1, "b"), 9, "nodes[0].links[1].b: unknown GPU index 9"),
    (N0 + ("links", 0, "a"), 1, "nodes[0].links[0].b: must be greater than a"),
    (N0 + ("links", 0, "kind"), "infiniband", "nodes[0].links[0].kind: must be one of"),
    (N0 + ("links", 0, "nvlinks"), 0, "nodes[0].links[0].nvlinks: must be >= 1"),
    (N0 + ("links", 1, "pcieRelation"), _DELETE,
     "nodes[0].links[1].pcieRelation: is required for a pcie link"),
    (N0 + ("links", 1, "pcieRelation"), "same-rack",
     "nodes[0].links[1].pcieRelation: must be one of"),
    (N0 + ("links", 1, "p2p"), "yes", "nodes[0].links[1].p2p: must be true or false"),
    (N0 + ("links", 1),
     {"a": 0, "b": 1, "kind": "pcie", "pcieRelation": "same-switch", "bandwidthGBps": 1.0},
     "nodes[0].links[1]: duplicate link for GPU pair (0, 1)"),
    (("network", "links", 0, "b"), "node-z", "network.links[0].b: unknown node 'node-z'"),
    (("network", "links", 0, "latencySeconds"), -1, "network.links[0].latencySeconds"),
    (("network", "defaultBandwidthGBps"), "fast", "network.defaultBandwidthGBps: must be a number"),
])
def test_an_invalid_document_is_rejected_with_the_field_path(
        path: tuple[Any, ...], value: Any, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        topology.parse_topology(_set(small_doc(), path, value))
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(info.value, InvalidRequest)


def test_load_topology_reads_yaml_and_names_the_file_in_errors(tmp_path: Path) -> None:
    good = tmp_path / "t.json"
    good.write_text(json.dumps(small_doc()))
    assert topology.load_topology(good).node("node-a").gpu(2).pcie_width == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: faastube.io/v1alpha1\nkind: Topology\nnodes: [{name: n, gpus: 3}]\n")
    with pytest.raises(TopologyError, match=r"^nodes\[0\]\.gpus: must be a list.*bad\.yaml"):
        topology.load_topology(bad)
    with pytest.raises(TopologyError, match="cannot read topology file"):
        topology.load_topology(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("nodes: [unclosed\n")
    with pytest.raises(TopologyError, match="not valid YAML"):
        topology.load_topology(broken)


def test_every_builtin_topology_loads_and_round_trips() -> None:
    names = topology.builtin_names()
    assert set(SINGLE_NODE_BUILTINS) <= set(names)
    for name in names:
        t = topology.builtin(name)
        assert topology.parse_topology(topology.dump_topology(t)) == t, name
    with pytest.raises(TopologyError, match="no built-in topology named 'dgx-9'"):
        topology.builtin("dgx-9")


@pytest.mark.parametrize("name", SINGLE_NODE_BUILTINS)
def test_builtin_single_node_topologies_list_every_gpu_pair_once(name: str) -> None:
    node = topology.builtin_node(name)
    pairs = {(link.a, link.b) for link in node.links}
    assert pairs == set(itertools.combinations(node.gpu_indices, 2))


def test_dgx1_v100_has_the_hybrid_cube_mesh_wiring() -> None:
    node = topology.builtin_node("dgx1-v100")
    nvlinks = [link for link in node.links if link.kind == "nvlink"]
    assert len(nvlinks) == 16 and len(node.links) - len(nvlinks) == 12  # 12 of 28 lack NVLink
    for g in node.gpu_indices:  # six NVLink2 links per V100
        assert sum(l.nvlink_count for l in nvlinks if g in (l.a, l.b)) == 6
    assert {l.bandwidth_bytes_per_s for l in nvlinks} == {24 * GBPS, 48 * GBPS}
    assert all(l.bandwidth_bytes_per_s == l.nvlink_count * 24 * GBPS for l in nvlinks)
    assert node.nvlink_peers(0) == (1, 2, 3, 4)
    assert node.nvlink_peers(5) == (1, 4, 6, 7)
    no_nvlink = [l for l in node.links if l.kind == "pcie"]
    assert all(l.bandwidth_bytes_per_s == 8 * GBPS and l.pcie_relation == "cross-socket"
               for l in no_nvlink)


@pytest.mark.parametrize(("name", "nvlinks", "gbps"), [("dgx-a100", 12, 300.0),
                                                       ("dgx-h100", 18, 450.0),
                                                       ("lent-4xh100", 18, 390.0)])
def test_nvswitch_topologies_link_every_pair_and_share_one_port_per_gpu(
        name: str, nvlinks: int, gbps: float) -> None:
    node = topology.builtin_node(name)
    assert all(l.kind == "nvlink" and l.nvlink_count == nvlinks
               and l.bandwidth_bytes_per_s == gbps * GBPS for l in node.links)
    assert all(node.nvlink_port_bandwidth_bytes_per_s(g) == gbps * GBPS for g in node.gpu_indices)


def test_lent_4xh100_matches_the_measured_machine() -> None:
    node = topology.builtin_node("lent-4xh100")
    assert len(node.gpus) == 4
    for g in node.gpus:
        assert g.name == "NVIDIA H100 80GB HBM3"
        assert (g.pcie_generation, g.pcie_width, g.numa_node, g.pcie_switch) == (5, 16, 0, None)
        assert 52 * GBPS <= g.pcie_bandwidth_bytes_per_s <= 55 * GBPS


def test_pcie_only_and_bridged_topologies_have_the_documented_layout() -> None:
    a10 = topology.builtin_node("4x-a10")
    assert all(l.kind == "pcie" for l in a10.links)
    assert [g.pcie_switch for g in a10.gpus] == ["sw0", "sw0", "sw1", "sw1"]
    assert {l.pcie_relation for l in a10.links} == {"same-switch", "cross-socket"}
    l40s = topology.builtin_node("8x-l40s")
    bridged = {(l.a, l.b) for l in l40s.links if l.kind == "nvlink"}
    assert bridged == {(0, 1), (2, 3), (4, 5), (6, 7)}


def test_the_example_cluster_has_three_nodes_and_a_network_section() -> None:
    t = topology.builtin("example-cluster")
    assert [n.name for n in t.nodes] == ["dgx-a100-1", "dgx-a100-2", "a10-1"]
    assert t.network_bandwidth_bytes_per_s("dgx-a100-2", "dgx-a100-1") == 25 * GBPS
    assert t.network_bandwidth_bytes_per_s("a10-1", "dgx-a100-1") == 12.5 * GBPS
