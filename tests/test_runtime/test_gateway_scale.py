"""The gateway's scaling view: samples into the autoscaler, ``GET /scale`` and the scaling gauges."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from faastube_autoscale import AutoscaleSettings
from faastube_runtime import dag
from faastube_runtime.gateway import Gateway, build_app
from faastube_runtime.load import LoadCounter, LoadReading
from faastube_runtime.metrics import GatewayMetrics
from faastube_runtime.scaling import FunctionScale, ScaleMonitor
from faastube_spec.workflow import parse_workflow

WORKFLOW = parse_workflow({
    "apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "wf"},
    "spec": {"slo": "1s", "functions": [
        {"name": "fixed", "handler": "m:a", "replicas": 2},
        {"name": "scaled", "handler": "m:b", "minReplicas": 0, "replicas": 1, "maxReplicas": 8,
         "targetConcurrency": 2}],
        "edges": [{"from": "fixed", "to": "scaled", "size": 1}]}})
QUICK = AutoscaleSettings(stable_window_s=10, panic_window_s=1, scale_down_delay_s=0, scale_to_zero_grace_s=0)


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


class FakeSource:
    """A pool's counters and replica counts, on the test's clock."""

    def __init__(self, clock: Clock) -> None:
        self.counters = {fn.name: LoadCounter(clock) for fn in WORKFLOW.functions}
        self.ready = {"fixed": 2, "scaled": 1}
        self.starved: Callable[[str], None] | None = None

    def load(self, function: str) -> LoadReading:
        return self.counters[function].read()

    def replicas(self, function: str) -> tuple[Any, ...]:
        return tuple(range(self.ready[function]))

    def watch_starvation(self, callback: Callable[[str], None] | None) -> None:
        self.starved = callback


class NoStore:
    async def put_input(self, array: np.ndarray, *, consumers: int) -> str:
        raise AssertionError("not used")

    async def read_output(self, ref: str) -> np.ndarray:
        raise AssertionError("not used")

    async def check(self, ref: str) -> None:
        raise AssertionError("not used")

    async def discard(self, refs: Sequence[str]) -> None:
        return None


class NoInvoker:
    async def invoke(self, function: str, inputs: Mapping[str, str], *, request_id: str, attempt: int,
                     final: bool, timeout_s: float) -> dag.CallOutcome:
        raise AssertionError("not used")


def monitor_on(clock: Clock, source: FakeSource, metrics: GatewayMetrics | None = None,
               interval_s: float = 1.0) -> ScaleMonitor:
    return ScaleMonitor(WORKFLOW, source, settings=QUICK, interval_s=interval_s, metrics=metrics, clock=clock)


def test_load_between_samples_drives_the_decision_and_the_gauges() -> None:
    clock, metrics = Clock(), GatewayMetrics.create()
    source = FakeSource(clock)
    monitor = monitor_on(clock, source, metrics)
    counter = source.counters["scaled"]
    for _ in range(5):
        counter.call_started()  # five calls of 'scaled' running for the whole second
    clock.now_s += 1.0
    decisions = monitor.tick()
    scaled = decisions["scaled"]
    assert scaled.desired == 3 and scaled.current == 1  # ceil(5 / targetConcurrency 2)
    assert scaled.concurrency == pytest.approx(5.0) and scaled.panicking  # 5 >= 2 x (1 x 2)
    assert decisions["fixed"].desired == 2  # a fixed function's decision is its replicas
    value = metrics.registry.get_sample_value
    labels = {"workflow": "wf", "function": "scaled"}
    assert value("faastube_gateway_function_concurrency", labels) == pytest.approx(5.0)
    assert value("faastube_gateway_desired_replicas", labels) == 3
    assert value("faastube_gateway_function_replicas", labels) == 1
    assert value("faastube_gateway_desired_replicas", {"workflow": "wf", "function": "fixed"}) == 2


def test_a_burst_shorter_than_the_interval_still_counts() -> None:
    clock = Clock()
    source = FakeSource(clock)
    monitor = monitor_on(clock, source)
    counter = source.counters["scaled"]
    clock.now_s += 0.25
    for _ in range(8):
        counter.wait_started()
    clock.now_s += 0.5  # eight calls waited half of the second, then were gone
    for _ in range(8):
        counter.wait_ended()
    clock.now_s += 0.25
    assert counter.read().concurrency == 0
    scaled = monitor.tick()["scaled"]
    assert scaled.concurrency == pytest.approx(4.0) and scaled.desired == 2


def test_listeners_hear_every_round_and_a_failing_one_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    monitor = monitor_on(clock, FakeSource(clock))
    heard: list[Mapping[str, FunctionScale]] = []

    def broken(_decisions: Mapping[str, FunctionScale]) -> None:
        raise RuntimeError("listener bug")

    monitor.subscribe(broken)
    monitor.subscribe(heard.append)
    clock.now_s += 1.0
    with caplog.at_level(logging.ERROR):
        monitor.tick()
    assert len(heard) == 1 and set(heard[0]) == {"fixed", "scaled"}
    assert "scale listener failed" in caplog.text


async def test_a_starved_call_runs_a_round_at_once() -> None:
    clock = Clock()
    source = FakeSource(clock)
    source.ready["scaled"] = 0
    heard = asyncio.Queue[Mapping[str, FunctionScale]]()
    async with monitor_on(clock, source, interval_s=3600.0) as monitor:  # the interval never comes
        monitor.subscribe(heard.put_nowait)
        assert source.starved is not None  # the monitor registered itself with the pool
        source.counters["scaled"].wait_started()
        clock.now_s += 0.01
        source.starved("scaled")
        async with asyncio.timeout(10):
            decisions = await heard.get()
        assert decisions["scaled"].desired == 1 and decisions["scaled"].current == 0
    assert source.starved is None  # and unregistered on the way out


async def test_get_scale_reports_desired_current_and_concurrency_per_function() -> None:
    clock = Clock()
    source = FakeSource(clock)
    metrics = GatewayMetrics.create()
    monitor = monitor_on(clock, source, metrics)
    for _ in range(3):
        source.counters["scaled"].call_started()
    clock.now_s += 1.0
    monitor.tick()
    gateway = Gateway("wf", dag.plan_workflow(WORKFLOW), NoInvoker(), NoStore(), metrics=metrics, scale=monitor)
    bare = Gateway("wf", dag.plan_workflow(WORKFLOW), NoInvoker(), NoStore())
    runners = []
    try:
        urls = []
        for g in (gateway, bare):
            runner = web.AppRunner(build_app(g))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            runners.append(runner)
            urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{urls[0]}/scale") as response:
                assert response.status == 200
                body = await response.json()
            async with http.get(f"{urls[0]}/metrics") as response:
                text = await response.text()
            async with http.get(f"{urls[1]}/scale") as response:
                assert response.status == 404
                assert (await response.json())["error"] == "NotFound"
    finally:
        for runner in runners:
            await runner.cleanup()
    assert set(body) == {"fixed", "scaled"}
    assert body["scaled"]["desired"] == 2 and body["scaled"]["current"] == 1  # ceil(3 / 2)
    assert body["scaled"]["concurrency"] == pytest.approx(3.0)
    assert (body["scaled"]["minReplicas"], body["scaled"]["maxReplicas"]) == (0, 8)
    assert body["fixed"] == {"desired": 2, "current": 2, "concurrency": 0.0, "panicConcurrency": 0.0,
                             "panicking": False, "reason": "stable", "minReplicas": 2, "maxReplicas": 2}
    assert 'faastube_gateway_desired_replicas{function="scaled",workflow="wf"} 2.0' in text
    assert 'faastube_gateway_function_concurrency{function="scaled",workflow="wf"} 3.0' in text
