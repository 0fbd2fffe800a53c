"""`faastube place` on files: JSON out, clear errors naming file and field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from faastube import cli
from faastube_spec import topology
from faastube_spec.units import human_size, parse_size

WORKFLOW = {
    "apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "traffic"},
    "spec": {"slo": "800ms", "functions": [
        {"name": "decode", "handler": "functions:decode"},
        {"name": "detect", "handler": "functions:detect", "gpu": {"memory": "20Gi"}},
        {"name": "recognize", "handler": "functions:recognize", "gpu": {"memory": "20Gi"}},
    ], "edges": [
        {"from": "decode", "to": "detect", "size": "130MB"},
        {"from": "detect", "to": "recognize", "size": "180MB"},
    ]},
}


def write(path: Path, doc: object) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def place(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["place", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_place_prints_assignments_cost_and_per_edge_paths(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    wf = write(tmp_path / "w.yaml", WORKFLOW)
    code, out, _ = place(["--workflow", wf, "--nodes", "builtin:dgx1-v100"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert set(doc["assignments"]) == {"decode", "detect", "recognize"}
    assert doc["assignments"]["decode"]["gpu"] is None
    assert [(e["from"], e["to"], e["bytes"]) for e in doc["edges"]] == [
        ("decode", "detect", 130_000_000), ("detect", "recognize", 180_000_000)]
    assert [e["path"] for e in doc["edges"]] == ["pcie", "nvlink"]  # 20 GiB + 20 GiB > 32 GB V100
    assert doc["costSeconds"] == pytest.approx(sum(e["seconds"] for e in doc["edges"]))
    assert doc["optimal"] is True


def test_place_reads_topology_files_gpunode_lists_and_usage(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    wf = write(tmp_path / "w.yaml", WORKFLOW)
    cluster = topology.builtin("example-cluster")
    topo = write(tmp_path / "topo.yaml", topology.dump_topology(cluster))
    gpunodes = write(tmp_path / "gpunodes.yaml", {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "faastube.io/v1alpha1", "kind": "GpuNode", "metadata": {"name": n.name},
         "spec": {"topology": topology.dump_node(n)}} for n in cluster.nodes]})
    busy = write(tmp_path / "usage.yaml", {"usage": [
        {"node": "dgx-a100-1", "gpu": g.index, "slotsUsed": 4} for g in cluster.node("dgx-a100-1").gpus]})
    _, from_topology, _ = place(["--workflow", wf, "--nodes", topo], capsys)
    _, from_gpunodes, _ = place(["--workflow", wf, "--nodes", gpunodes], capsys)
    assert json.loads(from_topology)["assignments"]["detect"]["node"] == "dgx-a100-1"
    # GpuNode objects carry no network section: default bandwidth; same node choice here.
    assert json.loads(from_gpunodes)["assignments"]["detect"]["node"] == "dgx-a100-1"
    code, with_usage, _ = place(["--workflow", wf, "--nodes", topo, "--usage", busy], capsys)
    assert code == 0
    assert {a["node"] for a in json.loads(with_usage)["assignments"].values()} == {"dgx-a100-2"}


@pytest.mark.parametrize("doc, needle", [
    ({**WORKFLOW, "spec": {**WORKFLOW["spec"], "edges": [{"from": "decode", "to": "nope", "size": 1}]}},
     "spec.edges[0].to"),
    ({**WORKFLOW, "kind": "Flow"}, "kind"),
])
def test_an_invalid_workflow_exits_2_naming_file_and_field(tmp_path: Path, doc: dict, needle: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    wf = write(tmp_path / "bad-workflow.yaml", doc)
    code, out, err = place(["--workflow", wf, "--nodes", "builtin:4x-a10"], capsys)
    assert code == 2 and out == ""
    assert "bad-workflow.yaml" in err and needle in err


def test_an_invalid_topology_exits_2_naming_file_and_field(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    wf = write(tmp_path / "w.yaml", WORKFLOW)
    doc = topology.dump_topology(topology.builtin("4x-a10"))
    doc["nodes"][0]["links"][0]["b"] = 9
    nodes = write(tmp_path / "bad-nodes.yaml", doc)
    code, _, err = place(["--workflow", wf, "--nodes", nodes], capsys)
    assert code == 2
    assert "bad-nodes.yaml" in err and "nodes[0].links[0].b" in err


@pytest.mark.parametrize("entry, field", [
    ({"node": "ghost", "gpu": 0}, "usage[0].node"),
    ({"node": "4x-a10", "gpu": 11}, "usage[0].gpu"),
    ({"node": "4x-a10", "gpu": 0, "memoryUsed": "lots"}, "usage[0].memoryUsed"),
    ({"node": "4x-a10", "gpu": 0, "slotsUsed": -1}, "usage[0].slotsUsed"),
    ({"node": "4x-a10", "gpu": 0, "slots": 1}, "usage[0].slots"),
])
def test_an_invalid_usage_file_exits_2_naming_the_entry(tmp_path: Path, entry: dict, field: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    wf = write(tmp_path / "w.yaml", WORKFLOW)
    usage = write(tmp_path / "usage.yaml", {"usage": [entry]})
    code, _, err = place(["--workflow", wf, "--nodes", "builtin:4x-a10", "--usage", usage], capsys)
    assert code == 2
    assert f"usage.yaml: {field}" in err


def test_missing_files_and_unknown_builtins_exit_2(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    wf = write(tmp_path / "w.yaml", WORKFLOW)
    code, _, err = place(["--workflow", wf, "--nodes", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "missing.yaml" in err and "cannot read" in err
    code, _, err = place(["--workflow", wf, "--nodes", "builtin:dgx-9000"], capsys)
    assert code == 2 and "dgx-9000" in err


def test_a_workflow_that_fits_nowhere_exits_1_with_the_reason(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads(json.dumps(WORKFLOW))
    doc["spec"]["functions"][1]["gpu"] = {"memory": "200Gi"}
    wf = write(tmp_path / "w.yaml", doc)
    code, out, err = place(["--workflow", wf, "--nodes", "builtin:dgx-h100"], capsys)
    assert code == 1 and out == ""
    assert "'detect' fits on no GPU" in err


def test_the_installed_command_runs_as_a_real_process(tmp_path: Path) -> None:
    wf = write(tmp_path / "w.yaml", WORKFLOW)
    proc = subprocess.run([sys.executable, "-m", "faastube.cli", "place", "--workflow", wf,
                           "--nodes", "builtin:8x-l40s"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["edges"][1]["path"] in ("same-gpu", "nvlink")


def test_a_missing_nodes_file_named_like_a_builtin_suggests_the_builtin(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wf = write(tmp_path / "w.yaml", WORKFLOW)
    code, _, err = place(["--workflow", wf, "--nodes", "dgx-h100"], capsys)
    assert code == 2 and "no such file; did you mean builtin:dgx-h100?" in err
    code, _, err = place(["--workflow", wf, "--nodes", "dgx-h100.yaml"], capsys)
    assert code == 2 and "did you mean builtin:dgx-h100?" in err


def test_edges_carry_a_human_readable_size_beside_their_bytes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wf = write(tmp_path / "w.yaml", WORKFLOW)
    code, out, _ = place(["--workflow", wf, "--nodes", "builtin:dgx-h100"], capsys)
    assert code == 0
    for edge in json.loads(out)["edges"]:
        assert parse_size(edge["size"]) == pytest.approx(edge["bytes"], rel=0.005)


@pytest.mark.parametrize(("size_bytes", "text"), [
    (512, "512B"), (130_000_000, "130MB"), (8 << 30, "8GiB"), (90930 << 20, "88.8GiB"), (1_234_567, "1.18MiB")])
def test_human_sizes_are_short(size_bytes: int, text: str) -> None:
    assert human_size(size_bytes) == text
