"""WorkerPool's load counters and membership, against fake workers on real Unix sockets.

A fake worker answers ``POST /call`` only when the test releases that call, so the test
can hold calls running and waiting and read the counters in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
from aiohttp import web
from faastube import sdk
from faastube_runtime import dag, errors, wire
from faastube_runtime.addresses import Address
from faastube_runtime.invoker import Replica, WorkerPool
from faastube_runtime.load import LoadCounter
from faastube_spec.workflow import parse_workflow

WORKFLOW = parse_workflow({
    "apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "w"},
    "spec": {"slo": "10s", "functions": [{"name": "f", "handler": "m:f", "minReplicas": 0, "maxReplicas": 4}]}})
PLAN = dag.plan_workflow(WORKFLOW)
DEADLINE_S = 10.0


class FakeWorker:
    """Holds each call until ``release`` and then answers with one output ref."""

    def __init__(self, path: str) -> None:
        self.address = Address.unix(path)
        self.calls = 0
        self.forgets: list[str] = []
        self._gates: asyncio.Queue[asyncio.Future[bool]] = asyncio.Queue()
        self._runner: web.AppRunner | None = None

    async def _call(self, request: web.Request) -> web.Response:
        await request.json()
        self.calls += 1
        gate = asyncio.get_running_loop().create_future()
        await self._gates.put(gate)
        if not await gate:
            return web.json_response({"error": "HandlerFailed", "message": "failed on purpose",
                                      "retryable": True}, status=500)
        ref = f"ref-{self.calls}"
        return web.json_response({"outputs": {sdk.GATEWAY_READER: ref}, "refs": [ref],
                                  "timings": {"get_s": 0.0, "compute_s": 0.0, "put_s": 0.0, "wait_s": 0.0}})

    async def _forget(self, request: web.Request) -> web.Response:
        self.forgets.append(wire.parse_forget(await request.json()))
        return web.json_response({})

    async def release(self, *, ok: bool = True) -> None:
        """Let the oldest held call answer, or fail (waits for one to arrive)."""
        async with asyncio.timeout(DEADLINE_S):
            (await self._gates.get()).set_result(ok)

    async def start(self) -> FakeWorker:
        app = web.Application()
        app.router.add_post(wire.CALL_PATH, self._call)
        app.router.add_post(wire.FORGET_PATH, self._forget)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.UnixSite(self._runner, self.address.path).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ftpool", dir="/tmp") as d:
        yield Path(d)


@contextlib.asynccontextmanager
async def workers(socket_dir: Path, count: int) -> AsyncIterator[list[FakeWorker]]:
    started = [await FakeWorker(str(socket_dir / f"w{i}.sock")).start() for i in range(count)]
    try:
        yield started
    finally:
        for w in started:
            await w.stop()


async def discard(_refs: Sequence[str]) -> None:
    return None


def pool_of(replicas: Sequence[FakeWorker]) -> WorkerPool:
    return WorkerPool(PLAN, {"f": [Replica("f", i, w.address) for i, w in enumerate(replicas)]},
                      discard=discard, require_all=False)


def call(pool: WorkerPool, n: int, *, timeout_s: float = DEADLINE_S) -> asyncio.Task[dag.CallOutcome]:
    return asyncio.ensure_future(pool.invoke("f", {sdk.REQUEST_INPUT: "in"}, request_id=f"r{n}", attempt=1,
                                             final=True, timeout_s=timeout_s))


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition()`` until true (generous deadline; no timing asserted)."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not reached in {DEADLINE_S}s: {what}") from None


def counts(pool: WorkerPool) -> tuple[int, int]:
    reading = pool.load("f")
    return reading.in_flight, reading.waiting


async def test_calls_count_as_in_flight_on_a_replica_and_waiting_beyond_it(socket_dir: Path) -> None:
    async with workers(socket_dir, 1) as (worker,), pool_of([worker]) as pool:
        assert counts(pool) == (0, 0)
        tasks = [call(pool, n) for n in range(3)]
        await until(lambda: counts(pool) == (1, 2), "one running, two waiting")
        await worker.release()
        await until(lambda: counts(pool) == (1, 1), "the next one runs")
        await worker.release()
        await worker.release()
        await asyncio.gather(*tasks)
        assert counts(pool) == (0, 0)
        assert pool.load("f").call_seconds > 0


async def test_two_replicas_carry_two_calls_with_none_waiting(socket_dir: Path) -> None:
    async with workers(socket_dir, 2) as both, pool_of(both) as pool:
        tasks = [call(pool, n) for n in range(2)]
        await until(lambda: counts(pool) == (2, 0), "both running")
        for w in both:
            await w.release()
        await asyncio.gather(*tasks)
        assert counts(pool) == (0, 0)


async def test_a_call_given_up_on_stays_in_flight_until_its_worker_answers(socket_dir: Path) -> None:
    async with workers(socket_dir, 1) as (worker,), pool_of([worker]) as pool:
        task = call(pool, 1)
        await until(lambda: counts(pool) == (1, 0), "running")
        task.cancel()  # the gateway's timeout: the worker is still busy with it
        with pytest.raises(asyncio.CancelledError):
            await task
        assert counts(pool) == (1, 0)
        await worker.release()
        await pool.drain()
        assert counts(pool) == (0, 0)


async def test_a_call_for_a_function_without_replicas_waits_says_so_and_runs_once_one_joins(
        socket_dir: Path) -> None:
    starved: list[str] = []
    async with workers(socket_dir, 1) as (worker,), pool_of([]) as pool:
        pool.watch_starvation(starved.append)
        task = call(pool, 1)
        await until(lambda: counts(pool) == (0, 1), "waiting")
        assert starved == ["f"]
        replica = pool.join("f", worker.address)
        assert pool.join("f", worker.address) is replica  # idempotent
        await until(lambda: counts(pool) == (1, 0), "running on the new replica")
        await worker.release()
        outcome = await task
        assert outcome.outputs == {sdk.GATEWAY_READER: "ref-1"}


async def test_a_call_waiting_for_a_function_with_no_replica_times_out_within_its_deadline(
        socket_dir: Path) -> None:
    async with pool_of([]) as pool:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await call(pool, 1)
        assert counts(pool) == (0, 0)


async def test_leave_stops_new_calls_at_once_and_returns_after_the_running_call(socket_dir: Path) -> None:
    async with workers(socket_dir, 2) as (old, new), pool_of([old]) as pool:
        running = call(pool, 1)
        await until(lambda: counts(pool) == (1, 0), "running on the old replica")
        leaving = asyncio.ensure_future(pool.leave("f", old.address))
        await until(lambda: not pool.replicas("f"), "removed from the members")
        assert not leaving.done()  # its call is still running
        pool.join("f", new.address)
        second = call(pool, 2)
        await until(lambda: new.calls == 1, "the next call goes to the new replica")
        await old.release()
        await running
        async with asyncio.timeout(DEADLINE_S):
            await leaving
        await new.release()
        await second
        assert old.calls == 1
        await pool.leave("f", Address.unix("/nonexistent"))  # not a member: nothing to do


async def test_leave_waits_for_the_reads_a_failed_call_kept_until_the_request_forgets_them(
        socket_dir: Path) -> None:
    async with workers(socket_dir, 1) as (worker,), pool_of([worker]) as pool:
        failing = call(pool, 7)
        await worker.release(ok=False)
        with pytest.raises(errors.CallFailed):
            await failing
        # The worker keeps that call's reads for a retry: stopping it now would lose them.
        leaving = asyncio.ensure_future(pool.leave("f", worker.address))
        await asyncio.sleep(0.05)
        assert not leaving.done() and counts(pool) == (0, 0)
        pool.forget("r7")  # the request ended
        async with asyncio.timeout(DEADLINE_S):
            await leaving
        assert worker.forgets == ["r7"]  # told before leave returned


async def test_leaving_an_idle_replica_returns_at_once(socket_dir: Path) -> None:
    async with workers(socket_dir, 1) as (worker,), pool_of([worker]) as pool:
        async with asyncio.timeout(DEADLINE_S):
            await pool.leave("f", worker.address)
        assert pool.replicas("f") == ()


async def test_membership_changes_name_unknown_functions() -> None:
    async with pool_of([]) as pool:
        with pytest.raises(errors.BadInput, match="unknown function"):
            pool.join("nope", Address.unix("/x"))


def test_the_counter_integrates_concurrency_over_time() -> None:
    now = [0.0]
    counter = LoadCounter(clock=lambda: now[0])
    start = counter.read()
    counter.call_started()  # 1 from t=0
    now[0] = 2.0
    counter.wait_started()  # 2 from t=2
    now[0] = 3.0
    counter.wait_ended()
    counter.call_started()  # still 2 from t=3
    now[0] = 4.0
    counter.call_ended()
    counter.call_ended()  # 0 from t=4
    now[0] = 10.0
    end = counter.read()
    assert (end.in_flight, end.waiting) == (0, 0)
    assert end.call_seconds == pytest.approx(1 * 2 + 2 * 1 + 2 * 1)
    assert end.average_since(start) == pytest.approx(6 / 10)
    assert end.average_since(end) == 0.0  # no time passed: the count now
