"""The fast path's protocol: a put costs no round trip, a get one, ended reads ride along."""

from __future__ import annotations

import gc

import faastube.client as ftc
import numpy as np
import pytest
from faastube import errors, protocol


class WireSpy:
    """Counts what a client sends and reads, without changing it."""

    def __init__(self, client: ftc.Client, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sends: list[list[str]] = []
        self.reads = 0
        send, next_frame = client._send, client._next_frame

        def spy_send(frames: list[bytes]) -> None:
            self.sends.append([protocol.decode_body(f[protocol.HEADER_SIZE:])["op"] for f in frames])
            send(frames)

        def spy_next_frame():
            self.reads += 1
            return next_frame()

        monkeypatch.setattr(client, "_send", spy_send)
        monkeypatch.setattr(client, "_next_frame", spy_next_frame)

    def reset(self) -> None:
        self.sends.clear()
        self.reads = 0


def test_a_put_into_a_leased_arena_is_one_notify_and_no_round_trip(sidecar, monkeypatch) -> None:
    with ftc.connect(sidecar.socket_path, workflow="w") as c:
        c.put(np.zeros(16, np.float32))          # leases the arena
        spy = WireSpy(c, monkeypatch)
        refs = [c.put(np.full(16, i, np.float32), consumers=1) for i in range(50)]
        assert spy.sends == [["publish"]] * 50 and spy.reads == 0
        assert float(c.get(refs[7], device="cpu")[0]) == 7.0


def test_a_get_is_one_round_trip_and_carries_ended_reads_with_it(sidecar, monkeypatch) -> None:
    with ftc.connect(sidecar.socket_path, workflow="w") as p, ftc.connect(sidecar.socket_path, workflow="w") as r:
        refs = [p.put(np.arange(8), consumers=1) for _ in range(3)]
        first = r.get(refs[0], device="cpu")       # maps the slab
        spy = WireSpy(r, monkeypatch)
        x = r.get(refs[1], device="cpu")
        assert spy.sends == [["get"]] and spy.reads == 1
        del x
        gc.collect()                               # ends the read: queued, not sent from the collector
        spy.reset()
        y = r.get(refs[2], device="cpu")
        # The ended read rides in the get itself (or the flusher thread sent it first).
        assert spy.sends in ([["get"]], [["release"], ["get"]]), spy.sends
        assert spy.reads == 1
        r.release(refs[2])
        assert spy.sends[-1] == ["release"]        # an explicit release is sent at once
        del y, first
    with pytest.raises(errors.RefNotFound, match="consumed"):
        ftc.connect(sidecar.socket_path, workflow="w").stat(refs[1])


def test_arenas_are_reused_once_readers_let_go(make_sidecar) -> None:
    sc = make_sidecar("--host-arena", "1Mi", "--host-quota", "2Mi", "--host-pool-max", "4Mi")
    with ftc.connect(sc.socket_path, workflow="w") as p, ftc.connect(sc.socket_path, workflow="w") as r:
        for i in range(200):                        # 200 MiB through 2 MiB of quota
            ref = p.put(np.full(1 << 18, i, np.float32), consumers=1)
            x = r.get(ref, device="cpu")
            assert float(x[-1]) == i
            r.release(ref)
            del x
        assert p.stats()["domain_reserved_bytes"]["host"] <= 2 << 20


def test_a_refused_publish_surfaces_on_a_later_call_naming_the_ref(sidecar) -> None:
    with ftc.connect(sidecar.socket_path, workflow="w") as c:
        c.put(np.zeros(4, np.uint8))
        slab, offset = c._place(ftc.HOST, 64)
        ref = c._publish(slab, offset, 64, np.dtype(np.uint8), (64,), None, None, fence=[[12345, 64]], copied=None)
        c.ping()                                    # reads the error frame; this call itself succeeded
        with pytest.raises(errors.InvalidRequest, match=f"publishing {ref} failed.*fence event 12345"):
            c.ping()
        c.ping()                                    # raised once
        again, _ = c._place(ftc.HOST, 64)
        assert again is slab, "the refused range went back to the arena"


def test_publish_arguments_are_checked_before_anything_is_sent(sidecar) -> None:
    with ftc.connect(sidecar.socket_path, workflow="w") as c:
        for kwargs in ({"consumers": 0}, {"consumers": True}, {"ttl": 0}, {"ttl": float("inf")}, {"ttl": "1"}):
            with pytest.raises(errors.InvalidRequest):
                c.put(np.zeros(4), **kwargs)


def test_an_unsealed_writable_gives_its_memory_back(sidecar) -> None:
    with ftc.connect(sidecar.socket_path, workflow="w") as c:
        w = c.empty(1000, np.uint8, device="cpu")
        first = w._slot
        w.discard()
        assert c.empty(1000, np.uint8, device="cpu")._slot == first
        w2 = c.empty(1000, np.uint8, device="cpu")
        slot = w2._slot
        del w2
        gc.collect()
        assert c.empty(1000, np.uint8, device="cpu")._slot == slot
        w3 = c.empty(8, np.uint8, device="cpu")
        w3.array[:] = 9
        ref = c.seal(w3, consumers=1)
        with pytest.raises(errors.InvalidRequest, match="already sealed"):
            c.seal(w3)
        assert int(c.get(ref, device="cpu", copy=True)[0]) == 9


def test_the_host_backend_says_how_to_ask_for_host_memory(sidecar) -> None:
    with ftc.connect(sidecar.socket_path, workflow="w") as c:
        with pytest.raises(errors.InvalidRequest, match="host backend: use device='cpu'"):
            c.empty(4, device=0)
