"""Tenancy, tried as an attacker would: one workflow's memory is never another's to read, change or inherit.

Workflow `b` is an ordinary user of the client library; workflow `a` speaks the protocol by
hand, keeps every descriptor the sidecar hands it and reads whole segments behind them.
Host backend (shared memory), real sidecar processes.
"""

from __future__ import annotations

import mmap
import os
import time

import faastube.client as ftc
import numpy as np
import pytest
from faastube import errors, protocol
from raw_client import RawClient, memfd_identity, read_all

SECRET = b"B-SECRET-" * 7


def _secret_array(n: int = 1 << 16) -> np.ndarray:
    reps = n // len(SECRET) + 1
    return np.frombuffer((SECRET * reps)[:n], dtype=np.uint8).copy()


def _publish(raw: RawClient, nbytes: int, fill: bytes | None = None) -> tuple[str, int]:
    """Lease an arena by hand, optionally write into it, publish one object at offset 0."""
    kind, reply, fds = raw.call({"op": "arena", "location": "host", "nbytes": nbytes})
    assert kind is protocol.Kind.REPLY, reply
    slab = reply["arena"]["slab"]
    if fill is not None:
        m = mmap.mmap(fds[0], nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        m[:len(fill)] = fill
        m.close()
    ref = protocol.new_ref()
    kind, reply, _ = raw.call({"op": "publish", "ref": ref, "slab": slab, "offset": 0, "nbytes": nbytes,
                               "dtype": "|u1", "shape": [nbytes]})
    assert kind is protocol.Kind.REPLY, reply
    return ref, slab


def test_a_workflow_is_never_handed_memory_that_holds_another_workflows_bytes(make_sidecar) -> None:
    sc = make_sidecar("--host-arena", "1Mi", "--host-slab", "1Mi")
    with ftc.connect(sc.socket_path, workflow="b", function="producer") as b, \
            ftc.connect(sc.socket_path, workflow="b", function="consumer") as b2:
        refs = [b.put(_secret_array(), consumers=2) for _ in range(5)]
        assert bytes(b2.get(refs[0], device="cpu")[:len(SECRET)]) == SECRET
        b_fds = RawClient(sc.socket_path, workflow="b", function="spy")
        b_fds.call({"op": "get", "ref": refs[0], "location": "host"})
        b_segments = {memfd_identity(fd) for fd in b_fds.fds}
        a = RawClient(sc.socket_path, workflow="a")
        try:
            for _ in range(4):
                _publish(a, 1 << 20)
            for ref in refs:
                kind, reply, _ = a.call({"op": "get", "ref": ref, "location": "host"})
                assert kind is protocol.Kind.ERROR and reply["code"] == protocol.ErrorCode.PERMISSION_DENIED
                assert "workflow default/b" in reply["message"]
            assert a.fds, "a got its own memory"
            assert not {memfd_identity(fd) for fd in a.fds} & b_segments, "a holds a descriptor of b's memory"
            for fd in a.fds:
                assert SECRET not in read_all(fd)
        finally:
            a.close()
            b_fds.close()


def test_another_workflow_cannot_publish_into_free_or_change_an_object(make_sidecar) -> None:
    sc = make_sidecar()
    with ftc.connect(sc.socket_path, workflow="b") as b:
        ref = b.put(_secret_array(4096))
        a = RawClient(sc.socket_path, workflow="a")
        try:
            own_ref, own_slab = _publish(a, 4096)
            b_slabs = [slab for slab in range(1, 64) if slab != own_slab]
            for slab in b_slabs:   # every other slab id there may be: none is a's arena
                kind, reply, _ = a.call({"op": "publish", "ref": protocol.new_ref(), "slab": slab, "offset": 0,
                                         "nbytes": 8, "dtype": "|u1", "shape": [8]})
                assert kind is protocol.Kind.ERROR and "not an arena of this client" in reply["message"]
            for op in ("free", "stat"):
                kind, reply, _ = a.call({"op": op, "ref": ref})
                assert kind is protocol.Kind.ERROR and reply["code"] == protocol.ErrorCode.PERMISSION_DENIED
            kind, reply, _ = a.call({"op": "release", "refs": [ref]})
            assert kind is protocol.Kind.REPLY      # nothing held, nothing ended
        finally:
            a.close()
        assert bytes(b.get(ref, device="cpu", copy=True)[:len(SECRET)]) == SECRET
        assert b.stat(ref).consumers_left is None


def test_readers_map_host_objects_read_only_and_cannot_reopen_them_for_writing(make_sidecar) -> None:
    sc = make_sidecar()
    with ftc.connect(sc.socket_path, workflow="b", function="producer") as b:
        ref = b.put(_secret_array(4096))
        reader = RawClient(sc.socket_path, workflow="b", function="curious-reader")
        try:
            kind, reply, fds = reader.call({"op": "get", "ref": ref, "location": "host"})
            assert kind is protocol.Kind.REPLY and reply["slab"]["writable"] is False and len(fds) == 1
            fd = fds[0]
            with pytest.raises(PermissionError):
                mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # Reopening through /proc gets a read-write description, but the segment is sealed.
            rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                with pytest.raises(PermissionError):
                    mmap.mmap(rw, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                with pytest.raises(PermissionError):
                    os.pwrite(rw, b"PWNED", 0)
            finally:
                os.close(rw)
        finally:
            reader.close()
        view = ftc.connect(sc.socket_path, workflow="b").get(ref, device="cpu")
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view[0] = 1
        assert bytes(view[:len(SECRET)]) == SECRET


def test_freed_memory_never_reaches_another_workflow_with_old_bytes(make_sidecar) -> None:
    sc = make_sidecar("--host-arena", "1Mi", "--host-slab", "1Mi", "--idle-release", "100ms",
                      "--host-pool-max", "8Mi", "--host-quota", "8Mi")
    b = ftc.connect(sc.socket_path, workflow="b")
    refs = [b.put(_secret_array(1 << 19)) for _ in range(12)]
    for ref in refs:
        b.free(ref)
    b.close()
    time.sleep(1.0)                     # b's slabs idle past --idle-release: retired and destroyed
    a = RawClient(sc.socket_path, workflow="a")
    try:
        for _ in range(8):              # the whole pool, in a's hands now
            ref, _ = _publish(a, 1 << 20)
            kind, reply, fds = a.call({"op": "get", "ref": ref, "location": "host"})
            assert kind is protocol.Kind.REPLY
        for fd in a.fds:
            data = read_all(fd)
            assert SECRET not in data and data.count(0) == len(data), "fresh memory reads as zeros"
    finally:
        a.close()


def test_one_workflow_over_its_quota_does_not_starve_another(make_sidecar) -> None:
    sc = make_sidecar("--host-pool-max", "8Mi", "--host-quota", "4Mi", "--host-arena", "1Mi")
    with ftc.connect(sc.socket_path, workflow="greedy") as greedy, ftc.connect(sc.socket_path, workflow="b") as b:
        held = []
        with pytest.raises(errors.OutOfPoolMemory, match="greedy.*over its quota"):
            for _ in range(100):
                held.append(greedy.put(np.zeros(1 << 20, np.uint8)))
        assert 2 <= len(held) <= 4
        for _ in range(3):
            b.put(np.ones(1 << 20, np.uint8))   # b still has its own share
        assert b.stats()["domain_reserved_bytes"]["host"] <= 4 << 20
    assert sc.alive()


def test_the_socket_carries_no_other_workflows_refs_in_errors(make_sidecar) -> None:
    sc = make_sidecar()
    with ftc.connect(sc.socket_path, workflow="b") as b, ftc.connect(sc.socket_path, workflow="a") as a:
        ref = b.put(np.arange(10))
        with pytest.raises(errors.PermissionDenied) as caught:
            a.get(ref, device="cpu")
        assert "SECRET" not in str(caught.value)
        with pytest.raises(errors.InvalidRequest, match="no open read"):
            a.release(ref)
