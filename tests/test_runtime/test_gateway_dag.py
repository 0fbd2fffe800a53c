"""Per-request DAG execution (fan-out, fan-in, retries, timeouts, cleanup) with an in-process store."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from faastube import sdk
from faastube_runtime import dag, errors
from faastube_spec.workflow import Workflow, parse_workflow
from runtime_doubles import InProcessInvoker, MemoryStore


def diamond() -> Workflow:
    """a -> (b, c) -> d"""
    return parse_workflow({
        "apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "diamond"},
        "spec": {"slo": "1s",
                 "functions": [{"name": n, "handler": f"m:{n}"} for n in ("a", "b", "c", "d")],
                 "edges": [{"from": "a", "to": "b", "size": 8}, {"from": "a", "to": "c", "size": 8},
                           {"from": "b", "to": "d", "size": 8}, {"from": "c", "to": "d", "size": 8}]}})


def handlers(**overrides: Any) -> dict[str, Any]:
    base = {"a": lambda x: x + 1, "b": lambda x: x * 2, "c": lambda x: x * 3,
            "d": lambda b, c: b + c}
    base.update(overrides)
    return base


async def run(plan: dag.RequestPlan, invoker: InProcessInvoker, store: MemoryStore,
              policy: dag.DagPolicy | None = None) -> tuple[dag.RequestTrace, dag.RefLedger, str]:
    input_ref = store.put(np.array([1.0]), consumers=1)
    ledger = dag.RefLedger([input_ref])
    trace = await dag.run_request(plan, invoker, input_ref, request_id="t1",
                                  policy=policy or dag.DagPolicy(), ledger=ledger)
    return trace, ledger, input_ref


def test_the_plan_lists_inputs_and_readers_in_edge_order() -> None:
    plan = dag.plan_workflow(diamond())
    assert plan.function("a") == dag.FunctionPlan("a", (sdk.REQUEST_INPUT,), ("b", "c"))
    assert plan.function("d") == dag.FunctionPlan("d", ("b", "c"), (sdk.GATEWAY_READER,))
    assert plan.sources == ("a",)


async def test_fan_out_and_fan_in_compute_the_right_value_and_consume_every_intermediate() -> None:
    store, plan = MemoryStore(), dag.plan_workflow(diamond())
    trace, ledger, input_ref = await run(plan, InProcessInvoker(store, handlers(), plan), store)
    # (1+1)*2 + (1+1)*3
    assert store.get(trace.output_ref).tolist() == [10.0]
    # every intermediate was released by its readers; only the exit's output is left
    assert set(store.objects) == {trace.output_ref}
    assert trace.output_ref in ledger.refs and input_ref in ledger.refs
    assert [c.function for c in trace.calls] == ["a", "b", "c", "d"]
    assert all(c.attempts == 1 for c in trace.calls)


async def test_independent_branches_run_at_the_same_time() -> None:
    store, plan = MemoryStore(), dag.plan_workflow(diamond())
    invoker = InProcessInvoker(store, handlers(), plan, delay_s={"b": 0.2, "c": 0.2})
    trace, _, _ = await run(plan, invoker, store)
    assert trace.total_s < 0.38  # sequential would take 0.4 s
    path = [c.function for c in trace.critical_path(plan)]
    assert path[0] == "a" and path[-1] == "d" and len(path) == 3


async def test_a_failing_call_is_retried_and_then_succeeds() -> None:
    store, plan = MemoryStore(), dag.plan_workflow(diamond())
    failures = iter([True, False])

    def flaky(x: np.ndarray) -> np.ndarray:
        if next(failures):
            raise RuntimeError("transient")
        return x * 3

    invoker = InProcessInvoker(store, handlers(c=flaky), plan)
    trace, _, _ = await run(plan, invoker, store)
    assert store.get(trace.output_ref).tolist() == [10.0]
    assert {c.function: c.attempts for c in trace.calls}["c"] == 2


async def test_retries_are_bounded_and_the_failure_names_the_function() -> None:
    store, plan = MemoryStore(), dag.plan_workflow(diamond())

    def broken(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("always")

    invoker = InProcessInvoker(store, handlers(b=broken), plan)
    with pytest.raises(errors.FunctionFailed, match="function 'b' failed after 3 attempt"):
        await run(plan, invoker, store, dag.DagPolicy(max_retries=2))
    assert invoker.attempts["b"] == 3
    assert "d" not in invoker.attempts


async def test_a_contract_error_is_not_retried() -> None:
    store, plan = MemoryStore(), dag.plan_workflow(diamond())
    invoker = InProcessInvoker(store, handlers(b=lambda x: "text"), plan)
    with pytest.raises(errors.FunctionFailed, match="after 1 attempt"):
        await run(plan, invoker, store)


async def test_everything_is_freed_from_the_ledger_after_a_failure() -> None:
    store, plan = MemoryStore(), dag.plan_workflow(diamond())

    def broken(b: np.ndarray, c: np.ndarray) -> np.ndarray:
        raise RuntimeError("exit fails")

    input_ref = store.put(np.array([1.0]), consumers=1)
    ledger = dag.RefLedger([input_ref])
    with pytest.raises(errors.FunctionFailed):
        await dag.run_request(plan, InProcessInvoker(store, handlers(d=broken), plan), input_ref,
                              request_id="t", policy=dag.DagPolicy(max_retries=1), ledger=ledger)
    assert store.objects  # b's and c's outputs are still waiting for d
    sdk.discard(store, ledger.refs)
    assert store.objects == {}


async def test_a_slow_call_times_out_per_call_and_is_retried() -> None:
    store, plan = MemoryStore(), dag.plan_workflow(diamond())
    invoker = InProcessInvoker(store, handlers(), plan, delay_s={"c": 0.5})
    with pytest.raises(errors.RequestTimedOut, match="'c' timed out on all 2 attempt"):
        await run(plan, invoker, store, dag.DagPolicy(call_timeout_s=0.05, max_retries=1))
    assert invoker.attempts["c"] == 2


async def test_the_request_timeout_bounds_the_whole_request() -> None:
    store, plan = MemoryStore(), dag.plan_workflow(diamond())
    invoker = InProcessInvoker(store, handlers(), plan, delay_s={"a": 0.3})
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(errors.RequestTimedOut, match="request t1 timed out"):
        await run(plan, invoker, store, dag.DagPolicy(request_timeout_s=0.1, call_timeout_s=5))
    assert loop.time() - started < 0.25


async def test_many_requests_share_the_dag_concurrently() -> None:
    store, plan = MemoryStore(), dag.plan_workflow(diamond())
    invoker = InProcessInvoker(store, handlers(), plan, delay_s={"a": 0.05})
    traces = await asyncio.gather(*(run(plan, invoker, store) for _ in range(10)))
    assert all(store.get(t.output_ref).tolist() == [10.0] for t, _, _ in traces)
    assert invoker.max_running["a"] > 1


def test_breakdown_parts_add_up_to_the_total() -> None:
    plan = dag.plan_workflow(diamond())
    calls = tuple(dag.CallRecord(function=n, attempts=1, started_s=s, finished_s=f, get_s=0.01,
                                 compute_s=0.1, put_s=0.02, queue_s=0.005)
                  for n, s, f in (("a", 0.0, 0.2), ("b", 0.2, 0.5), ("c", 0.2, 0.4), ("d", 0.5, 0.7)))
    trace = dag.RequestTrace(output_ref="x", calls=calls, total_s=0.75)
    assert [c.function for c in trace.critical_path(plan)] == ["a", "b", "d"]
    b = trace.breakdown(plan, extra_data_passing_s=0.05)
    assert b.compute_s == pytest.approx(0.3)
    assert b.data_passing_s == pytest.approx(0.09 + 0.05)
    assert b.queueing_s == pytest.approx(0.015)
    assert b.compute_s + b.data_passing_s + b.queueing_s + b.other_s == pytest.approx(b.total_s)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        dag.DagPolicy(call_timeout_s=0)
    with pytest.raises(ValueError):
        dag.DagPolicy(max_retries=-1)
