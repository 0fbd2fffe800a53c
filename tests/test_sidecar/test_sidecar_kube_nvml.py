"""The Kubernetes wiring's GPU half on a real GPU node: NVML topology, NVML health shared
by the pieces, and CUDA ordinals that match NVML indices (the pools' ``gpu:N``).

Needs neither grpcio nor the kubernetes client (GPU machines may lack both); skipped
where NVML or GPUs are missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pynvml = pytest.importorskip("pynvml")

from faastube_sidecar.kube import KubernetesPieces, KubeSettings, resolve_topology

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_count() -> int:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"NVML unavailable: {e}")
    try:
        count = int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()
    if count == 0:
        pytest.skip("no GPUs")
    return count


@pytest.fixture
def restore_cuda_order():
    before = os.environ.get("CUDA_DEVICE_ORDER")
    yield
    if before is None:
        os.environ.pop("CUDA_DEVICE_ORDER", None)
    else:
        os.environ["CUDA_DEVICE_ORDER"] = before


def test_discovered_topology_takes_the_node_name_and_sharing_slots(gpu_count, restore_cuda_order):
    node = resolve_topology(KubeSettings(device_plugin=True, sharing_slots=3), node_name="gpu-node-1")
    assert node.name == "gpu-node-1"
    assert len(node.gpus) == gpu_count
    assert {g.sharing_slots for g in node.gpus} == {3}
    assert all(g.uuid.startswith("GPU-") for g in node.gpus)
    assert os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"


def test_cuda_ordinals_match_nvml_indices_under_the_order_the_sidecar_sets(gpu_count, restore_cuda_order):
    pytest.importorskip("cupy")
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        pytest.skip("CUDA_VISIBLE_DEVICES renumbers devices on purpose")
    node = resolve_topology(KubeSettings(publish_node=True), node_name="gpu-node-1")
    code = ("import json, cupy; print(json.dumps([cupy.cuda.Device(i).pci_bus_id "
            "for i in range(cupy.cuda.runtime.getDeviceCount())]))")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert done.returncode == 0, done.stderr
    cuda_bus_ids = [b.lower()[-12:] for b in json.loads(done.stdout)]
    assert cuda_bus_ids == [g.pcie_bus_id.lower()[-12:] for g in node.gpus]


async def test_nvml_health_is_shared_and_stops_promptly(gpu_count, restore_cuda_order, tmp_path: Path):
    settings = KubeSettings(health_interval_s=0.5)
    node = resolve_topology(KubeSettings(device_plugin=True), node_name="gpu-node-1")
    pieces = KubernetesPieces(settings, node=node, client=None, node_name="gpu-node-1")

    class NoPools:  # no data plane needed: only health is started here
        def __init__(self):
            self.pools = {}

        def pool_stats(self):
            return []

    await pieces.start(NoPools(), socket_path=tmp_path / "s.sock", gpu_limit_bytes=1 << 30)
    try:
        assert pieces.health is not None
        states = pieces.health.current()
        assert set(states) == {g.uuid for g in node.gpus}
        assert all(s.healthy and (s.free_memory_bytes or 0) > 0 for s in states.values())
    finally:
        started = time.monotonic()
        await pieces.stop()
        stop_s = time.monotonic() - started
    pieces.close()
    assert pieces.health is None
    assert stop_s < settings.health_interval_s + 1.5
