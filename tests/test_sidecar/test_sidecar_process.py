"""The real sidecar process over its real socket: client API, errors, metrics, many processes."""

from __future__ import annotations

import multiprocessing as mp
import re
import socket
import time
import urllib.request

import faastube.client as ftc
import numpy as np
import pytest
from faastube import errors
from ports import free_port
from sidecar_process import SidecarProcess


def test_put_get_round_trips_every_dtype_and_shape(sidecar) -> None:
    with ftc.connect(sidecar.socket_path) as c:
        rng = np.random.default_rng(1)
        for dtype in ("u1", "i2", "i4", "i8", "f2", "f4", "f8", "c8", "?"):
            for shape in ((), (0,), (7,), (3, 5), (2, 3, 4)):
                a = (rng.random(shape) * 100).astype(dtype)
                b = c.get(c.put(a), copy=True)
                assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def test_non_contiguous_inputs_are_made_contiguous(sidecar) -> None:
    with ftc.connect(sidecar.socket_path) as c:
        a = np.arange(100, dtype=np.int32).reshape(10, 10)[:, ::3]
        assert np.array_equal(c.get(c.put(a)), a)


def test_get_returns_a_read_only_zero_copy_view(sidecar) -> None:
    with ftc.connect(sidecar.socket_path) as producer, ftc.connect(sidecar.socket_path) as consumer:
        w = producer.empty((4, 4), np.float32)
        w.array[...] = 3.0
        ref = producer.seal(w)
        view = consumer.get(ref)
        assert not view.flags.writeable
        w.array[0, 0] = 42.0      # the writer's memory is the reader's memory
        assert view[0, 0] == 42.0
        assert consumer.last_path == "local"


def test_a_ref_is_a_short_string_that_works_from_another_process(sidecar) -> None:
    with ftc.connect(sidecar.socket_path) as c:
        ref = c.put(np.arange(10))
        assert isinstance(ref, str) and len(ref) < 40
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            assert pool.apply(_sum_of, (str(sidecar.socket_path), ref)) == 45


def _sum_of(socket_path: str, ref: str) -> int:
    with ftc.connect(socket_path) as c:
        return int(c.get(ref).sum())


def test_unknown_refs_raise_an_error_naming_the_ref(sidecar) -> None:
    with ftc.connect(sidecar.socket_path) as c:
        with pytest.raises(errors.RefNotFound, match="ft-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"):
            c.get("ft-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
        with pytest.raises(errors.InvalidRequest, match="malformed"):
            c.get("nope")
        c.ping()   # the connection survives errors


def test_freed_objects_are_gone_and_release_without_a_read_is_an_error(sidecar) -> None:
    with ftc.connect(sidecar.socket_path) as c:
        ref = c.put(np.ones(3))
        c.free(ref)
        with pytest.raises(errors.RefNotFound):
            c.stat(ref)
        with pytest.raises(errors.InvalidRequest, match="no open read"):
            c.release(ref)


def test_consumed_objects_are_released_when_views_are_garbage_collected(sidecar) -> None:
    with ftc.connect(sidecar.socket_path) as p, ftc.connect(sidecar.socket_path) as r:
        ref = p.put(np.ones(1000), consumers=1)
        view = r.get(ref)
        derived = view[10:20]
        del view
        r.flush()
        assert p.stat(ref).readers == 1, "a derived view still holds the lease"
        del derived
        r.flush()
        with pytest.raises(errors.RefNotFound):
            p.stat(ref)


def test_running_out_of_pool_memory_is_an_error_the_caller_can_handle(make_sidecar) -> None:
    sc = make_sidecar("--host-pool-max", "4Mi", "--host-quota", "4Mi", "--host-slab", "1Mi")
    with ftc.connect(sc.socket_path) as c:
        keep = [c.put(np.zeros(1 << 20, np.uint8)) for _ in range(4)]
        with pytest.raises(errors.OutOfPoolMemory):
            c.put(np.zeros(1 << 20, np.uint8))
        c.free(keep.pop())
        c.put(np.zeros(1 << 20, np.uint8))   # room again after a free
    assert sc.alive()


def test_torch_tensors_are_accepted_when_torch_is_installed(sidecar) -> None:
    torch = pytest.importorskip("torch")
    with ftc.connect(sidecar.socket_path) as c:
        t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        out = c.get(c.put(t), copy=True)
        assert np.array_equal(out, t.numpy())
        assert torch.equal(torch.from_numpy(out), t)


def test_dlpack_and_array_interface_objects_are_accepted(sidecar) -> None:
    class Iface:
        def __init__(self, a):
            self._a = a
            self.__array_interface__ = a.__array_interface__

    with ftc.connect(sidecar.socket_path) as c:
        a = np.arange(6, dtype=np.int16)
        assert np.array_equal(c.get(c.put(Iface(a)), copy=True), a)
        with pytest.raises(errors.InvalidRequest, match="cannot pass"):
            c.put(object())


def test_many_processes_put_and_get_concurrently(sidecar) -> None:
    ctx = mp.get_context("fork")
    with ctx.Pool(4) as pool:
        results = pool.starmap(_producer_consumer, [(str(sidecar.socket_path), seed) for seed in range(8)])
    assert all(results)
    with ftc.connect(sidecar.socket_path) as c:
        stats = c.stats()
    assert stats["objects"] == 0 and stats["pools"][0]["used_bytes"] == 0


def _producer_consumer(socket_path: str, seed: int) -> bool:
    rng = np.random.default_rng(seed)
    with ftc.connect(socket_path, workflow="wf", function=f"p{seed}") as p, \
            ftc.connect(socket_path, workflow="wf", function=f"c{seed}") as r:
        for _ in range(25):
            a = rng.random(int(rng.integers(1, 50_000)))
            ref = p.put(a, consumers=1)
            ok = np.array_equal(r.get(ref, copy=True), a)
            if not ok:
                return False
    return True


def test_metrics_are_served_with_the_documented_names(make_sidecar) -> None:
    port = free_port()
    sc = make_sidecar("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    with ftc.connect(sc.socket_path) as c:
        ref = c.put(np.ones(1000))
        c.get(ref)
        # Pool and object gauges come from a snapshot the sidecar refreshes every sweep (0.5 s).
        deadline = time.monotonic() + 5
        while True:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            if 'faastube_objects{gpu="host"} 1.0' in text or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    for name in ("faastube_pool_reserved_bytes{gpu=\"host\"}", "faastube_pool_used_bytes{gpu=\"host\"}",
                 "faastube_objects{gpu=\"host\"} 1.0", "faastube_transfer_bytes_total",
                 "faastube_request_seconds_bucket{le=", "faastube_connections 1.0",
                 'faastube_requests_total{op="get",result="ok"} 1.0'):
        assert name in text, name
    assert re.search(r'faastube_transfer_bytes_total\{path="host"\} 8000\.0', text), "put copies are counted"


@pytest.mark.parametrize("spin", ["fast", "-1", "20000"])
def test_a_bad_spin_setting_is_refused_with_its_value(sidecar, monkeypatch, spin) -> None:
    monkeypatch.setenv("FAASTUBE_SPIN_US", spin)
    with pytest.raises(errors.InvalidRequest, match="FAASTUBE_SPIN_US"):
        ftc.connect(sidecar.socket_path)


def test_a_spinning_client_gets_the_same_answers(sidecar) -> None:
    with ftc.connect(sidecar.socket_path, spin_us=100) as c:
        a = np.arange(1000)
        assert np.array_equal(c.get(c.put(a), copy=True), a)


def test_sigterm_stops_the_sidecar_cleanly_and_removes_its_socket(make_sidecar) -> None:
    sc = make_sidecar()
    client = ftc.connect(sc.socket_path)
    client.put(np.ones(10))
    assert sc.stop() == 0
    assert not sc.socket_path.exists()
    with pytest.raises(errors.Unavailable):
        client.ping()   # the connection is gone: a clear, retryable error


def test_a_restarted_sidecar_serves_on_the_same_path(make_sidecar) -> None:
    sc = make_sidecar()
    path = sc.socket_path
    assert sc.stop() == 0
    again = SidecarProcess(path)   # the socket's directory stays; the new file replaces the old
    try:
        with ftc.connect(path) as c:
            assert np.array_equal(c.get(c.put(np.arange(3)), copy=True), np.arange(3))
    finally:
        assert again.stop() == 0


def test_a_second_sidecar_refuses_to_steal_a_live_socket(sidecar) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "faastube.cli", "sidecar", "--socket", str(sidecar.socket_path),
                          "--backend", "host"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "already listening" in out.stderr
    assert sidecar.alive()


def test_a_sidecar_that_never_answers_times_out_with_a_clear_error(tmp_path) -> None:
    import time

    path = tmp_path / "mute.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        start = time.monotonic()
        with pytest.raises(errors.Unavailable, match="no reply from the sidecar within 300 ms"):
            ftc.connect(path, timeout_s=0.3)
        assert time.monotonic() - start < 5
    finally:
        listener.close()
