"""NVML health on a real GPU node (skipped where NVML or GPUs are missing)."""

from __future__ import annotations

import pytest

pynvml = pytest.importorskip("pynvml")

from faastube_sidecar.gpuhealth import HealthMonitor, NvmlHealthSource

pytestmark = pytest.mark.gpu


@pytest.fixture
def uuids() -> list[str]:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"NVML unavailable: {e}")
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            pytest.skip("no GPUs")
        return [str(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
    finally:
        pynvml.nvmlShutdown()


def test_every_visible_gpu_is_healthy_with_its_free_memory(uuids):
    source = NvmlHealthSource()
    try:
        reports = source.poll(uuids, timeout_s=0.2)
    finally:
        source.close()
    assert set(reports) == set(uuids)
    for uuid in uuids:
        assert reports[uuid].healthy, reports[uuid].reason
        assert reports[uuid].free_memory_bytes is not None and reports[uuid].free_memory_bytes > 0


def test_a_gpu_nvml_cannot_find_is_unhealthy(uuids):
    missing = "GPU-00000000-0000-0000-0000-000000000000"
    source = NvmlHealthSource()
    try:
        reports = source.poll([uuids[0], missing], timeout_s=0.1)
    finally:
        source.close()
    assert reports[uuids[0]].healthy
    assert not reports[missing].healthy
    assert "NVML cannot reach the GPU" in reports[missing].reason


async def test_the_monitor_reports_nvml_health(uuids):
    monitor = HealthMonitor(NvmlHealthSource(), uuids, interval_s=0.5)
    await monitor.start()
    try:
        assert all(h.healthy for h in monitor.current().values())
    finally:
        await monitor.stop()
