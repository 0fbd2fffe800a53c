"""The CUDA backend end to end: real sidecar, real client processes, real GPUs (skipped without one)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
try:
    GPUS = cp.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no driver
    GPUS = 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")]

import faastube.client as ftc
from faastube import errors


@pytest.fixture
def cuda_sidecar(make_sidecar):
    return make_sidecar("--gpu-slab", "256Mi", "--gpu-pool-max", "4Gi", backend="cuda")


def test_same_gpu_put_and_get_is_zero_copy(cuda_sidecar) -> None:
    with ftc.connect(cuda_sidecar.socket_path) as p, ftc.connect(cuda_sidecar.socket_path) as r:
        a = cp.random.random((256, 1024), dtype=cp.float32)
        ref = p.put(a)
        b = r.get(ref, device=0)
        assert isinstance(b, cp.ndarray) and r.last_path == "local"
        assert bool(cp.all(a == b))
        w = p.empty((1024,), cp.int32, device=0)
        w.array[...] = cp.arange(1024, dtype=cp.int32)
        ref2 = p.seal(w)
        view = r.get(ref2, device=0)
        w.array[0] = 77                       # same memory: the reader sees the writer's bytes
        cp.cuda.Device(0).synchronize()
        assert int(view[0]) == 77


def test_host_data_reaches_the_gpu_and_gpu_data_reaches_the_host(cuda_sidecar) -> None:
    with ftc.connect(cuda_sidecar.socket_path) as c:
        h = np.random.default_rng(0).random(1 << 20)
        ref = c.put(h)
        g = c.get(ref, device=0)
        assert c.last_path == "h2d" and isinstance(g, cp.ndarray)
        assert np.array_equal(cp.asnumpy(g), h)
        ref2 = c.put(cp.arange(1 << 20, dtype=cp.float64))
        back = c.get(ref2, device="cpu")
        assert c.last_path == "d2h" and isinstance(back, np.ndarray)
        assert np.array_equal(back, np.arange(1 << 20, dtype=np.float64))


@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
def test_another_gpu_gets_a_peer_copy_over_nvlink_once(cuda_sidecar) -> None:
    with ftc.connect(cuda_sidecar.socket_path) as c:
        a = cp.random.random(10_000_000, dtype=cp.float32)
        ref = c.put(a)
        with cp.cuda.Device(1):
            b = c.get(ref, device=1)
            assert b.device.id == 1
            assert c.last_path in ("nvlink", "pcie")
            assert bool(cp.all(b == cp.asarray(a)))
        c.get(ref, device=1)
        assert c.last_path == "local", "the replica on GPU 1 is reused: data crosses once"
        assert set(c.stat(ref).locations) == {"gpu:0", "gpu:1"}


def test_torch_cuda_tensors_go_in_and_come_out_without_host_copies(cuda_sidecar) -> None:
    torch = pytest.importorskip("torch")
    with ftc.connect(cuda_sidecar.socket_path) as c:
        t = torch.arange(4096, device="cuda:0", dtype=torch.float16)
        ref = c.put(t)
        out = torch.from_dlpack(c.get(ref, device=0))
        assert out.is_cuda and torch.equal(out, t)


def _crashing_client(path: str, seed: int) -> None:
    c = ftc.connect(path, workflow="crash")
    c.empty((1 << 20,), np.float32, device=0)
    ref = c.put(cp.ones(1 << 18, cp.float32), ttl=0.5)
    c.get(ref, device=0)
    os.kill(os.getpid(), signal.SIGKILL)


def test_crashed_gpu_clients_give_their_pool_memory_back(cuda_sidecar) -> None:
    path = str(cuda_sidecar.socket_path)
    with ftc.connect(path, workflow="crash") as c:
        base = {p["location"]: p["used_bytes"] for p in c.stats()["pools"]}
        ctx = mp.get_context("spawn")
        for seed in range(6):
            proc = ctx.Process(target=_crashing_client, args=(path, seed))
            proc.start()
            proc.join(120)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = {p["location"]: p["used_bytes"] for p in c.stats()["pools"]}
            if now == base:
                break
            time.sleep(0.2)
        assert now == base
    assert cuda_sidecar.alive()


def test_out_of_pool_memory_on_a_gpu_is_an_error_not_a_crash(make_sidecar) -> None:
    sc = make_sidecar("--gpu-slab", "64Mi", "--gpu-pool-max", "128Mi", backend="cuda")
    with ftc.connect(sc.socket_path) as c:
        with pytest.raises(errors.OutOfPoolMemory):
            c.empty((200 << 20,), np.uint8, device=0)
        c.ping()
    assert sc.alive()
