"""Cross-node passing, the pure parts: call signatures, message validation, the network engine's
scheduling and failure rules (its NIXL agent replaced by a recorded stand-in), refs naming nodes."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import pytest
from faastube import errors, protocol
from faastube_sidecar.network import auth, messages
from faastube_sidecar.network.engine import NetRead, NetworkEngine
from faastube_sidecar.network.nixl import ReadFailed, Span
from faastube_sidecar.network.peers import PeerDirectory, parse_peer_flag
from faastube_sidecar.transfers import scheduler
from faastube_sidecar.transfers.scheduler import FunctionIdentity, SchedulerSettings

SECRET = b"s" * 32


# --- refs -------------------------------------------------------------------------------------

def test_refs_may_name_their_node() -> None:
    ref = protocol.new_ref("gpu-node-7.example")
    assert protocol.check_ref(ref) == ref and protocol.ref_node(ref) == "gpu-node-7.example"
    plain = protocol.new_ref()
    assert protocol.ref_node(plain) is None
    for bad in (plain + "@", plain + "@Upper", plain + "@-lead", plain + "@a b", plain + "@" + "a" * 254):
        with pytest.raises(errors.InvalidRequest, match="malformed ref"):
            protocol.check_ref(bad)
    with pytest.raises(errors.InvalidRequest, match="malformed node name"):
        protocol.new_ref("Node_1")


# --- auth -------------------------------------------------------------------------------------

def test_a_signed_call_verifies_once() -> None:
    a, b = auth.PeerAuth(SECRET, node="node-a"), auth.PeerAuth(SECRET, node="node-b")
    signed = a.sign("Open", b"{}", now_s=1000.0)
    metadata = dict(signed.metadata())
    assert b.verify("Open", b"{}", metadata, now_s=1001.0) == "node-a"
    with pytest.raises(auth.PeerAuthError, match="replayed"):
        b.verify("Open", b"{}", metadata, now_s=1001.5)


@pytest.mark.parametrize(("change", "message"), [
    (lambda m, body: ({**m, auth.MAC_KEY: "0" * 64}, body), "bad signature"),
    (lambda m, body: (m, b'{"x":1}'), "bad signature"),                       # body changed
    (lambda m, body: ({**m, auth.NODE_KEY: "node-z"}, body), "bad signature"),  # node claimed
    (lambda m, body: ({k: v for k, v in m.items() if k != auth.NONCE_KEY}, body), "missing x-faastube-nonce"),
    (lambda m, body: ({**m, auth.TIME_KEY: "soon"}, body), "malformed"),
])
def test_tampered_calls_are_refused(change, message: str) -> None:
    a, b = auth.PeerAuth(SECRET, node="node-a"), auth.PeerAuth(SECRET, node="node-b")
    metadata, body = change(dict(a.sign("Open", b"{}", now_s=50.0).metadata()), b"{}")
    with pytest.raises(auth.PeerAuthError, match=message):
        b.verify("Open", body, metadata, now_s=50.0)


def test_another_secret_or_method_or_a_far_clock_is_refused() -> None:
    a = auth.PeerAuth(SECRET, node="node-a")
    stranger = auth.PeerAuth(b"t" * 32, node="node-b")
    with pytest.raises(auth.PeerAuthError, match="bad signature"):
        stranger.verify("Open", b"", dict(a.sign("Open", b"", now_s=0.0).metadata()), now_s=0.0)
    b = auth.PeerAuth(SECRET, node="node-b")
    with pytest.raises(auth.PeerAuthError, match="bad signature"):
        b.verify("Close", b"", dict(a.sign("Open", b"", now_s=0.0).metadata()), now_s=0.0)
    with pytest.raises(auth.PeerAuthError, match=r"clock is \+40.0s off"):
        b.verify("Open", b"", dict(a.sign("Open", b"", now_s=0.0).metadata()), now_s=40.0)


def test_secrets_must_be_long_enough(tmp_path: Path) -> None:
    with pytest.raises(auth.PeerSecretError, match="at least 32"):
        auth.PeerAuth(b"short", node="n")
    path = tmp_path / "s"
    path.write_bytes(b"x" * 32 + b"\n")
    assert auth.load_secret(path) == b"x" * 32
    path.write_bytes(b"x" * 31 + b"\n")
    with pytest.raises(auth.PeerSecretError, match="31 bytes"):
        auth.load_secret(path)


# --- messages ---------------------------------------------------------------------------------

def _lent(**change) -> bytes:
    body = {"lease": "l1", "nbytes": 8, "dtype": "<f4", "shape": [2], "agent": "a",
            "agent_metadata_b64": base64.b64encode(b"meta").decode(), "address": 4096, "device": 0,
            "mem": "DRAM", "expires_in_s": 5.0}
    body.update(change)
    return json.dumps(body).encode()


def test_messages_round_trip() -> None:
    request = messages.OpenRead(protocol.new_ref("n1"), messages.Reader("ns", "wf", "fn"), "faastube-n2-41")
    assert messages.OpenRead.decode(messages.encode(request)) == request
    lent = messages.Lent.decode(_lent())
    assert lent.shape == (2,) and lent.agent_metadata == b"meta"
    assert messages.CloseRead.decode(messages.encode(messages.CloseRead("l1", 2))).reads == 2


@pytest.mark.parametrize(("body", "message"), [
    (b"[]", "must be a JSON object"),
    (b"{", "not JSON"),
    (b" " * (messages.MAX_BODY_BYTES + 1), "at most"),
    (json.dumps({"ref": "nope", "reader": {}}).encode(), "malformed ref"),
    (json.dumps({"ref": protocol.new_ref(), "reader": {"namespace": "n", "workflow": "w"}}).encode(),
     "'function' must be"),
    (json.dumps({"ref": protocol.new_ref(), "reader": {"namespace": "n", "workflow": "w", "function": "f"}}).encode(),
     "'agent' must be"),
])
def test_bad_open_requests_name_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(errors.InvalidRequest, match=message):
        messages.OpenRead.decode(body)


@pytest.mark.parametrize(("change", "message"), [
    ({"mem": "HBM"}, "DRAM or VRAM"), ({"shape": [-1]}, "non-negative"), ({"nbytes": -1}, ">= 0"),
    ({"agent_metadata_b64": "***"}, "not base64"), ({"address": "0x10"}, "'address' must be"),
    ({"lease": ""}, "1 to 64"), ({"shape": [3]}, r"shape \[3\] of <f4 is not 8 bytes"),
    ({"dtype": "O"}, "not a plain numeric type"), ({"dtype": "nonsense"}, "is not a dtype"),
])
def test_bad_open_replies_name_what_is_wrong(change: dict, message: str) -> None:
    with pytest.raises(errors.InvalidRequest, match=message):
        messages.Lent.decode(_lent(**change))


def test_close_reads_are_bounded() -> None:
    with pytest.raises(errors.InvalidRequest, match="at most"):
        messages.CloseRead.decode(json.dumps({"lease": "l", "reads": messages.MAX_READS + 1}).encode())
    with pytest.raises(errors.InvalidRequest, match="'reads' must be"):
        messages.CloseRead.decode(json.dumps({"lease": "l", "reads": True}).encode())


# --- peers ------------------------------------------------------------------------------------

def test_peer_flags_and_lookups() -> None:
    assert parse_peer_flag("node-b=10.0.0.2:7400").address == "10.0.0.2:7400"
    assert parse_peer_flag("node-b=[fd00::2]:7400").address == "[fd00::2]:7400"
    for bad in ("node-b", "node-b=10.0.0.2", "node-b=10.0.0.2:0", "Node=h:1"):
        with pytest.raises(errors.InvalidRequest):
            parse_peer_flag(bad)
    asked: list[str] = []

    def cluster(node: str):
        asked.append(node)
        return parse_peer_flag(f"{node}=h:1") if node == "known" else None

    directory = PeerDirectory(cluster=cluster)
    assert not directory.cached("known")
    assert directory.lookup("known").address == "h:1" and directory.cached("known")
    directory.lookup("known")
    assert asked == ["known"]
    with pytest.raises(errors.Unavailable, match="no sidecar known for node 'ghost'"):
        directory.lookup("ghost")
    directory.stale("known")
    directory.lookup("known")
    assert asked == ["known", "ghost", "known"]


# --- the scheduler's network link ------------------------------------------------------------

def test_the_network_is_one_more_link_of_the_scheduler() -> None:
    assert scheduler.link_id("net", "host") == scheduler.link_id("net", 3) == "net:in"
    assert scheduler.link_id(0, "net") == "net:out"
    route = scheduler.make_route([(["net", 2], 1.0)], 1 << 20)
    assert scheduler.describe_route(route, {}) == "network"
    with pytest.raises(scheduler.TransferError, match="relays must be GPUs"):
        scheduler.make_route([(["host", "net", 1], 1.0)], 1 << 20)


# --- the engine, with a recorded stand-in for the NIXL agent ----------------------------------

class _Agent:
    """Records posted reads; the test says when each ends (DONE or ERR)."""

    name = "me"

    def __init__(self) -> None:
        self.posted: list[tuple[Span, Span, str]] = []
        self.states: dict[int, str] = {}
        self.lock = threading.Lock()
        self.refuse = False

    def read(self, local: Span, remote: Span, agent: str) -> int:
        with self.lock:
            if self.refuse:
                raise ReadFailed("refused")
            self.posted.append((local, remote, agent))
            handle = len(self.posted) - 1
            self.states[handle] = "PROC"
            return handle

    def state(self, handle: int) -> str:
        with self.lock:
            return self.states[handle]

    def end(self, state: str = "DONE") -> None:
        with self.lock:
            for handle, now in self.states.items():
                if now == "PROC":
                    self.states[handle] = state


@pytest.fixture
def engine_of():
    """engine_of(inflight=N) -> (a recorded agent, a network engine over it); closed at teardown."""
    engines: list[NetworkEngine] = []

    def make(*, inflight: int) -> tuple[_Agent, NetworkEngine]:
        agent = _Agent()
        engines.append(NetworkEngine(agent, bandwidth_bytes_per_s=1e9,  # type: ignore[arg-type]
                                     settings=SchedulerSettings(chunk_bytes=1 << 20,
                                                                max_inflight_chunks_per_link=inflight)))
        return agent, engines[-1]

    yield make
    for engine in engines:
        engine.close()


def _read(nbytes: int, *, slo_s: float | None = None) -> NetRead:
    return NetRead(FunctionIdentity("wf", "fn"), Span(1 << 20, nbytes, 0, "DRAM"), Span(1 << 30, nbytes, 0, "DRAM"),
                   "owner", slo_s)


def _wait(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_read_is_cut_into_chunks_that_cover_it_exactly(engine_of) -> None:
    agent, engine = engine_of(inflight=2)
    future = engine.submit(_read((5 << 20) + 100))
    while not future.done():
        _wait(lambda: any(s == "PROC" for s in agent.states.values()) or future.done())
        agent.end()
    assert future.result().path_label == "network"
    pieces = sorted((local.address - (1 << 20), local.nbytes, remote.address - (1 << 30))
                    for local, remote, _ in agent.posted)
    assert [p[0] for p in pieces] == [p[2] for p in pieces]            # same offset both sides
    assert sum(p[1] for p in pieces) == (5 << 20) + 100 and len(pieces) == 6
    assert {agent_name for *_, agent_name in agent.posted} == {"owner"}


def test_a_failed_chunk_fails_its_read_and_posts_nothing_more_of_it(engine_of) -> None:
    agent, engine = engine_of(inflight=2)
    future = engine.submit(_read(8 << 20))
    _wait(lambda: len(agent.posted) == 2)
    agent.end("ERR")
    with pytest.raises(ReadFailed, match="ended in ERR"):
        future.result(timeout=5)
    assert len(agent.posted) == 2                     # the other six chunks never went out
    agent.refuse = True
    with pytest.raises(ReadFailed, match="refused"):
        engine.submit(_read(1 << 20)).result(timeout=5)


def test_a_read_is_stalled_only_while_no_chunk_lands(engine_of) -> None:
    agent, engine = engine_of(inflight=1)
    future = engine.submit(_read(4 << 20))
    _wait(lambda: len(agent.posted) == 1)
    time.sleep(0.2)
    assert engine.stalled_for(future) >= 0.2
    agent.end()
    _wait(lambda: len(agent.posted) == 2)
    assert engine.stalled_for(future) < 0.2          # a chunk landed: the clock starts again
    while not future.done():
        agent.end()
        time.sleep(0.001)
    assert engine.stalled_for(future) == 0.0          # over: nothing to wait for


def test_an_abandoned_read_ends_once_its_posted_chunks_end(engine_of) -> None:
    agent, engine = engine_of(inflight=2)
    future = engine.submit(_read(8 << 20))
    _wait(lambda: len(agent.posted) == 2)
    engine.abandon(future)
    time.sleep(0.05)
    assert not future.done()                          # NIXL may still write: not over yet
    agent.end()
    with pytest.raises(ReadFailed, match="abandoned"):
        future.result(timeout=5)
    assert len(agent.posted) == 2


def test_a_small_read_is_not_held_behind_a_large_one(engine_of) -> None:
    agent, engine = engine_of(inflight=1)
    large = engine.submit(_read(64 << 20))
    _wait(lambda: len(agent.posted) == 1)
    small = engine.submit(_read(1 << 20, slo_s=0.01))
    for _ in range(3):                                # within a couple of chunks, the small one is out
        agent.end()
        _wait(lambda: small.done() or any(s == "PROC" for s in agent.states.values()))
        if small.done():
            break
    assert small.done() and not large.done()
    engine.abandon(large)
    agent.end()
    _wait(large.done)


def test_on_a_cluster_a_nodes_sidecar_is_found_in_its_gpunode() -> None:
    from faastube_sidecar.network.peers import gpunode_lookup

    class Api:
        """The one call the lookup makes, answering from a dict of GpuNode bodies."""

        def __init__(self, nodes: dict) -> None:
            self.nodes = nodes

        def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str) -> dict:
            assert (group, version, plural) == ("faastube.io", "v1alpha1", "gpunodes")
            if name not in self.nodes:
                raise LookupError(f"gpunodes {name} not found")
            return self.nodes[name]

    lookup = gpunode_lookup(Api({
        "n1": {"status": {"network": {"address": "10.0.0.1", "peerPort": 7400, "agent": "a1"}}},
        "n6": {"status": {"network": {"address": "fd00::6", "peerPort": 7400, "agent": "a6"}}},
        "plain": {"status": {}},
        "broken": {"status": {"network": {"address": "10.0.0.9", "peerPort": "7400"}}},
    }))
    assert lookup("n1").address == "10.0.0.1:7400"
    assert lookup("n6").address == "[fd00::6]:7400"
    assert lookup("plain") is None and lookup("broken") is None and lookup("absent") is None
