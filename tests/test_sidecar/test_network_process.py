"""Two sidecars as two "nodes" on one machine, passing over NIXL (UCX over TCP, host memory).

Real processes, real NIXL agents: a ref put on node A is read on node B; strangers and
other workflows are refused; a node killed mid-read gives the reader a retryable error
and leaks nothing on the reader's node.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import faastube.client as ftc
import numpy as np
import pytest
from faastube import errors, protocol
from ports import free_port

pytest.importorskip("nixl_cu13", reason="NIXL not installed (make setup installs it)")


def _secret(tmp_path: Path, name: str = "secret") -> Path:
    path = tmp_path / name
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


class Nodes:
    """Sidecars named node-a, node-b, ... each knowing all the others' peer ports."""

    def __init__(self, make_sidecar, tmp_path: Path, names: tuple[str, ...] = ("node-a", "node-b")) -> None:
        self.ports = {name: free_port() for name in names}
        self.metrics_ports = {name: free_port() for name in names}
        self.secret = _secret(tmp_path)
        self.sidecars = {name: self.start(make_sidecar, name,
                                          extra=("--metrics-port", str(self.metrics_ports[name]),
                                                 "--metrics-host", "127.0.0.1"))
                         for name in names}

    def metrics(self, name: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[name]}/metrics", timeout=10) as r:
            return r.read().decode()

    def start(self, make_sidecar, name: str, *, secret: Path | None = None, extra: tuple[str, ...] = ()):
        peers = [f"--peer={other}=127.0.0.1:{port}" for other, port in self.ports.items() if other != name]
        return make_sidecar("--node-name", name, "--peer-port", str(self.ports.get(name, 0)), "--peer-host",
                            "127.0.0.1", "--peer-secret-file", str(secret or self.secret), "--ucx-tls", "tcp",
                            *peers, *extra)

    def connect(self, name: str, *, workflow: str = "w", function: str = "f") -> ftc.Client:
        return ftc.connect(self.sidecars[name].socket_path, workflow=workflow, function=function)


@pytest.fixture
def nodes(make_sidecar, tmp_path: Path) -> Nodes:
    return Nodes(make_sidecar, tmp_path)


def _host_used(client: ftc.Client) -> int:
    return sum(p["used_bytes"] for p in client.stats()["pools"] if p["location"] == "host")


def test_a_ref_put_on_one_node_is_read_on_the_other(nodes: Nodes) -> None:
    with nodes.connect("node-a", function="producer") as a, nodes.connect("node-b", function="consumer") as b:
        assert a.node == "node-a" and b.node == "node-b"
        for value in (np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((0, 5), dtype=np.int64),
                      np.random.default_rng(0).integers(0, 255, size=(3 << 20) + 7, dtype=np.uint8)):
            ref = a.put(value)
            assert protocol.ref_node(ref) == "node-a"
            got = b.get(ref, copy=True)
            assert b.last_path == "network"
            assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value)
        assert _host_used(b) == 0          # copies read and released on B are gone there
    assert 'faastube_network_reads_total{result="ok"} 3.0' in nodes.metrics("node-b")
    deadline = time.monotonic() + 10
    while 'faastube_network_lends_total{how="closed"} 3.0' not in (text := nodes.metrics("node-a")):
        assert time.monotonic() < deadline, text                # closes go out just after each read
        time.sleep(0.05)
    assert "faastube_network_lends_open 0.0" in text
    assert 'faastube_transfer_bytes_total{path="network"}' in nodes.metrics("node-b")


def test_reads_on_another_node_count_as_the_objects_declared_reads(nodes: Nodes) -> None:
    with nodes.connect("node-a") as a, nodes.connect("node-b") as b:
        ref = a.put(np.arange(1000), consumers=1)
        assert int(b.get(ref, copy=True)[999]) == 999
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:          # the lend is closed (and counted) just after the read
            try:
                a.stat(ref)
            except errors.RefNotFound as e:
                assert "consumed" in str(e)
                break
            time.sleep(0.05)
        else:
            pytest.fail("the object on node-a was not consumed by its one read on node-b")
        with pytest.raises(errors.RefNotFound, match="consumed"):
            b.get(ref)


def test_two_readers_on_the_other_node_count_two_reads_whether_or_not_they_share_one(nodes: Nodes) -> None:
    value = np.arange(16 << 20, dtype=np.uint8)
    with nodes.connect("node-a") as a, nodes.connect("node-b", function="c1") as b1, \
            nodes.connect("node-b", function="c2") as b2:
        ref = a.put(value, consumers=2)
        got: list[np.ndarray] = []
        readers = [threading.Thread(target=lambda c=c: got.append(c.get(ref, copy=True))) for c in (b1, b2)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(60)
        assert len(got) == 2 and all(np.array_equal(g, value) for g in got)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                a.stat(ref)
                time.sleep(0.05)
            except errors.RefNotFound as e:
                assert "consumed" in str(e)
                break
        else:
            pytest.fail("two reads on node-b did not consume the object on node-a")
        assert _host_used(b1) == 0


def test_a_reader_node_that_restarted_is_served_again(nodes: Nodes, make_sidecar) -> None:
    with nodes.connect("node-a") as a:
        with nodes.connect("node-b") as b:
            assert int(b.get(a.put(np.arange(10)), copy=True)[9]) == 9
        nodes.sidecars["node-b"].stop()                  # a new sidecar (and NIXL agent) for node-b
        nodes.sidecars["node-b"] = nodes.start(make_sidecar, "node-b")
        with nodes.connect("node-b") as b:
            assert int(b.get(a.put(np.arange(20)), copy=True)[19]) == 19


def test_another_workflow_on_the_other_node_is_refused(nodes: Nodes) -> None:
    with nodes.connect("node-a", workflow="victim") as a, nodes.connect("node-b", workflow="attacker") as b:
        ref = a.put(np.arange(64), consumers=1)
        with pytest.raises(errors.PermissionDenied, match="may not touch data of workflow"):
            b.get(ref)
        assert a.stat(ref).consumers_left == 1              # untouched, still readable at home
        assert int(a.get(ref, copy=True)[63]) == 63
    assert 'faastube_network_reads_total{result="refused"} 1.0' in nodes.metrics("node-b")


def test_a_sidecar_without_the_shared_secret_is_refused(nodes: Nodes, make_sidecar, tmp_path: Path) -> None:
    stranger = nodes.start(make_sidecar, "node-x", secret=_secret(tmp_path, "other-secret"))
    with nodes.connect("node-a") as a, ftc.connect(stranger.socket_path, workflow="w", function="f") as x:
        ref = a.put(np.arange(64))
        with pytest.raises(errors.PermissionDenied, match="refused this sidecar: .*bad signature"):
            x.get(ref)
    assert "bad signature" in nodes.sidecars["node-a"].log()


def test_a_ref_of_a_node_nobody_knows_is_a_retryable_error(nodes: Nodes) -> None:
    with nodes.connect("node-b") as b:
        with pytest.raises(errors.Unavailable, match="no sidecar known for node 'node-q'"):
            b.get(protocol.new_ref("node-q"))


def test_a_sidecar_not_serving_the_network_says_so(make_sidecar) -> None:
    plain = make_sidecar()
    with ftc.connect(plain.socket_path, workflow="w") as c:
        assert c.node is None and protocol.ref_node(c.put(np.arange(3))) is None
        with pytest.raises(errors.RefNotFound, match="does not serve cross-node passing"):
            c.get(protocol.new_ref("node-a"))
        c.node = "node-a"                                  # a client lying about its node
        c.put(np.arange(3))
        c.stats()                                          # its reply carries the refused publish's error,
        with pytest.raises(errors.InvalidRequest, match="names node 'node-a'"):
            c.stats()                                      # raised by the call after


def test_the_owner_killed_mid_read_gives_a_retryable_error_and_leaks_nothing(nodes: Nodes) -> None:
    a_proc = nodes.sidecars["node-a"]
    with nodes.connect("node-a") as a, nodes.connect("node-b") as b, nodes.connect("node-b") as watcher:
        ref = a.put(np.ones(768 << 20, dtype=np.uint8))
        outcome: list[BaseException | None] = []

        def read() -> None:
            try:
                b.get(ref)
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001
                outcome.append(e)

        reader = threading.Thread(target=read)
        started = time.monotonic()
        reader.start()
        while not _host_used(watcher) and not outcome:     # room reserved on node-b: the read is on
            assert time.monotonic() - started < 30, "the read never started"
            time.sleep(0.005)
        os.kill(a_proc.proc.pid, signal.SIGKILL)
        reader.join(60)
        assert outcome and isinstance(outcome[0], errors.Unavailable), outcome
        assert "retry" in str(outcome[0])
        assert time.monotonic() - started < 30
        deadline = time.monotonic() + 20
        while _host_used(b) and time.monotonic() < deadline:    # room goes back once NIXL let go of it
            time.sleep(0.1)
        assert _host_used(b) == 0
        assert nodes.sidecars["node-b"].alive()
        local = b.put(np.arange(5))                            # and node-b serves on
        assert int(b.get(local, copy=True)[4]) == 4


@pytest.mark.parametrize(("flags", "message"), [
    (("--peer-port", "0"), "--peer-port needs --node-name"),
    (("--peer-port", "0", "--node-name", "n1"), "--peer-port needs --peer-secret-file"),
    (("--peer", "n2=127.0.0.1:9"), "--peer has no effect without --peer-port"),
    (("--peer-port", "0", "--node-name", "N1", "--peer-secret-file", "/x"), "malformed node name 'N1'"),
    (("--peer-port", "0", "--node-name", "n1", "--peer-secret-file", "/x", "--peer", "n2=nowhere"),
     "not HOST:PORT"),
    (("--peer-port", "0", "--node-name", "n1", "--peer-secret-file", "/x", "--peer", "n1=h:1"), "that is this node"),
    (("--peer-port", "0", "--node-name", "n1", "--peer-secret-file", "/x", "--network-bandwidth", "fast"),
     "not a rate"),
])
def test_network_flags_are_checked_before_anything_starts(flags: tuple[str, ...], message: str) -> None:
    out = subprocess.run([sys.executable, "-m", "faastube.cli", "sidecar", "--socket", "/tmp/ft-never.sock",
                          "--backend", "host", *flags], capture_output=True, text=True, timeout=30,
                         env={k: v for k, v in os.environ.items() if k != "NODE_NAME"})
    assert out.returncode == 2, out.stderr
    assert message in out.stderr


def test_a_short_or_missing_secret_stops_startup_with_one_line(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("too-short\n")
    for path, message in ((short, "use at least 32"), (tmp_path / "absent", "No such file")):
        out = subprocess.run([sys.executable, "-m", "faastube.cli", "sidecar", "--socket", str(tmp_path / "s.sock"),
                              "--backend", "host", "--node-name", "n1", "--peer-port", "0", "--peer-secret-file",
                              str(path)], capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and message in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
