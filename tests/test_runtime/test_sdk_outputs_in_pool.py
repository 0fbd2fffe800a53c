"""`faastube.output()`: a handler writes its result straight into pool memory (real sidecar)."""

from __future__ import annotations

import faastube
import faastube.client as ftc
import numpy as np
import pytest
from faastube import sdk


def _used(client) -> int:
    return sum(p["used_bytes"] for p in client.stats()["pools"])


def test_an_output_written_into_pool_memory_is_published_without_a_copy(sidecar) -> None:
    seen = {}

    def double(x):
        out = faastube.output(x.shape, x.dtype)
        np.multiply(x, 2, out=out)
        seen["out"] = out
        return out

    with ftc.connect(sidecar.socket_path, workflow="w") as client:
        ref = client.put(np.arange(10, dtype=np.int64))
        call = sdk.execute(client, double, inputs={"a": ref}, readers=["b", "c"])
        out_ref = call.outputs["b"]
        assert call.outputs["c"] == out_ref and client.stat(out_ref).consumers_left == 2
        result = client.get(out_ref, copy=True)
        assert np.array_equal(result, np.arange(10) * 2)
        # The handler's array is the stored object's memory: a later write shows through.
        view = client.get(out_ref)
        seen["out"][0] = 99
        assert view[0] == 99


def test_outputs_a_handler_did_not_return_are_given_back(sidecar) -> None:
    def wasteful(x):
        faastube.output((1 << 20,), np.uint8)      # allocated, never returned
        return x + 1

    with ftc.connect(sidecar.socket_path, workflow="w") as client:
        ref = client.put(np.ones(4))
        base = _used(client)
        call = sdk.execute(client, wasteful, inputs={"a": ref}, readers=["b"])
        client.free(call.outputs["b"])
        assert _used(client) <= base, "the unused output allocation was freed"


def test_a_failing_handler_leaks_no_output_memory(sidecar) -> None:
    def broken(x):
        faastube.output((1 << 20,), np.uint8)
        raise RuntimeError("boom")

    with ftc.connect(sidecar.socket_path, workflow="w") as client:
        ref = client.put(np.ones(4))
        base = _used(client)
        with pytest.raises(sdk.HandlerFailed, match="boom"):
            sdk.execute(client, broken, inputs={"a": ref}, readers=["b"])
        assert _used(client) == base


def test_outside_the_runtime_output_is_a_plain_array() -> None:
    out = faastube.output((2, 3), np.float32)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3) and out.dtype == np.float32


def test_host_centric_passing_copies_as_the_baseline_does(sidecar) -> None:
    kinds = []

    def f(x):
        out = faastube.output(x.shape, x.dtype)
        kinds.append(type(out.base).__name__ if out.base is not None else "own")
        out[...] = x
        return out

    with ftc.connect(sidecar.socket_path, workflow="w") as client:
        ref = client.put(np.ones(4))
        call = sdk.execute(client, f, inputs={"a": ref}, readers=["b"], passing="host-centric")
        assert np.array_equal(client.get(call.outputs["b"], copy=True), np.ones(4))
    assert kinds == ["own"], "a plain NumPy array, not pool memory"
