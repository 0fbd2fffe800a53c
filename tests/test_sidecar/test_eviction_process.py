"""Eviction through a real sidecar process and real clients (host backend, simulated GPUs).

`--simulated-gpus 2` gives the sidecar two GPU locations made of shared memory, and
`--simulated-gpu-busy` has "another process" hold most of each: the pools' cap is half
of what is left, so a producer that keeps putting fills its GPU and objects must move.
"""

from __future__ import annotations

import re
import time
import urllib.request

import faastube.client as ftc
import numpy as np
import pytest
from faastube import errors
from ports import free_port

MiB = 1 << 20
PRESSURE = ("--simulated-gpus", "2", "--simulated-gpu-memory", "64Mi", "--simulated-gpu-busy", "48Mi",
            "--gpu-pool-max", "64Mi", "--gpu-arena", "4Mi", "--gpu-slab", "2Mi", "--memory-policy", "elastic+eviction",
            "--pool-floor", "0", "--evict-wait", "1s")


def _put(c: ftc.Client, value: int, *, nbytes: int = 2 * MiB, **kw: int) -> str:
    w = c.empty((nbytes,), np.uint8, device=0)
    w.array[...] = value
    return c.seal(w, **kw)


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_producer_that_fills_its_gpu_keeps_going_and_every_object_reads_back(make_sidecar) -> None:
    port = free_port()
    side = make_sidecar(*PRESSURE, "--metrics-port", str(port))
    with ftc.connect(side.socket_path, workflow="wf", function="producer") as p, \
            ftc.connect(side.socket_path, workflow="wf", function="consumer") as r:
        assert p.gpu_indices == {0: 0, 1: 1}, "simulated GPU i is every client's ordinal i"
        refs = []
        for i in range(8):                      # 16 MiB of objects into a GPU capped at 8 MiB
            refs.append(_put(p, i, consumers=1, ttl=600))
            p.hint({ref: position for position, ref in enumerate(refs)})
        states = {ref: p.stat(ref) for ref in refs}
        away = [ref for ref, info in states.items() if "gpu:0" not in info.locations]
        assert away and all(states[ref].state == "evicted" for ref in away)
        assert refs[-1] not in away, "the newest put is where it was written"
        paths = {}
        for i, ref in enumerate(refs):
            data = r.get(ref, device=0, copy=True)
            assert data.shape == (2 * MiB,) and int(data[0]) == i and int(data[-1]) == i
            paths[ref] = r.last_path
        assert {paths[ref] for ref in away} <= {"restore", "local"}
        assert "restore" in {paths[ref] for ref in away}, "an evicted object came back for its reader"
    time.sleep(0.7)   # the metrics snapshot refreshes every 0.5 s
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert _metric(text, "faastube_evictions_total", gpu="0") >= len(away)
    assert _metric(text, "faastube_evictions_total", order="queue") >= 1, "the hints were used"
    assert _metric(text, "faastube_transfer_bytes_total", path="restore") > 0
    assert _metric(text, "faastube_pool_cap_bytes", gpu="0") == 8 * MiB
    assert re.search(r'faastube_memory_policy_info\{policy="elastic\+eviction"\} 1\.0', text)


def test_another_workflow_cannot_read_an_object_its_owner_had_evicted(make_sidecar) -> None:
    side = make_sidecar(*PRESSURE)
    with ftc.connect(side.socket_path, workflow="wf", function="producer") as p, \
            ftc.connect(side.socket_path, workflow="other", function="thief") as thief:
        refs = [_put(p, i, ttl=600) for i in range(8)]
        away = [ref for ref in refs if "gpu:0" not in p.stat(ref).locations]
        assert away
        for ref in away:
            for device in ("cpu", 0, 1):
                with pytest.raises(errors.PermissionDenied):
                    thief.get(ref, device=device)
        thief.hint({ref: 0 for ref in away})    # ignored: not its objects
        thief.ping()
        assert all(p.stat(ref).state == "evicted" for ref in away)


def test_the_static_policy_fails_the_put_as_before(make_sidecar) -> None:
    side = make_sidecar("--simulated-gpus", "1", "--gpu-pool-max", "8Mi", "--gpu-quota", "8Mi", "--gpu-arena", "4Mi",
                        "--memory-policy", "static")
    with ftc.connect(side.socket_path, workflow="wf", function="producer") as p:
        for i in range(4):
            _put(p, i, ttl=600)
        with pytest.raises(errors.OutOfPoolMemory):
            _put(p, 9, ttl=600)
