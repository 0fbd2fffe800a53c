"""``faastube topology``: simulated documents, listing, and the no-GPU message."""

from __future__ import annotations

import json

import pytest
import yaml
from faastube import cli
from faastube_sidecar import discovery
from faastube_spec import topology


def _nvml_sees_a_gpu() -> bool:
    try:
        nvml = discovery.load_nvml()
    except discovery.NoGpuVisible:
        return False
    try:
        return nvml.nvmlDeviceGetCount() > 0
    finally:
        nvml.nvmlShutdown()


def test_list_simulated_prints_every_builtin_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topology", "--list-simulated"]) == 0
    assert capsys.readouterr().out.split() == list(topology.builtin_names())


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_a_simulated_topology_prints_a_valid_document(
        fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topology", "--simulated", "dgx1-v100", "--format", fmt]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    assert topology.parse_topology(doc) == topology.builtin("dgx1-v100")


def test_node_name_renames_a_single_node_simulated_topology(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topology", "--simulated", "4x-a10", "--node-name", "worker-7"]) == 0
    node = topology.parse_topology(yaml.safe_load(capsys.readouterr().out)).nodes[0]
    assert node.name == "worker-7" and len(node.gpus) == 4


def test_unknown_simulated_names_and_bad_renames_are_usage_errors(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topology", "--simulated", "dgx-9"]) == 2
    assert "no built-in topology named 'dgx-9'" in capsys.readouterr().err
    assert cli.main(["topology", "--simulated", "example-cluster", "--node-name", "x"]) == 2
    assert "single-node" in capsys.readouterr().err
    assert cli.main(["topology", "--node-name", " "]) == 2
    assert "--node-name: must not be empty" in capsys.readouterr().err


def test_without_a_gpu_the_command_says_so_and_exits_1(
        capsys: pytest.CaptureFixture[str]) -> None:
    if _nvml_sees_a_gpu():
        pytest.skip("this machine has a GPU")
    assert cli.main(["topology"]) == 1
    err = capsys.readouterr().err
    assert "no GPU is visible" in err and "--simulated" in err


@pytest.mark.gpu
def test_with_a_gpu_the_command_prints_this_node(capsys: pytest.CaptureFixture[str]) -> None:
    if not _nvml_sees_a_gpu():
        pytest.skip("no GPU visible")
    assert cli.main(["topology", "--format", "json", "--node-name", "here"]) == 0
    doc = json.loads(capsys.readouterr().out)
    node = topology.parse_topology(doc).nodes[0]
    assert node.name == "here" and node.gpus
