"""``faastube run --nodes N``: N sidecars on one machine, the functions spread over them,
data passed across them over NIXL (UCX over TCP, host memory), results as on one node."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from faastube import protocol
from faastube_runtime import cli, dag, errors, nodes
from faastube_runtime.gateway import ClientStore, GatewayConfig
from faastube_runtime.local import LocalOptions, LocalRuntime
from faastube_spec import topology
from faastube_spec.workflow import load_workflow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FIXTURE = Path(__file__).parent / "nodes_fixture" / "workflow.yaml"
GiB = 1 << 30


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# --- pure: nodes, GPUs, placement -------------------------------------------------------------


def test_gpus_are_split_contiguously_and_every_node_gets_one() -> None:
    assert [n.cuda_ordinals for n in nodes.split_gpus(3, 8)] == [(0, 1), (2, 3, 4), (5, 6, 7)]
    assert [n.name for n in nodes.split_gpus(2, 0)] == ["node-0", "node-1"]
    assert all(n.cuda_ordinals == () for n in nodes.split_gpus(2, 0))
    with pytest.raises(errors.BadInput, match="each node needs a GPU of its own and 1 is visible"):
        nodes.split_gpus(2, 1)
    with pytest.raises(errors.BadInput, match="--nodes: must be at least 1"):
        nodes.split_gpus(0, 0)


def test_a_nodes_processes_see_only_its_gpus_through_our_own_visible_devices() -> None:
    node = nodes.LocalNode("node-1", (2, 3))
    assert nodes.cuda_visible_devices(node, None) == "2,3"
    assert nodes.cuda_visible_devices(node, "GPU-a,GPU-b,GPU-c,GPU-d") == "GPU-c,GPU-d"


def test_a_workflow_that_fits_one_node_is_spread_round_robin_on_the_host_backend() -> None:
    traffic = load_workflow(EXAMPLES / "traffic" / "workflow.yaml")
    two = nodes.split_gpus(2, 0)
    assert {p.node for p in nodes.place_on_local_nodes(traffic, two, mode="cost").values()} == {"node-0"}
    spread = nodes.place_on_local_nodes(traffic, two, mode="spread")
    assert [spread[f.name].node for f in traffic.functions] == ["node-0", "node-1", "node-0", "node-1", "node-0"]
    assert all(p.device is None for p in spread.values())


def _gpu(index: int, memory_bytes: int) -> topology.Gpu:
    return topology.Gpu(index=index, uuid=f"GPU-{index}", name="test", memory_bytes=memory_bytes,
                        pcie_bus_id=f"0000:{index + 1:02x}:00.0", pcie_generation=5, pcie_width=16,
                        pcie_bandwidth_bytes_per_s=64e9)


def test_a_placement_that_uses_every_node_is_kept_with_devices_numbered_per_node() -> None:
    traffic = load_workflow(EXAMPLES / "traffic" / "workflow.yaml")
    # Two GPUs of 24 GiB: its GPU functions reserve 2 x (2 + 8 + 8) GiB, so no one GPU holds them.
    machine = topology.NodeTopology(name="here", gpus=(_gpu(0, 24 * GiB), _gpu(1, 24 * GiB)))
    two = nodes.split_gpus(2, 2)
    placed = nodes.place_on_local_nodes(traffic, two, mode="spread", machine=machine, cuda_of={0: 0, 1: 1})
    assert {p.node for p in placed.values()} == {"node-0", "node-1"}
    for fn in traffic.functions:       # each node sees one GPU: ordinal 0 there
        assert placed[fn.name].device == (0 if fn.gpu else None)


@pytest.mark.parametrize(("argv", "message"), [
    (["--nodes", "0"], "--nodes: must be at least 1, got 0"),
    (["--nodes", "-2"], "--nodes: must be at least 1, got -2"),
    (["--node-placement", "cost"], "--node-placement has no effect without --nodes 2 or more"),
])
def test_bad_node_flags_are_refused_before_anything_starts(argv: list[str], message: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([str(FIXTURE), *argv]) == 2
    assert message in capsys.readouterr().err


class _Recorder:
    def __init__(self, name: str) -> None:
        self.name, self.freed = name, []

    def free(self, ref: str) -> None:
        self.freed.append(ref)


async def test_the_gateway_frees_each_object_on_the_node_that_holds_it() -> None:
    home, other = _Recorder("node-0"), _Recorder("node-1")
    store = ClientStore(home, others={"node-1": other})
    refs = [protocol.new_ref("node-0"), protocol.new_ref("node-1"), protocol.new_ref(None), protocol.new_ref("node-9")]
    await store.discard(refs)
    store.close()
    assert home.freed == [refs[0], refs[2], refs[3]] and other.freed == [refs[1]]


# --- real processes -----------------------------------------------------------------------------

pytest.importorskip("nixl_cu13", reason="NIXL not installed (make setup installs it)")


async def _outputs(workflow_path: Path, *, node_count: int, inputs: list[np.ndarray]) -> list[np.ndarray]:
    workflow = load_workflow(workflow_path)
    options = LocalOptions(backend="host", nodes=node_count, autoscale=False)
    async with LocalRuntime(workflow, options) as rt, aiohttp.ClientSession() as http:
        if node_count > 1:
            assert len({p.node for p in rt.placed.values()}) == node_count
        got = []
        for value in inputs:
            async with http.post(f"{rt.url}/invoke", data=_npy(value)) as response:
                body = await response.read()
                assert response.status == 200, body
                got.append(np.load(io.BytesIO(body), allow_pickle=False))
        await rt.drain()
        for node in [n.name for n in rt.nodes] or [None]:       # nothing left on any node
            stats = rt.pool_stats(node)
            assert stats["objects"] == 0 and all(p["used_bytes"] == 0 for p in stats["pools"]), (node, stats)
    return got


@pytest.mark.slow
@pytest.mark.parametrize("name", ["traffic", "driving", "image", "video"])
async def test_an_example_over_two_nodes_answers_as_on_one(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAASTUBE_EXAMPLE_BACKEND", "numpy")
    monkeypatch.setenv("FAASTUBE_EXAMPLE_SCALE", "0.02")  # small: four runtimes start
    workflow = load_workflow(EXAMPLES / name / "workflow.yaml")
    first = cli.request_input(workflow, None)
    inputs = [first, np.ascontiguousarray(first[::-1])]      # two different requests
    one = await _outputs(EXAMPLES / name / "workflow.yaml", node_count=1, inputs=inputs)
    two = await _outputs(EXAMPLES / name / "workflow.yaml", node_count=2, inputs=inputs)
    for a, b in zip(one, two, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.slow
def test_faastube_run_over_two_nodes_says_where_each_function_runs(tmp_path: Path) -> None:
    request = tmp_path / "x.npy"
    np.save(request, np.arange(4, dtype=np.float64))
    done = subprocess.run(
        [sys.executable, "-m", "faastube.cli", "run", str(FIXTURE), "--nodes", "2", "--requests", "3",
         "--backend", "host", "--input", str(request), "--json", str(tmp_path / "run.json")],
        capture_output=True, text=True, timeout=120, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "2 nodes (spread placement); each function runs on:" in out
    for function, node in (("split", "node-0"), ("far", "node-1"), ("slow", "node-0"), ("join", "node-1")):
        assert any(line.split() == [function, node] for line in out.splitlines()), out
    assert "3/3 ok" in out
    assert '"far": "node-1"' in (tmp_path / "run.json").read_text()


@pytest.mark.slow
async def test_a_node_gone_before_its_output_is_read_makes_the_gateway_start_the_request_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODESTEST_SLOW_S", "3.0")
    retries = 2
    options = LocalOptions(backend="host", nodes=3, autoscale=False, gateway=GatewayConfig(
        policy=dag.DagPolicy(request_timeout_s=60, call_timeout_s=30, max_retries=retries)))
    async with LocalRuntime(load_workflow(FIXTURE), options) as rt, aiohttp.ClientSession() as http:
        where: Mapping[str, str] = {name: p.node for name, p in rt.placed.items()}
        assert where == {"split": "node-0", "far": "node-1", "slow": "node-2", "join": "node-0"}
        async with http.post(f"{rt.url}/invoke", data=_npy(np.array([1.0, 2.0]))) as response:
            assert response.status == 200
            assert np.load(io.BytesIO(await response.read())).tolist() == [10.0, 15.0]  # (x+1)*2 + (x+1)*3

        async def kill_far_node() -> None:      # while slow sleeps, far's output waits on node-1
            await asyncio.sleep(1.5)
            os.kill(rt.sidecar_pid("node-1"), signal.SIGKILL)

        killer = asyncio.ensure_future(kill_far_node())
        async with http.post(f"{rt.url}/invoke", data=_npy(np.array([7.0, 1.0]))) as response:
            status, doc = response.status, await response.json()
        await killer
        async with http.get(f"{rt.url}/metrics") as response:
            metrics = await response.text()
    if rt.logs_kept is not None:        # node-1 was killed on purpose: its exit is no failure to keep
        shutil.rmtree(rt.logs_kept, ignore_errors=True)
    # join's input died with node-1: retrying join can't help, so the request started over;
    # far runs on node-1, whose sidecar is gone, so the second attempt fails there.
    assert 'faastube_gateway_requests_total{outcome="restarted",workflow="nodestest"} 1.0' in metrics, metrics
    assert status == 502, doc
    message = doc["message"]
    assert "function 'far' failed" in message, message
