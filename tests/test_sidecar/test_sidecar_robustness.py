"""Bad input and crashed clients: the sidecar keeps serving and gives everything back."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time

import faastube.client as ftc
import numpy as np
from faastube import protocol
from raw_client import connect_raw as _raw
from raw_client import read_frame as _read_reply


def _assert_serving(path) -> None:
    with ftc.connect(path) as c:
        a = np.arange(100)
        assert np.array_equal(c.get(c.put(a), copy=True), a)


def test_thousands_of_random_frames_leave_the_sidecar_serving(sidecar) -> None:
    rng = random.Random(1234)
    for _ in range(1500):
        s = _raw(sidecar.socket_path)
        try:
            s.sendall(rng.randbytes(rng.randint(1, 200)))
            s.shutdown(socket.SHUT_WR)
            _read_reply(s)   # an error reply or a hang-up, never a hung or dead sidecar
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            s.close()
    assert sidecar.alive()
    _assert_serving(sidecar.socket_path)


def test_truncated_frames_and_mid_frame_hangups_are_survived(sidecar) -> None:
    rng = random.Random(99)
    frame = protocol.encode(protocol.Kind.REQUEST, 1, {"op": "hello", "version": protocol.VERSION})
    for _ in range(1000):
        s = _raw(sidecar.socket_path)
        try:
            s.sendall(frame[: rng.randint(1, len(frame) - 1)])
        finally:
            s.close()
    assert sidecar.alive()
    _assert_serving(sidecar.socket_path)


def test_well_framed_garbage_gets_error_replies_and_the_connection_survives(sidecar) -> None:
    rng = random.Random(7)
    s = _raw(sidecar.socket_path)
    bodies = [b"{", b"[]", b"null", b'{"op": 3}', b'{"op": "alloc"}', b'{"op": "get", "ref": 1, "location": 2}',
              json.dumps({"op": "alloc", "nbytes": 2**70, "dtype": "<f4", "shape": [1], "location": "host"}).encode()]
    bodies += [rng.randbytes(rng.randint(0, 300)) for _ in range(1000)]
    for i, body in enumerate(bodies):
        header = protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, int(protocol.Kind.REQUEST), i + 1, len(body))
        s.sendall(header + body)
        reply = _read_reply(s)
        assert reply is not None, f"connection dropped after body {body[:40]!r}"
        assert reply[0].kind is protocol.Kind.ERROR and reply[0].request_id == i + 1
        assert reply[1]["message"]
    # The same connection still works once it says hello properly.
    s.sendall(protocol.encode(protocol.Kind.REQUEST, 5000, {"op": "hello", "version": protocol.VERSION}))
    reply = _read_reply(s)
    assert reply is not None and reply[0].kind is protocol.Kind.REPLY
    s.close()


def test_an_oversized_frame_closes_only_that_connection(make_sidecar) -> None:
    sc = make_sidecar("--max-frame", "1Ki")
    bystander = ftc.connect(sc.socket_path)
    s = _raw(sc.socket_path)
    s.sendall(protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, 1, 1, 1 << 20))
    reply = _read_reply(s)
    assert reply is not None and "exceeds the limit" in reply[1]["message"]
    assert s.recv(10) == b"", "the sidecar hung up: the stream can't be trusted any more"
    bystander.ping()
    bystander.close()


def test_sending_file_descriptors_to_the_sidecar_leaks_nothing(sidecar) -> None:
    import array

    r, w = os.pipe()
    try:
        for _ in range(200):
            s = _raw(sidecar.socket_path)
            frame = protocol.encode(protocol.Kind.REQUEST, 1, {"op": "ping"})
            s.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]))])
            _read_reply(s)
            s.close()
        fds = len(os.listdir(f"/proc/{sidecar.proc.pid}/fd"))
        assert fds < 50, f"sidecar holds {fds} fds"
    finally:
        os.close(r)
        os.close(w)


def _child_cycle(socket_path: str, seed: int, progress: int) -> None:
    """One doomed client: allocate, put, get; the parent kills it somewhere along the way."""
    rng = random.Random(seed)
    c = ftc.connect(socket_path, workflow="cycles", function=f"f{seed}")
    w = c.empty(rng.randint(1, 300_000), np.uint8)          # unsealed: must be reclaimed
    w.array[:] = 1
    os.write(progress, b"a")
    ref = c.put(np.full(rng.randint(1, 300_000), seed % 251, np.uint8), ttl=0.5)
    view = c.get(ref)                                        # a lease: must be dropped
    assert int(view[0]) == seed % 251
    os.write(progress, b"g")
    if rng.random() < 0.5:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def test_1000_put_get_kill_cycles_return_the_pool_to_where_it_started(sidecar) -> None:
    path = str(sidecar.socket_path)
    with ftc.connect(path, workflow="cycles") as c:
        baseline = c.stats()["pools"][0]["used_bytes"]
        rng = random.Random(5)
        progress_r, progress_w = os.pipe()
        os.set_blocking(progress_r, False)
        children = []
        for seed in range(1000):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    _child_cycle(path, seed, progress_w)
                finally:
                    os._exit(0)
            children.append(pid)
            if len(children) >= 8:
                victim = children.pop(0)
                time.sleep(rng.random() * 0.02)
                os.kill(victim, signal.SIGKILL)
                os.waitpid(victim, 0)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(progress_w)
        reached = b""
        while chunk := _read_nonblocking(progress_r):
            reached += chunk
        os.close(progress_r)
        # Kills land everywhere: before connecting, while writing, while holding a view.
        assert reached.count(b"a") >= 200 and reached.count(b"g") >= 100, (reached.count(b"a"), reached.count(b"g"))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            stats = c.stats()
            if stats["pools"][0]["used_bytes"] == baseline and stats["objects"] == 0 and stats["sessions"] == 1:
                break
            time.sleep(0.2)
        assert stats["pools"][0]["used_bytes"] == baseline, stats
        assert stats["objects"] == 0 and stats["draining"] == 0 and stats["sessions"] == 1, stats
    assert sidecar.alive()


def _read_nonblocking(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""
