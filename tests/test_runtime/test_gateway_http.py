"""The gateway over HTTP, against a real sidecar (host backend) and real worker processes."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from faastube_runtime import dag
from faastube_runtime.gateway import BREAKDOWN_HEADER, GatewayConfig
from faastube_runtime.local import LocalOptions, LocalRuntime
from faastube_spec.workflow import load_workflow

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

FIXTURE = Path(__file__).parent / "gateway_fixture" / "workflow.yaml"
SLEEP_S = 1.0
CALL_TIMEOUT_S = 0.4


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runtime(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalRuntime]:
    state = tmp_path_factory.mktemp("gwstate")
    os.environ["GWTEST_STATE_DIR"] = str(state)
    os.environ["GWTEST_SLEEP_S"] = str(SLEEP_S)
    options = LocalOptions(backend="host", gateway=GatewayConfig(
        policy=dag.DagPolicy(request_timeout_s=10, call_timeout_s=CALL_TIMEOUT_S, max_retries=2),
        max_in_flight=8))
    async with LocalRuntime(load_workflow(FIXTURE), options) as rt:
        yield rt


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def invoke(http: aiohttp.ClientSession, rt: LocalRuntime, values: list[float],
                 query: str = "") -> tuple[int, bytes, dict[str, str]]:
    async with http.post(f"{rt.url}/invoke{query}", data=npy(np.array(values, dtype=np.float64))) as r:
        return r.status, await r.read(), dict(r.headers)


async def assert_pool_empty(rt: LocalRuntime) -> None:
    await rt.drain()
    stats = rt.pool_stats()
    assert stats["objects"] == 0 and stats["draining"] == 0, stats
    assert all(p["used_bytes"] == 0 for p in stats["pools"]), stats


async def test_fan_out_and_fan_in_return_the_exit_output_with_a_breakdown(runtime: LocalRuntime,
                                                                          http: aiohttp.ClientSession) -> None:
    status, body, headers = await invoke(http, runtime, [1.0, 2.0])
    assert status == 200, body
    assert np.load(io.BytesIO(body)).tolist() == [10.0, 15.0]  # (x+1)*2 + (x+1)*3
    breakdown = json.loads(headers[BREAKDOWN_HEADER])
    assert set(breakdown) == {"total_s", "compute_s", "data_passing_s", "queueing_s", "other_s"}
    parts = breakdown["compute_s"] + breakdown["data_passing_s"] + breakdown["queueing_s"] + breakdown["other_s"]
    assert parts == pytest.approx(breakdown["total_s"])
    await assert_pool_empty(runtime)


async def test_output_ref_mode_hands_the_caller_a_live_ref(runtime: LocalRuntime,
                                                           http: aiohttp.ClientSession) -> None:
    status, body, _ = await invoke(http, runtime, [0.0], query="?output=ref")
    assert status == 200, body
    doc = json.loads(body)
    assert runtime.pool_stats()["objects"] == 1
    from faastube import client as ft_client

    with ft_client.connect(runtime.sidecar_socket, workflow="gwtest", function="tester") as c:
        assert c.get(doc["ref"], copy=True).tolist() == [5.0]  # its one declared read
    await assert_pool_empty(runtime)


async def test_many_requests_in_flight_all_succeed(runtime: LocalRuntime, http: aiohttp.ClientSession) -> None:
    results = await asyncio.gather(*(invoke(http, runtime, [float(i)]) for i in range(8)))
    assert [np.load(io.BytesIO(b)).tolist() for _, b, _ in results] == [[5.0 * (i + 1)] for i in range(8)]
    await assert_pool_empty(runtime)


async def test_a_call_that_fails_once_is_retried(runtime: LocalRuntime, http: aiohttp.ClientSession) -> None:
    status, body, _ = await invoke(http, runtime, [299.0, 1.0])
    assert status == 200, body
    assert np.load(io.BytesIO(body)).tolist() == [1500.0, 10.0]
    await assert_pool_empty(runtime)


async def test_a_function_failing_every_time_gives_502_and_leaves_nothing(runtime: LocalRuntime,
                                                                         http: aiohttp.ClientSession) -> None:
    status, body, _ = await invoke(http, runtime, [99.0])
    assert status == 502
    doc = json.loads(body)
    assert doc["error"] == "FunctionFailed" and "'left-arm' failed after 3 attempt(s)" in doc["message"]
    await assert_pool_empty(runtime)


async def test_a_slow_call_gives_504_and_leaves_nothing(runtime: LocalRuntime,
                                                       http: aiohttp.ClientSession) -> None:
    status, body, _ = await invoke(http, runtime, [199.0])
    assert status == 504, body
    assert "timed out" in json.loads(body)["message"]
    await assert_pool_empty(runtime)


@pytest.mark.parametrize("body, message", [
    (b"", "empty"),
    (b"not numpy", "not a valid .npy"),
])
async def test_bad_bodies_get_400_naming_the_problem(runtime: LocalRuntime, http: aiohttp.ClientSession,
                                                     body: bytes, message: str) -> None:
    async with http.post(f"{runtime.url}/invoke", data=body) as r:
        assert r.status == 400
        assert message in (await r.json())["message"]


async def test_an_unknown_input_ref_is_a_bad_request(runtime: LocalRuntime, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{runtime.url}/invoke", json={"ref": "ft-doesnotexist"}) as r:
        assert r.status == 400
        assert "ft-doesnotexist" in (await r.json())["message"]
    async with http.post(f"{runtime.url}/invoke", json={"ref": 5}) as r:
        assert r.status == 400 and "ref: must be" in (await r.json())["message"]
    async with http.post(f"{runtime.url}/invoke?output=bytes", data=npy(np.zeros(1))) as r:
        assert r.status == 400 and "query output" in (await r.json())["message"]
    await assert_pool_empty(runtime)


async def test_too_many_requests_in_flight_get_503(runtime: LocalRuntime, http: aiohttp.ClientSession) -> None:
    # each slow request holds the gateway for the call timeouts of its attempts
    results = await asyncio.gather(*(invoke(http, runtime, [199.0]) for _ in range(12)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(503) >= 4 and set(statuses) <= {503, 504}
    await assert_pool_empty(runtime)


async def test_health_and_metrics_endpoints(runtime: LocalRuntime, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{runtime.url}/healthz") as r:
        assert r.status == 200 and (await r.json())["workflow"] == "gwtest"
    async with http.get(f"{runtime.url}/metrics") as r:
        text = await r.text()
    assert 'faastube_gateway_requests_total{outcome="ok",workflow="gwtest"}' in text
    assert 'faastube_gateway_requests_total{outcome="FunctionFailed",workflow="gwtest"}' in text
    assert "faastube_gateway_function_retries_total" in text
    assert "faastube_gateway_request_stage_seconds_bucket" in text


async def test_an_input_already_in_the_pool_is_passed_by_ref(runtime: LocalRuntime,
                                                             http: aiohttp.ClientSession) -> None:
    from faastube import client as ft_client

    with ft_client.connect(runtime.sidecar_socket, workflow="gwtest", function="tester") as c:
        ref = c.put(np.array([3.0]), consumers=1)
        async with http.post(f"{runtime.url}/invoke", json={"ref": ref}) as r:
            assert r.status == 200
            assert np.load(io.BytesIO(await r.read())).tolist() == [20.0]
    await assert_pool_empty(runtime)  # the entry's read was the ref's one declared consumer
