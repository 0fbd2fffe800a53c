"""Dynamic batching: gathering queued calls, stacking and splitting, errors and deadlines.

The gathering policy is tested on its own (``Batcher``); everything else against a real
sidecar (host backend) and a real worker served over its Unix socket, with handlers that
record how they were called.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import faastube
import numpy as np
import pytest
import worker_harness
from faastube import client as ft_client
from faastube import sdk
from faastube_runtime import batcher, wire
from faastube_spec.workflow import Workflow, parse_workflow
from sidecar_subprocess import running_sidecar

WORKFLOW = "bt"


# --- the gathering policy ------------------------------------------------------------------------

async def gather_batches(policy: batcher.BatchPolicy, arrivals: list[float]) -> list[list[int]]:
    """Submit item i after arrivals[i] seconds; the batches they ran in (handler runs 50 ms)."""
    seen: list[list[int]] = []
    done = asyncio.Event()

    async def run(batch: list[int]) -> None:
        seen.append(batch)
        if sum(len(b) for b in seen) == len(arrivals):
            done.set()
        await asyncio.sleep(0.05)

    b: batcher.Batcher[int] = batcher.Batcher(policy, run)
    task = asyncio.ensure_future(b.run_forever())
    start = asyncio.get_running_loop().time()
    for i, at in enumerate(arrivals):
        await asyncio.sleep(max(0.0, start + at - asyncio.get_running_loop().time()))
        b.submit(i)
    await asyncio.wait_for(done.wait(), 30)
    task.cancel()
    return seen


async def test_queued_calls_are_gathered_up_to_max_size() -> None:
    seen = await gather_batches(batcher.BatchPolicy(max_size=4, max_delay_s=30.0), [0.0] * 8)
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7]]


async def test_a_batch_never_holds_more_than_max_size() -> None:
    seen = await gather_batches(batcher.BatchPolicy(max_size=3, max_delay_s=0.2), [0.0] * 7)
    assert [len(b) for b in seen] == [3, 3, 1]
    assert [i for b in seen for i in b] == list(range(7))  # in arrival order


async def test_a_call_arriving_within_max_delay_of_the_first_joins_its_batch() -> None:
    seen = await gather_batches(batcher.BatchPolicy(max_size=3, max_delay_s=30.0), [0.0, 0.1, 0.2])
    assert seen == [[0, 1, 2]]  # the first waited for company, and the batch filled up


async def test_the_first_call_waits_at_most_max_delay_for_company() -> None:
    seen = await gather_batches(batcher.BatchPolicy(max_size=8, max_delay_s=0.05), [0.0, 1.0])
    assert seen == [[0], [1]]  # the second came after the first's wait was over


async def test_calls_that_queued_while_a_batch_ran_go_together_without_waiting_again() -> None:
    # Item 0 runs alone (nothing else queued within 0 s); 1..3 queue during its run and form the next
    # batch at once, although it is not full and max_delay is 0.
    seen = await gather_batches(batcher.BatchPolicy(max_size=8, max_delay_s=0.0), [0.0, 0.01, 0.01, 0.01])
    assert seen == [[0], [1, 2, 3]]


async def test_without_a_policy_calls_run_one_at_a_time() -> None:
    seen = await gather_batches(batcher.BatchPolicy(), [0.0] * 3)
    assert seen == [[0], [1], [2]]


# --- a real worker -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sidecar_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("bsock") / "sidecar.sock")
    with running_sidecar(path, backend="host", start_timeout_s=30):
        yield path


def workflow(batch: dict[str, Any] | None, *, readers: tuple[str, ...] = ("sink",),
             inputs: tuple[str, ...] = ("src",)) -> Workflow:
    """``inputs`` -> model (with ``batch``) -> ``readers``; several inputs share an entry, several
    readers an exit."""
    model: dict[str, Any] = {"name": "model", "handler": "m:f"}
    if batch is not None:
        model["batch"] = batch
    entry = [] if len(inputs) == 1 else ["entry"]
    exit_ = [] if len(readers) == 1 else ["end"]
    functions = [{"name": n, "handler": "m:f"} for n in (*entry, *inputs)] + [model] + \
        [{"name": n, "handler": "m:f"} for n in (*readers, *exit_)]
    edges = [{"from": "entry", "to": i, "size": 8} for i in inputs if entry] + \
        [{"from": i, "to": "model", "size": 8} for i in inputs] + \
        [{"from": "model", "to": r, "size": 8} for r in readers] + \
        [{"from": r, "to": "end", "size": 8} for r in readers if exit_]
    return parse_workflow({"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow",
                           "metadata": {"name": WORKFLOW},
                           "spec": {"slo": "60s", "functions": functions, "edges": edges}})


@contextlib.asynccontextmanager
async def serve(sidecar_socket: str, tmp_path: Path, wf: Workflow,
                handler: Callable[..., Any]) -> AsyncIterator[worker_harness.Served]:
    async with worker_harness.serve(sidecar_socket, tmp_path, wf, "model", handler,
                                    tester_function="src") as served:
        yield served


def _rows(array: Any) -> int:
    return int(array.shape[0]) if array.ndim else 0


class Recorder:
    """A handler's calls: the rows (axis 0) of its first input, and whether it was pool memory."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls: list[Any] = []
        options = sdk.options_of(fn)  # declared on fn: keep them
        sdk.function(framework=options.framework, warmup=options.warmup, batch=options.batch)(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else next(iter(kwargs.values()))
        self.calls.append([_rows(a) for a in first] if isinstance(first, list) else _rows(first))
        return self.fn(*args, **kwargs)


async def test_concurrent_calls_become_one_handler_call_over_all_their_rows(sidecar_socket: str,
                                                                            tmp_path: Path) -> None:
    handler = Recorder(lambda x: x * 2)
    inputs = [np.full((rows, 3), i, dtype=np.float32) for i, rows in enumerate((1, 2, 3, 1))]
    async with serve(sidecar_socket, tmp_path, workflow({"maxSize": 4, "maxDelay": "30s"}), handler) as s:
        replies = await asyncio.gather(*(s.call(a) for a in inputs))
        assert handler.calls == [7]  # one call, 1 + 2 + 3 + 1 rows
        for a, (status, body) in zip(inputs, replies):
            assert status == 200, body
            assert body["batch_size"] == 4
            np.testing.assert_array_equal(s.read(body["outputs"]["sink"]), a * 2)  # exactly its rows
        # the batch's compute time is shared: every call reports the same
        assert len({body["timings"]["compute_s"] for _, body in replies}) == 1


async def test_a_batch_holds_at_most_max_size_calls(sidecar_socket: str, tmp_path: Path) -> None:
    handler = Recorder(lambda x: x + 1)
    async with serve(sidecar_socket, tmp_path, workflow({"maxSize": 2, "maxDelay": "200ms"}), handler) as s:
        replies = await asyncio.gather(*(s.call(np.full((1, 2), i, dtype=np.int64)) for i in range(5)))
        assert all(status == 200 for status, _ in replies)
        assert sorted(handler.calls) == [1, 2, 2] and sum(handler.calls) == 5
        assert sorted(body["batch_size"] for _, body in replies) == [1, 2, 2, 2, 2]
        for i, (_, body) in enumerate(replies):
            np.testing.assert_array_equal(s.read(body["outputs"]["sink"]), np.full((1, 2), i + 1))


async def test_a_lone_call_runs_once_max_delay_has_passed(sidecar_socket: str, tmp_path: Path) -> None:
    handler = Recorder(lambda x: x)
    async with serve(sidecar_socket, tmp_path, workflow({"maxSize": 8, "maxDelay": "50ms"}), handler) as s:
        status, body = await s.call(np.ones((3, 1)))
        assert status == 200 and body["batch_size"] == 1 and handler.calls == [3]
        # the wait for company is queueing, reported as such
        assert body["timings"]["wait_s"] > 0


async def test_without_a_policy_concurrent_calls_run_one_by_one(sidecar_socket: str, tmp_path: Path) -> None:
    handler = Recorder(lambda x: x)
    async with serve(sidecar_socket, tmp_path, workflow(None), handler) as s:
        replies = await asyncio.gather(*(s.call(np.ones((2, 2))) for _ in range(3)))
        assert handler.calls == [2, 2, 2] and all(body["batch_size"] == 1 for _, body in replies)


async def test_each_request_gets_its_own_rows_for_each_reader(sidecar_socket: str, tmp_path: Path) -> None:
    handler = Recorder(lambda x: {"left": x + 1, "right": x * 10})
    wf = workflow({"maxSize": 3, "maxDelay": "30s"}, readers=("left", "right"))
    inputs = [np.arange(rows * 2, dtype=np.float64).reshape(rows, 2) + 100 * rows for rows in (2, 1, 3)]
    async with serve(sidecar_socket, tmp_path, wf, handler) as s:
        replies = await asyncio.gather(*(s.call(a) for a in inputs))
        assert handler.calls == [6]
        seen_refs: set[str] = set()
        for a, (status, body) in zip(inputs, replies):
            assert status == 200, body
            left, right = body["outputs"]["left"], body["outputs"]["right"]
            assert sorted(body["refs"]) == sorted([left, right])
            assert s.tester.stat(left).consumers_left == 1 and s.tester.stat(right).consumers_left == 1
            np.testing.assert_array_equal(s.read(left), a + 1)
            np.testing.assert_array_equal(s.read(right), a * 10)
            seen_refs |= {left, right}
        assert len(seen_refs) == 6  # every request's outputs are objects of their own


async def test_one_output_for_two_readers_is_one_object_per_request_read_twice(sidecar_socket: str,
                                                                                tmp_path: Path) -> None:
    handler = Recorder(lambda x: x - 1)
    wf = workflow({"maxSize": 2, "maxDelay": "30s"}, readers=("left", "right"))
    async with serve(sidecar_socket, tmp_path, wf, handler) as s:
        replies = await asyncio.gather(*(s.call(np.full((1, 4), v)) for v in (5.0, 7.0)))
        assert handler.calls == [2]
        for v, (_, body) in zip((5.0, 7.0), replies):
            ref = body["outputs"]["left"]
            assert body["outputs"]["right"] == ref and body["refs"] == [ref]
            assert s.tester.stat(ref).consumers_left == 2
            np.testing.assert_array_equal(s.read(ref), np.full((1, 4), v - 1))


async def test_an_output_with_k_rows_per_input_row_is_split_k_rows_per_input_row(sidecar_socket: str,
                                                                                tmp_path: Path) -> None:
    handler = Recorder(lambda x: np.repeat(x, 3, axis=0))  # three crops per frame
    inputs = [np.full((rows, 2), rows, dtype=np.int32) for rows in (1, 2)]
    async with serve(sidecar_socket, tmp_path, workflow({"maxSize": 2, "maxDelay": "30s"}), handler) as s:
        replies = await asyncio.gather(*(s.call(a) for a in inputs))
        assert handler.calls == [3]
        for a, (_, body) in zip(inputs, replies):
            np.testing.assert_array_equal(s.read(body["outputs"]["sink"]), np.repeat(a, 3, axis=0))


async def test_fan_in_inputs_are_stacked_input_by_input(sidecar_socket: str, tmp_path: Path) -> None:
    handler = Recorder(lambda a, b: a * b)
    wf = workflow({"maxSize": 2, "maxDelay": "30s"}, inputs=("a", "b"))
    requests = [{"a": np.full((2, 2), 2.0), "b": np.full((2, 2), 3.0)},
                {"a": np.full((1, 2), 5.0), "b": np.full((1, 2), 7.0)}]
    async with serve(sidecar_socket, tmp_path, wf, handler) as s:
        replies = await asyncio.gather(*(s.call(r) for r in requests))
        assert handler.calls == [3]
        for r, (_, body) in zip(requests, replies):
            np.testing.assert_array_equal(s.read(body["outputs"]["sink"]), r["a"] * r["b"])


async def test_inputs_that_cannot_stack_run_in_a_batch_of_their_own(sidecar_socket: str, tmp_path: Path) -> None:
    handler = Recorder(lambda x: x * 2)
    inputs = [np.ones((2, 3), np.float32), np.ones((1, 3), np.float32),   # these two stack
              np.ones((2, 4), np.float32),                                 # another row shape
              np.ones((1, 3), np.int32),                                   # another dtype
              np.array(5.0, np.float32)]                                   # no axis 0 at all
    async with serve(sidecar_socket, tmp_path, workflow({"maxSize": 5, "maxDelay": "30s"}), handler) as s:
        replies = await asyncio.gather(*(s.call(a) for a in inputs))
        assert [status for status, _ in replies] == [200] * 5
        assert [body["batch_size"] for _, body in replies] == [2, 2, 1, 1, 1]
        assert handler.calls == [3, 2, 1, 0]  # the pair's 3 rows, then each misfit alone
        for a, (_, body) in zip(inputs, replies):
            out = s.read(body["outputs"]["sink"])
            assert out.dtype == a.dtype and out.shape == a.shape
            np.testing.assert_array_equal(out, a * 2)


def fails_on_100(x: np.ndarray) -> np.ndarray:
    if (x == 100).any():
        raise RuntimeError("a request with 100 in it")
    return x + 1


async def test_a_failing_request_fails_alone_and_the_others_are_served(sidecar_socket: str,
                                                                        tmp_path: Path) -> None:
    handler = Recorder(fails_on_100)
    values = [1.0, 100.0, 3.0, 4.0]
    async with serve(sidecar_socket, tmp_path, workflow({"maxSize": 4, "maxDelay": "30s"}), handler) as s:
        replies = await asyncio.gather(*(s.call(np.full((1, 2), v), request_id=f"q{i}")
                                         for i, v in enumerate(values)))
        # one batched call that raised, then each request alone
        assert handler.calls == [4, 1, 1, 1, 1]
        statuses = [status for status, _ in replies]
        assert statuses == [200, 500, 200, 200]
        failed = replies[1][1]
        assert failed["error"] == "HandlerFailed" and "a request with 100 in it" in failed["message"]
        assert failed["retryable"] is True
        for v, (status, body) in zip(values, replies):
            if status == 200:
                assert body["batch_size"] == 1
                np.testing.assert_array_equal(s.read(body["outputs"]["sink"]), np.full((1, 2), v + 1))
        # the failed request's input is kept for its retry (as for an unbatched call); the others' were read
        assert s.tester.stat(s.inputs["q1"]["src"]).readers == 1
        for i in (0, 2, 3):
            with pytest.raises(Exception, match="not found"):
                s.tester.stat(s.inputs[f"q{i}"]["src"])
        _, body = await s.post(wire.FORGET_PATH, {"request_id": "q1"})
        assert body == {"dropped": 1}


async def test_a_result_that_cannot_be_split_runs_the_requests_one_by_one(sidecar_socket: str,
                                                                         tmp_path: Path) -> None:
    handler = Recorder(lambda x: x.sum(axis=0))  # mixes the batch's rows: not batch-safe
    inputs = [np.full((2, 4), 1.0), np.full((1, 4), 4.0)]  # a sum of 4 values does not split into 3 rows
    async with serve(sidecar_socket, tmp_path, workflow({"maxSize": 2, "maxDelay": "30s"}), handler) as s:
        replies = await asyncio.gather(*(s.call(a) for a in inputs))
        assert handler.calls == [3, 2, 1]
        for a, (status, body) in zip(inputs, replies):
            assert status == 200 and body["batch_size"] == 1
            np.testing.assert_array_equal(s.read(body["outputs"]["sink"]), a.sum(axis=0))


async def test_a_call_whose_deadline_passed_while_queued_fails_alone(sidecar_socket: str,
                                                                    tmp_path: Path) -> None:
    release = threading.Event()

    def slow_first(x: np.ndarray) -> np.ndarray:
        if (x == -1).any():
            release.wait(30)
        return x * 3

    handler = Recorder(slow_first)
    async with serve(sidecar_socket, tmp_path, workflow({"maxSize": 4, "maxDelay": "0s"}), handler) as s:
        blocker = asyncio.ensure_future(s.call(np.full((1, 1), -1.0)))
        while not handler.calls:  # the first call is running (and blocks the handler thread)
            await asyncio.sleep(0.01)
        expiring = asyncio.ensure_future(s.call(np.full((1, 1), 2.0), timeout_s=0.05, final=True))
        healthy = asyncio.ensure_future(s.call(np.full((1, 1), 5.0)))
        while s.worker.queued < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # past the short call's deadline, still queued
        release.set()
        (s1, b1), (s2, b2), (s3, b3) = await asyncio.gather(blocker, expiring, healthy)
        assert (s1, s2, s3) == (200, 504, 200)
        assert b2["error"] == "CallExpired" and "waited past its deadline" in b2["message"]
        assert b3["batch_size"] == 1  # its batch-mate expired before the batch ran
        np.testing.assert_array_equal(s.read(b3["outputs"]["sink"]), np.full((1, 1), 15.0))
        assert handler.calls == [1, 1]


async def test_a_list_mode_handler_gets_each_requests_pool_views_and_returns_a_list(sidecar_socket: str,
                                                                                  tmp_path: Path) -> None:
    @sdk.function(batch="list")
    def per_request(xs: list[np.ndarray]) -> list[np.ndarray]:
        # zero-copy views of each request's input in pool memory (read-only), shapes free to differ
        assert all(isinstance(x, np.ndarray) and not x.flags.writeable for x in xs)
        return [x * 2 for x in xs]

    handler = Recorder(per_request)
    inputs = [np.ones((2, 3), np.float32), np.ones((1, 5), np.float32), np.arange(4, dtype=np.int16)]
    async with serve(sidecar_socket, tmp_path, workflow({"maxSize": 3, "maxDelay": "30s"}), handler) as s:
        replies = await asyncio.gather(*(s.call(a) for a in inputs))
        assert handler.calls == [[2, 1, 4]]
        for a, (status, body) in zip(inputs, replies):
            assert status == 200 and body["batch_size"] == 3, body
            np.testing.assert_array_equal(s.read(body["outputs"]["sink"]), a * 2)


async def test_a_list_mode_handler_gets_a_list_of_one_without_a_batch_policy(sidecar_socket: str,
                                                                           tmp_path: Path) -> None:
    handler = Recorder(sdk.function(batch="list")(lambda xs: [x + 1 for x in xs]))
    async with serve(sidecar_socket, tmp_path, workflow(None), handler) as s:
        status, body = await s.call(np.zeros((2, 2)))
        assert status == 200 and handler.calls == [[2]]
        np.testing.assert_array_equal(s.read(body["outputs"]["sink"]), np.ones((2, 2)))


async def test_a_list_mode_request_that_raises_fails_alone(sidecar_socket: str, tmp_path: Path) -> None:
    @sdk.function(batch="list")
    def strict(xs: list[np.ndarray]) -> list[np.ndarray]:
        return [fails_on_100(x) for x in xs]

    handler = Recorder(strict)
    async with serve(sidecar_socket, tmp_path, workflow({"maxSize": 3, "maxDelay": "30s"}), handler) as s:
        replies = await asyncio.gather(*(s.call(np.full((1,), v)) for v in (1.0, 100.0, 2.0)))
        assert [status for status, _ in replies] == [200, 500, 200]
        assert handler.calls == [[1, 1, 1], [1], [1], [1]]


async def test_a_list_mode_handler_must_return_one_result_per_request(sidecar_socket: str,
                                                                      tmp_path: Path) -> None:
    handler = Recorder(sdk.function(batch="list")(lambda xs: xs[0] * 2))  # an array, not a list
    async with serve(sidecar_socket, tmp_path, workflow(None), handler) as s:
        status, body = await s.call(np.zeros((2, 2)))
        assert status == 422 and body["error"] == "HandlerContractError"
        assert "must return a list with one result per request (1), got ndarray" in body["message"]


# --- the SDK alone: outputs written into pool memory ---------------------------------------------

def test_a_batch_of_one_publishes_an_output_in_pool_memory_without_a_copy(sidecar: Any) -> None:
    def double(x: np.ndarray) -> np.ndarray:
        out = faastube.output(x.shape, x.dtype)
        np.multiply(x, 2, out=out)
        return out

    with ft_client.connect(sidecar.socket_path, workflow="w") as client:
        ref = client.put(np.arange(6.0))
        (inv,) = sdk.execute_batch(client, double, [sdk.Call({"a": ref})], readers=["b"])
        assert isinstance(inv, sdk.Invocation) and inv.batch_size == 1
        view = client.get(inv.outputs["b"])
        assert not view.flags.writeable and np.array_equal(view, np.arange(6.0) * 2)


def test_a_batched_output_in_pool_memory_is_split_into_objects_and_given_back(sidecar: Any) -> None:
    def double(x: np.ndarray) -> np.ndarray:
        out = faastube.output(x.shape, x.dtype)
        np.multiply(x, 2, out=out)
        return out

    with ft_client.connect(sidecar.socket_path, workflow="w") as client:
        refs = [client.put(np.full((n, 2), float(n)), consumers=1) for n in (1, 2, 3)]
        base = sum(p["used_bytes"] for p in client.stats()["pools"])
        outcomes = sdk.execute_batch(client, double, [sdk.Call({"a": r}) for r in refs], readers=["b"])
        for n, inv in zip((1, 2, 3), outcomes):
            assert isinstance(inv, sdk.Invocation) and inv.batch_size == 3
            assert np.array_equal(client.get(inv.outputs["b"], copy=True), np.full((n, 2), 2.0 * n))  # its one read
        client.flush()
        stats = client.stats()
        assert stats["objects"] == 0
        assert sum(p["used_bytes"] for p in stats["pools"]) <= base  # the batch's own allocation went back too


def test_the_warm_up_call_runs_the_handler_on_zeros_and_publishes_nothing(sidecar: Any) -> None:
    seen: list[tuple[tuple[int, ...], str, bool]] = []

    def model(x: np.ndarray) -> np.ndarray:
        seen.append((x.shape, str(x.dtype), bool((x == 0).all())))
        out = faastube.output(x.shape, x.dtype)
        out[...] = x
        return out

    with ft_client.connect(sidecar.socket_path, workflow="w") as client:
        sdk.warm_up_call(client, model, inputs={"a": ((2, 3), "float32")}, readers=["b"])
        sdk.warm_up_call(client, model, inputs={"a": ((2, 3), "float32")}, readers=["b"], requests=4)
        client.flush()
        assert client.stats()["objects"] == 0
    assert seen == [((2, 3), "float32", True), ((8, 3), "float32", True)]


def test_a_warm_up_call_that_breaks_the_calling_convention_fails_warm_up(sidecar: Any) -> None:
    with ft_client.connect(sidecar.socket_path, workflow="w") as client:
        with pytest.raises(sdk.WarmupFailed, match="a handler output must be an array"):
            sdk.warm_up_call(client, lambda x: "not an array", inputs={"a": ((1,), "uint8")}, readers=["b"])
