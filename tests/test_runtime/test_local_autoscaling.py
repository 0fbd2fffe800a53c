"""Local mode scales real worker processes: up under concurrent load, down after it, to zero and back.

A sidecar (host backend), workers and the gateway run as in ``faastube run``, with
windows of a second or two so that a test takes seconds. Nothing is timed: every wait
polls ``GET /scale`` with a generous deadline.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from faastube_autoscale import AutoscaleSettings
from faastube_runtime import dag
from faastube_runtime.gateway import GatewayConfig
from faastube_runtime.local import LocalOptions, LocalRuntime
from faastube_spec.workflow import load_workflow

pytestmark = [pytest.mark.slow]

FIXTURE = Path(__file__).parent / "scaling_fixture"
DEADLINE_S = 120.0  # workers are processes that import numpy and aiohttp: slow on a loaded machine
POLICY = dag.DagPolicy(request_timeout_s=DEADLINE_S, call_timeout_s=DEADLINE_S, max_retries=0)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def options(**settings: float) -> LocalOptions:
    return LocalOptions(backend="host", gateway=GatewayConfig(policy=POLICY), scale_interval_s=0.1,
                        autoscale_settings=AutoscaleSettings(**settings))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def scale_of(http: aiohttp.ClientSession, rt: LocalRuntime) -> dict[str, Any]:
    async with http.get(f"{rt.url}/scale") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def until(http: aiohttp.ClientSession, rt: LocalRuntime, what: str,
                condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll ``/scale`` until ``condition`` holds; fail naming ``what`` after ``DEADLINE_S``."""
    last: dict[str, Any] = {}
    try:
        async with asyncio.timeout(DEADLINE_S):
            while True:
                last = await scale_of(http, rt)
                if condition(last):
                    return last
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"not reached in {DEADLINE_S:.0f}s: {what}; /scale says {last}") from None


async def invoke(http: aiohttp.ClientSession, rt: LocalRuntime, value: float) -> tuple[int, np.ndarray | None]:
    async with http.post(f"{rt.url}/invoke", data=npy(np.array([value]))) as response:
        body = await response.read()
        return response.status, (np.load(io.BytesIO(body)) if response.status == 200 else None)


async def test_concurrent_load_scales_worker_processes_up_to_the_maximum_and_back_down(
        http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALETEST_SLEEP_S", "0.2")
    settings = {"stable_window_s": 2.0, "panic_window_s": 0.5, "scale_down_delay_s": 0.5,
                "scale_to_zero_grace_s": 0.5}
    async with LocalRuntime(load_workflow(FIXTURE / "busy.yaml"), options(**settings)) as rt:
        assert len(rt.worker_pids("work")) == 1
        stop = asyncio.Event()
        statuses: list[int] = []

        async def client(n: int) -> None:
            while not stop.is_set():
                status, out = await invoke(http, rt, float(n))
                statuses.append(status)
                assert out is None or out.tolist() == [n + 1.0]

        clients = [asyncio.create_task(client(n)) for n in range(6)]  # six calls in flight, target 1 each
        try:
            busy = await until(http, rt, "3 replicas serving under load",
                               lambda s: s["work"]["current"] == 3)
            assert busy["work"]["desired"] == 3  # clamped to maxReplicas
            assert len(rt.worker_pids("work")) == 3
            async with http.get(f"{rt.url}/metrics") as response:
                metrics = await response.text()
            assert 'faastube_gateway_function_replicas{function="work",workflow="busy"} 3.0' in metrics
        finally:
            stop.set()
            await asyncio.gather(*clients)
        await until(http, rt, "back to 1 replica without load", lambda s: s["work"]["current"] == 1)
        async with asyncio.timeout(DEADLINE_S):
            while len(rt.worker_pids("work")) != 1:  # the stopped workers' processes are gone too
                await asyncio.sleep(0.1)
        report = rt.scaling_report()["work"]
        assert (report.initial, report.most, report.final) == (1, 3, 1)
        assert report.scale_ups >= 2 and report.scale_downs >= 2 and report.failed_starts == 0
        assert statuses and set(statuses) == {200}
        status, out = await invoke(http, rt, 41.0)  # still serving after scaling down
        assert status == 200 and out is not None and out.tolist() == [42.0]
        await rt.drain()
        stats = rt.pool_stats()
        assert stats["objects"] == 0, stats


async def test_functions_scaled_to_zero_start_again_for_a_waiting_request(http: aiohttp.ClientSession) -> None:
    settings = {"stable_window_s": 1.0, "panic_window_s": 0.2, "scale_down_delay_s": 0.2,
                "scale_to_zero_grace_s": 0.5}
    async with LocalRuntime(load_workflow(FIXTURE / "idle.yaml"), options(**settings)) as rt:
        assert rt.worker_pids("first") == []  # starts scaled to zero
        await until(http, rt, "'second' scaled to zero when never called",
                    lambda s: s["second"]["current"] == 0 and s["first"]["current"] == 0)
        async with asyncio.timeout(DEADLINE_S):
            while rt.worker_pids("second"):
                await asyncio.sleep(0.1)
        status, out = await invoke(http, rt, 5.0)  # waits while both functions start a worker
        assert status == 200 and out is not None and out.tolist() == [13.0]
        report = rt.scaling_report()
        assert (report["first"].initial, report["first"].most) == (0, 1)
        assert (report["second"].initial, report["second"].fewest, report["second"].most) == (1, 0, 1)
        assert report["first"].scale_ups >= 1 and report["second"].scale_ups >= 1
        await until(http, rt, "both back to zero after the request",
                    lambda s: s["first"]["current"] == 0 and s["second"]["current"] == 0)


async def test_without_autoscaling_every_function_keeps_its_starting_count(http: aiohttp.ClientSession) -> None:
    fixed = LocalOptions(backend="host", gateway=GatewayConfig(policy=POLICY), scale_interval_s=0.1,
                         autoscale=False, autoscale_settings=AutoscaleSettings(
                             stable_window_s=1.0, panic_window_s=0.2, scale_down_delay_s=0.2,
                             scale_to_zero_grace_s=0.2))
    async with LocalRuntime(load_workflow(FIXTURE / "idle.yaml"), fixed) as rt:
        # 'first' starts at zero with autoscaling; without it nothing would ever start one
        assert len(rt.worker_pids("first")) == 1 and len(rt.worker_pids("second")) == 1
        # the autoscaler still says what it would do, and nothing follows it
        await until(http, rt, "the autoscaler wants zero", lambda s: s["second"]["desired"] == 0)
        assert (await scale_of(http, rt))["second"]["current"] == 1
        status, out = await invoke(http, rt, 1.0)
        assert status == 200 and out is not None and out.tolist() == [5.0]
        assert {name: s.most for name, s in rt.scaling_report().items()} == {"first": 1, "second": 1}

