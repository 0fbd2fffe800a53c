"""Hostile neighbours, tried as an attacker would: lockout, unread replies, bad bodies, permissions, scrapes.

Real sidecar processes (host backend). The load figures (5,000 abusive connections,
a million fuzzed frames) are benchmarks: bench/sidecar_abuse.py.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import faastube.client as ftc
import numpy as np
import pytest
from faastube import errors, protocol
from ports import free_port
from raw_client import connect_raw as _raw
from raw_client import read_frame as _read_frame


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _works_from_another_process(path) -> None:
    code = textwrap.dedent(f"""
        import numpy as np, faastube.client as ftc
        with ftc.connect({str(path)!r}, workflow="victim") as c:
            assert int(c.get(c.put(np.arange(10)), copy=True)[9]) == 9
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr.decode()[-2000:]


def test_connections_that_never_say_hello_cannot_lock_others_out(make_sidecar) -> None:
    sc = make_sidecar("--hello-timeout", "1s")
    half = []
    for _ in range(8):
        s = _raw(sc.socket_path)
        s.sendall(protocol.encode(protocol.Kind.REQUEST, 1, {"op": "hello", "version": 2})[:7])  # half a header
        half.append(s)
    idle = [_raw(sc.socket_path) for _ in range(56)]
    try:
        # This process has 64 connections waiting for hello: its next ones are refused, clearly.
        with pytest.raises(errors.Unavailable, match="connections that have not said hello"):
            ftc.connect(sc.socket_path, workflow="attacker")
        _works_from_another_process(sc.socket_path)         # everyone else is served meanwhile
        time.sleep(2.0)                                      # past --hello-timeout: all of them closed
        for s in idle[:3] + half[:3]:
            frame = _read_frame(s)
            assert frame is not None and frame[0].kind is protocol.Kind.ERROR
            assert "no hello within 1s" in frame[1]["message"]
        with ftc.connect(sc.socket_path, workflow="attacker") as c:   # its slots are free again
            c.ping()
    finally:
        for s in idle + half:
            s.close()
    assert sc.alive()


def test_a_client_that_never_reads_its_replies_cannot_grow_the_sidecar(sidecar) -> None:
    hog = _raw(sidecar.socket_path)
    hog.sendall(protocol.encode(protocol.Kind.REQUEST, 1, {"op": "hello", "version": protocol.VERSION}))
    hog.setblocking(False)
    before = _rss_bytes(sidecar.proc.pid)
    frame = protocol.encode(protocol.Kind.REQUEST, 2, {"op": "stats"})
    sent = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            sent += hog.send(frame * 64)
        except BlockingIOError:
            time.sleep(0.05)          # the sidecar stopped reading us: our socket is full
            try:
                sent += hog.send(frame)
            except BlockingIOError:
                break
    grown = _rss_bytes(sidecar.proc.pid) - before
    assert grown < 32 << 20, f"the sidecar grew by {grown >> 20} MiB"
    assert sent < 64 << 20, "backpressure reached the sender"
    _works_from_another_process(sidecar.socket_path)
    hog.close()
    assert sidecar.alive()


@pytest.mark.parametrize("body, match", [
    (b"[" * 200_000, "nests too deeply"),
    (b'{"op": "ping", "x": ' + b"9" * 5000 + b"}", "out of range"),
])
def test_bodies_that_escape_json_limits_get_an_error_reply_and_the_connection_lives(sidecar, body, match) -> None:
    s = _raw(sidecar.socket_path)
    hello = protocol.encode(protocol.Kind.REQUEST, 1, {"op": "hello", "version": protocol.VERSION})
    bad = protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, int(protocol.Kind.REQUEST), 2, len(body)) + body
    ping = protocol.encode(protocol.Kind.REQUEST, 3, {"op": "ping"})
    s.sendall(hello + bad + ping)                 # the bad frame is queued behind the hello
    replies = [_read_frame(s) for _ in range(3)]
    assert [r[0].request_id for r in replies] == [1, 2, 3]
    assert replies[1][0].kind is protocol.Kind.ERROR and match in replies[1][1]["message"]
    assert replies[2][0].kind is protocol.Kind.REPLY
    s.close()
    assert "Traceback" not in sidecar.log()


def test_the_socket_admits_only_the_sidecars_user_and_group(make_sidecar) -> None:
    sc = make_sidecar()
    mode = stat.S_IMODE(os.stat(sc.socket_path).st_mode)
    assert mode == 0o660
    gid = os.getgid()
    sc2 = make_sidecar("--socket-mode", "0600", "--socket-group", str(gid))
    assert stat.S_IMODE(os.stat(sc2.socket_path).st_mode) == 0o600


def test_a_socket_mode_open_to_everyone_is_refused_at_startup() -> None:
    out = subprocess.run([sys.executable, "-m", "faastube.cli", "sidecar", "--socket", "/tmp/never.sock",
                          "--socket-mode", "0666"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "every local user" in out.stderr


def test_metrics_answer_every_scrape_under_object_churn(make_sidecar) -> None:
    port = free_port()
    sc = make_sidecar("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    stop = threading.Event()

    def churn() -> None:
        with ftc.connect(sc.socket_path, workflow="churn") as c:
            while not stop.is_set():
                refs = [c.put(np.ones(64)) for _ in range(50)]
                for ref in refs:
                    c.free(ref)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        codes = []
        for _ in range(200):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                codes.append(r.status)
    finally:
        stop.set()
        worker.join(30)
    assert codes.count(200) == len(codes)


def test_a_metrics_port_in_use_is_one_line_and_no_socket() -> None:
    # The socket is the readiness signal, so the metrics endpoint comes up before it: a port
    # that can't be bound stops start-up with the port named, before any client could connect.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sock = f"/tmp/faastube-metrics-busy-{os.getpid()}.sock"
        out = subprocess.run([sys.executable, "-m", "faastube.cli", "sidecar", "--socket", sock,
                              "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
                             capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [f"faastube sidecar: --metrics-port {port} on 127.0.0.1: "
                                               "Address already in use"]
    assert not os.path.exists(sock)

