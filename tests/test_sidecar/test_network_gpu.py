"""Cross-node passing between two CUDA sidecars, a GPU each (two "nodes" on one machine;
skipped without a GPU or NIXL). The CPU tests (test_network_process.py) cover the rules;
these check that VRAM lent by one sidecar lands in the other's GPU pool, bytes intact,
on the path ``network``, with nothing left behind.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
pytest.importorskip("nixl_cu13", reason="NIXL not installed (make setup installs it)")
try:
    GPUS = cp.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no driver
    GPUS = 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")]

import faastube.client as ftc
from ports import free_port
from sidecar_process import SidecarProcess

MiB = 1 << 20


@pytest.fixture
def two_nodes() -> Iterator[dict[str, tuple[SidecarProcess, int]]]:
    """node-a on GPU 0, node-b on GPU 1 (GPU 0 too on a one-GPU machine): (sidecar, CUDA ordinal)."""
    base = Path(tempfile.mkdtemp(prefix="ft-", dir="/tmp"))
    secret = base / "secret"
    secret.write_text(secrets.token_hex(32))
    ports = {"node-a": free_port(), "node-b": free_port()}
    gpus = {"node-a": 0, "node-b": 1 if GPUS > 1 else 0}
    started: dict[str, tuple[SidecarProcess, int]] = {}
    try:
        for node, port in ports.items():
            other = next(n for n in ports if n != node)
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpus[node]))
            started[node] = (SidecarProcess(base / node / "faastube.sock", "--node-name", node, "--peer-port", str(port),
                                            "--peer-host", "127.0.0.1", "--peer-secret-file", str(secret),
                                            f"--peer={other}=127.0.0.1:{ports[other]}", "--gpu-pool-max", "4Gi",
                                            backend="cuda", env=env), gpus[node])
        yield started
    finally:
        for proc, _ in started.values():
            proc.stop()


@pytest.mark.parametrize("nbytes", [1 * MiB, 64 * MiB, 256 * MiB + 4096])
def test_vram_put_on_one_node_lands_in_the_other_nodes_gpu_pool(two_nodes, nbytes: int) -> None:
    (a_proc, a_gpu), (b_proc, b_gpu) = two_nodes["node-a"], two_nodes["node-b"]
    with ftc.connect(a_proc.socket_path, workflow="w", function="producer") as a, \
            ftc.connect(b_proc.socket_path, workflow="w", function="consumer") as b:
        with cp.cuda.Device(a_gpu):
            value = cp.random.default_rng(1).integers(0, 255, size=nbytes, dtype=cp.uint8)
            ref = a.put(value)
            expected = cp.asnumpy(value)
        with cp.cuda.Device(b_gpu):
            got = b.get(ref, device=b_gpu)
            assert b.last_path == "network"
            assert isinstance(got, cp.ndarray) and got.device.id == b_gpu
            assert np.array_equal(cp.asnumpy(got), expected)
            del got
            b.release(ref)
        assert sum(p["used_bytes"] for p in b.stats()["pools"]) == 0
    assert a_proc.alive() and b_proc.alive()
