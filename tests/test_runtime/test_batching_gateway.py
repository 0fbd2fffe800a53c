"""Batching end to end: the gateway keeps maxSize calls in flight per replica, the worker
gathers them, each request gets its own answer, and the gateway reports batch sizes."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

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
