"""Eviction and restore on real GPUs: a real CUDA sidecar, real clients (skipped without a GPU).

The CPU tests (test_eviction_dataplane.py, test_eviction_process.py) cover the policy's
decisions on simulated GPUs; these check the real moves: a peer copy into the same
workflow's pool on another GPU, a copy to pinned host memory through the transfer
engine, the copy back for a reader on the object's GPU (bytes intact, path ``restore``),
the reader rule and tenancy, and the cap following NVML's free memory.
"""

from __future__ import annotations

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

MiB = 1 << 20
OBJECT = 64 * MiB
# Eight 64 MiB objects fill a GPU's pools; the cap (half the GPU's free memory) is far above. A read that
# needs room waits for an idle writer to unmap an arena it had (its client asks once a second): 5 s.
FLAGS = ("--gpu-pool-max", "512Mi", "--gpu-quota", "512Mi", "--gpu-arena", "64Mi", "--gpu-slab", "64Mi",
         "--memory-policy", "elastic+eviction", "--pool-floor", "0", "--evict-wait", "5s")


def _put(c: ftc.Client, value: int, device: int = 0, **kw) -> str:
    with cp.cuda.Device(device):
        return c.put(cp.full((OBJECT,), value, dtype=cp.uint8), ttl=600, **kw)


def _check(view, value: int) -> None:
    assert int(view[0]) == value and int(view[-1]) == value and bool(cp.all(view[:: 1 << 16] == value))


def _fill_gpu(c: ftc.Client, device: int, *, start: int = 0, count: int = 8) -> list[str]:
    refs = []
    for i in range(count):
        refs.append(_put(c, start + i, device))
        c.hint({ref: position for position, ref in enumerate(refs)})
    return refs


def test_a_full_gpu_moves_the_object_read_last_to_a_peer_gpu_and_a_reader_gets_it_back(make_sidecar) -> None:
    if GPUS < 2:
        pytest.skip("needs two GPUs")
    sc = make_sidecar(*FLAGS, backend="cuda")
    with ftc.connect(sc.socket_path, workflow="w", function="producer") as p, \
            ftc.connect(sc.socket_path, workflow="w", function="consumer") as r:
        refs = _fill_gpu(p, 0, count=9)          # the ninth does not fit
        away = [ref for ref in refs if "gpu:0" not in p.stat(ref).locations]
        assert away == [refs[7]], "position 7 was read furthest back when the ninth came"
        assert p.stat(refs[7]).locations == ("gpu:1",) and p.stat(refs[7]).state == "evicted"
        for i, ref in enumerate(refs):
            view = r.get(ref, device=0)
            _check(view, i)
            assert r.last_path == ("restore" if ref == refs[7] else "local")
            del view
            r.release(ref)
        stats = p.stats()["memory"]
        assert stats["evictions_by_order"]["queue"] >= 1 and stats["restores"]["read"] >= 1
    assert sc.alive()


def test_with_no_peer_room_objects_go_to_pinned_host_memory_and_come_back_over_pcie(make_sidecar) -> None:
    sc = make_sidecar(*FLAGS, backend="cuda")
    with ftc.connect(sc.socket_path, workflow="w", function="producer") as p, \
            ftc.connect(sc.socket_path, workflow="w", function="consumer") as r:
        for other in range(1, GPUS):              # every peer as full as GPU 0 will be
            _fill_gpu(p, other, start=100, count=8)
        refs = _fill_gpu(p, 0, count=10)
        away = [ref for ref in refs if "gpu:0" not in p.stat(ref).locations]
        assert len(away) == 2 and all(p.stat(ref).locations == ("host",) for ref in away)
        host = r.get(away[0], device="cpu")     # a CPU reader reads the evicted copy where it is
        assert isinstance(host, np.ndarray) and int(host[0]) == refs.index(away[0])
        assert r.last_path == "local"
        del host
        r.release(away[0])
        for ref in away:
            view = r.get(ref, device=0)
            _check(view, refs.index(ref))
            assert r.last_path == "restore"
            del view
            r.release(ref)
    assert sc.alive()


def test_objects_being_read_never_move_and_then_a_put_waits_and_fails(make_sidecar) -> None:
    sc = make_sidecar(*FLAGS[:-2], "--evict-wait", "500ms", backend="cuda")
    with ftc.connect(sc.socket_path, workflow="w", function="producer") as p, \
            ftc.connect(sc.socket_path, workflow="w", function="consumer") as r:
        refs = _fill_gpu(p, 0, count=8)
        views = [r.get(ref, device=0) for ref in refs]      # every object is being read
        with pytest.raises(errors.OutOfPoolMemory):
            _put(p, 99)
        assert all(p.stat(ref).locations == ("gpu:0",) for ref in refs)
        for i, view in enumerate(views):
            _check(view, i)
        del views
        r.flush()
        _put(p, 99)                                          # the reads ended: something could go
    assert sc.alive()


def test_another_workflow_can_read_nothing_its_neighbour_had_evicted(make_sidecar) -> None:
    sc = make_sidecar(*FLAGS, backend="cuda")
    with ftc.connect(sc.socket_path, workflow="w", function="producer") as p, \
            ftc.connect(sc.socket_path, workflow="x", function="thief") as thief:
        refs = _fill_gpu(p, 0, count=9)
        away = [ref for ref in refs if "gpu:0" not in p.stat(ref).locations]
        assert away
        for device in ["cpu", *range(GPUS)]:
            with pytest.raises(errors.PermissionDenied):
                thief.get(away[0], device=device)
        thief.hint({ref: 0 for ref in refs})     # ignored: not its objects
        thief.ping()
        assert p.stat(away[0]).state == "evicted"


def test_the_cap_follows_the_gpus_free_memory_read_through_nvml(make_sidecar) -> None:
    sc = make_sidecar("--gpu-pool-max", "512Gi", "--gpu-quota", "512Gi", "--memory-policy", "elastic", "--pool-cap-share", "0.5", backend="cuda")
    with ftc.connect(sc.socket_path, workflow="w") as c:
        time.sleep(1.2)                           # two sweeps
        before = c.stats()["memory"]["caps"]["gpu:0"]
        free, total = cp.cuda.runtime.memGetInfo()
        assert 0.3 * free <= before <= 0.55 * total
        with cp.cuda.Device(0):
            hog = cp.empty((int(free * 0.6),), dtype=cp.uint8)   # a model loads next to the sidecar
        time.sleep(1.2)
        after = c.stats()["memory"]["caps"]["gpu:0"]
        assert after < before * 0.7, (before, after)
        del hog
        cp.get_default_memory_pool().free_all_blocks()
        time.sleep(1.2)
        assert c.stats()["memory"]["caps"]["gpu:0"] > after
