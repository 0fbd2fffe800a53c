"""Batching end to end: the gateway keeps maxSize calls in flight per replica, the worker
gathers them, each request gets its own answer, and the gateway reports batch sizes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from faastube_runtime.local import LocalOptions, LocalRuntime
from faastube_spec.workflow import load_workflow

pytestmark = [pytest.mark.slow]

FIXTURE = Path(__file__).parent / "batch_fixture" / "workflow.yaml"


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def metric(text: str, name: str, function: str) -> float:
    match = re.search(rf'^{name}{{function="{function}",workflow="batchtest"}} (\S+)$', text, re.M)
    assert match is not None, f"{name} for {function} not in the metrics"
    return float(match.group(1))


async def test_concurrent_requests_are_batched_and_each_gets_its_own_answer() -> None:
    async with LocalRuntime(load_workflow(FIXTURE), LocalOptions(backend="host")) as rt, \
            aiohttp.ClientSession() as http:
        async def invoke(i: int) -> np.ndarray:
            async with http.post(f"{rt.url}/invoke", data=npy(np.full((1, 4), float(i)))) as r:
                assert r.status == 200, await r.text()
                return np.load(io.BytesIO(await r.read()))

        outputs = await asyncio.gather(*(invoke(i) for i in range(8)))
        for i, out in enumerate(outputs):
            np.testing.assert_array_equal(out, np.full((1, 4), i * 10.0 + 1))
        async with http.get(f"{rt.url}/metrics") as r:
            text = await r.text()
        assert metric(text, "faastube_gateway_batch_size_count", "scale") == 8
        batched = metric(text, "faastube_gateway_batch_size_sum", "scale")
        assert 8 < batched <= 8 * 4  # calls ran in batches of up to maxSize 4
        assert metric(text, "faastube_gateway_batch_size_sum", "shift") == 8  # not batched: one by one
        # every worker was warm before the first request, the batched one on a full batch too
        assert rt.warmup["scale"][0]["batch_call_s"] is not None
        assert rt.warmup["shift"][0]["call_s"] is not None
        await rt.drain()
        stats = rt.pool_stats()
        assert stats["objects"] == 0, stats


class FakeWorker:
    """A worker's HTTP side only: counts calls in flight and holds each until ``gate`` is set or
    ``release`` lets it go."""

    def __init__(self, folder: Path) -> None:
        self.socket = str(folder / "m.sock")
        self.in_flight = 0
        self.most = 0
        self.gate = asyncio.Event()
        self.release = asyncio.Semaphore(0)

    async def call(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            gate, one = asyncio.ensure_future(self.gate.wait()), asyncio.ensure_future(self.release.acquire())
            _, pending = await asyncio.wait({gate, one}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        finally:
            self.in_flight -= 1
        ref = f"ft-{body['request_id']}"
        return web.json_response({"outputs": {"$gateway": ref}, "refs": [ref], "batch_size": 3,
                                  "timings": {"get_s": 0, "compute_s": 0, "put_s": 0, "wait_s": 0}})

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[FakeWorker]:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/call", self.call)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, self.socket).start()
        try:
            yield self
        finally:
            await runner.cleanup()


def batched_plan() -> Any:
    from faastube_runtime import dag
    from faastube_spec.workflow import parse_workflow

    wf = parse_workflow({"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "p"},
                         "spec": {"slo": "10s", "functions": [{"name": "model", "handler": "m:f",
                                                               "batch": {"maxSize": 3}}]}})
    plan = dag.plan_workflow(wf)
    assert plan.function("model").max_batch == 3
    return plan


async def discard(refs: object) -> None:
    return None


async def test_the_pool_keeps_max_size_calls_in_flight_per_replica_and_no_more(tmp_path: Path) -> None:
    from faastube_runtime.addresses import Address
    from faastube_runtime.invoker import Replica, WorkerPool

    async with FakeWorker(tmp_path).serving() as worker:
        replica = Replica("model", 0, Address.unix(worker.socket))
        async with WorkerPool(batched_plan(), {"model": [replica]}, discard=discard) as pool:
            assert pool.waiting("model") == 3  # three slots for the one replica
            calls = [asyncio.ensure_future(pool.invoke("model", {"$input": "ft-in"}, request_id=f"r{i}",
                                                       attempt=1, final=True, timeout_s=10))
                     for i in range(7)]
            while worker.in_flight < 3:
                await asyncio.sleep(0.01)
            worker.gate.set()
            outcomes = await asyncio.gather(*calls)
            assert worker.most == 3
            assert [o.batch_size for o in outcomes] == [3] * 7
            assert pool.waiting("model") == 3  # every slot came back


async def test_a_replica_that_leaves_finishes_every_call_it_holds(tmp_path: Path) -> None:
    from faastube_runtime.addresses import Address
    from faastube_runtime.invoker import Replica, WorkerPool

    async with FakeWorker(tmp_path).serving() as worker:
        replica = Replica("model", 0, Address.unix(worker.socket))
        async with WorkerPool(batched_plan(), {"model": [replica]}, discard=discard) as pool:
            calls = [asyncio.ensure_future(pool.invoke("model", {"$input": "ft-in"}, request_id=f"r{i}",
                                                       attempt=1, final=True, timeout_s=10))
                     for i in range(3)]
            while worker.in_flight < 3:
                await asyncio.sleep(0.01)
            pool.set_replicas("model", [])  # its pod went away with three calls on it
            worker.release.release()
            done, _ = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1  # one call back, two still on the replica
            worker.gate.set()
            outcomes = await asyncio.gather(*calls)  # its connection stayed open until the last one
            assert [o.outputs["$gateway"] for o in outcomes] == ["ft-r0", "ft-r1", "ft-r2"]
            assert pool.replicas("model") == () and pool.waiting("model") == 0
