"""When a read counts: every way a lease ends normally counts once; a crash counts none."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import faastube.client as ftc
import numpy as np
import pytest
from faastube import errors


def _consumed(owner: ftc.Client, ref: str, *, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            owner.stat(ref)
        except errors.RefNotFound as e:
            assert "consumed" in str(e)
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def pair(sidecar):
    with ftc.connect(sidecar.socket_path, workflow="w", function="producer") as p:
        yield p, sidecar.socket_path


def test_release_counts_the_read(pair) -> None:
    p, path = pair
    ref = p.put(np.arange(100), consumers=1)
    with ftc.connect(path, workflow="w", function="reader") as r:
        x = r.get(ref, device="cpu")
        r.release(ref)
        assert _consumed(p, ref)
        del x


def test_the_last_view_garbage_collected_counts_the_read_even_if_the_client_then_idles(pair) -> None:
    p, path = pair
    ref = p.put(np.arange(100), consumers=1)
    with ftc.connect(path, workflow="w", function="reader") as r:
        x = r.get(ref, device="cpu")
        y = x[10:20]
        del x
        gc.collect()
        assert not _consumed(p, ref, within_s=0.2), "a derived view still holds the read"
        del y
        gc.collect()
        assert _consumed(p, ref), "counted without another call from the reader"


def test_close_counts_reads_still_open(pair) -> None:
    p, path = pair
    ref = p.put(np.arange(100), consumers=1)
    r = ftc.connect(path, workflow="w", function="reader")
    x = r.get(ref, device="cpu")
    r.close()
    assert _consumed(p, ref)
    del x


def test_del_then_close_counts_once(pair) -> None:
    p, path = pair
    ref = p.put(np.arange(100), consumers=2)
    r = ftc.connect(path, workflow="w", function="reader")
    x = r.get(ref, device="cpu")
    del x
    r.close()
    assert p.stat(ref).consumers_left == 1


def test_a_with_block_counts_its_reads_on_exit(pair) -> None:
    p, path = pair
    ref = p.put(np.arange(100), consumers=1)
    with ftc.connect(path, workflow="w", function="reader") as r:
        x = r.get(ref, device="cpu")
        assert int(x[5]) == 5
    assert _consumed(p, ref)


def _child(path: str, ref: str, ending: str) -> subprocess.Popen[bytes]:
    code = textwrap.dedent(f"""
        import os, signal, sys
        import faastube.client as ftc
        c = ftc.connect({str(path)!r}, workflow="w", function="child")
        x = c.get({ref!r}, device="cpu")
        assert int(x[3]) == 3
        print("read", flush=True)
        if {ending!r} == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if {ending!r} == "exit-code":
            sys.exit(3)
        # "exit": the interpreter simply ends with the view and the client alive
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("ending", ["exit", "exit-code"])
def test_interpreter_exit_counts_the_reads_left_open(pair, ending) -> None:
    p, path = pair
    ref = p.put(np.arange(100), consumers=1)
    child = _child(path, ref, ending)
    out, err = child.communicate(timeout=30)
    assert b"read" in out, err.decode()
    assert _consumed(p, ref)


def test_a_crashed_reader_counts_nothing(pair) -> None:
    p, path = pair
    ref = p.put(np.arange(100), consumers=1)
    child = _child(path, ref, "crash")
    out, _ = child.communicate(timeout=30)
    assert b"read" in out and child.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 2
    while p.stat(ref).readers and time.monotonic() < deadline:
        time.sleep(0.01)
    info = p.stat(ref)
    assert info.readers == 0 and info.consumers_left == 1, "the lease ended uncounted"


def test_reads_ended_as_not_consumed_leave_the_object_for_a_retry(pair) -> None:
    p, path = pair
    ref = p.put(np.arange(100), consumers=1)
    with ftc.connect(path, workflow="w", function="reader") as r:
        x = r.get(ref, device="cpu")
        r.release(ref, consumed=False)
        x = r.get(ref, device="cpu")
        r.release(ref)
        del x
    assert _consumed(p, ref)


def test_a_copy_ends_its_read_at_once(pair) -> None:
    p, path = pair
    ref = p.put(np.arange(100), consumers=1)
    with ftc.connect(path, workflow="w", function="reader") as r:
        x = r.get(ref, device="cpu", copy=True)
        assert x.flags.writeable and x.flags.owndata
        assert _consumed(p, ref)


def test_releasing_what_is_not_held_is_an_error_naming_the_ref(pair) -> None:
    p, path = pair
    ref = p.put(np.arange(10))
    with pytest.raises(errors.InvalidRequest, match=ref):
        p.release(ref)


def test_exiting_without_close_leaves_no_session_behind(pair) -> None:
    p, path = pair
    before = p.stats()["sessions"]
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import faastube.client as ftc
        c = ftc.connect({str(path)!r}, workflow="w")
        c.put(__import__("numpy").arange(4))
    """)], capture_output=True, timeout=30)
    assert child.returncode == 0, child.stderr.decode()
    deadline = time.monotonic() + 2
    while p.stats()["sessions"] != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.stats()["sessions"] == before
    assert os.path.exists(path)
