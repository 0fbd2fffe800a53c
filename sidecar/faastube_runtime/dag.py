"""Driving one request through a workflow's DAG, passing only refs.

Each function of the workflow becomes one asyncio task per request; a task waits
for its predecessors' outputs (refs), calls the function through a
``FunctionInvoker`` (the seam to worker processes), and publishes the refs its
call produced to its successors. Fan-out and fan-in fall out of that: a function
starts as soon as all of its inputs exist, and independent branches run at once.

Every ref a call reports is recorded in the request's ``RefLedger`` so the gateway
can free whatever is left when the request ends, whether it succeeded, failed or
timed out: a failed request must not leave pool memory behind.

Pure of I/O: no HTTP, no sidecar client. Tests drive it with an in-memory invoker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from faastube import sdk
from faastube_spec.workflow import Workflow

from faastube_runtime import errors

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FunctionPlan:
    """Where one function's inputs come from and who reads its output."""

    name: str
    inputs: tuple[str, ...]  # predecessor names, or (REQUEST_INPUT,) for a source
    readers: tuple[str, ...]  # successor names in edge order, then GATEWAY_READER for the exit
    max_batch: int = 1  # calls one replica gathers into a handler call (its batch policy's maxSize)


@dataclass(frozen=True, slots=True)
class RequestPlan:
    functions: tuple[FunctionPlan, ...]  # in topological order
    exit: str

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.functions if f.inputs == (sdk.REQUEST_INPUT,))

    def function(self, name: str) -> FunctionPlan:
        for f in self.functions:
            if f.name == name:
                return f
        raise KeyError(name)


def plan_workflow(workflow: Workflow) -> RequestPlan:
    """The per-request data flow of a (validated) workflow."""
    predecessors: dict[str, list[str]] = {f.name: [] for f in workflow.functions}
    successors: dict[str, list[str]] = {f.name: [] for f in workflow.functions}
    for edge in workflow.edges:
        if edge.target not in predecessors[edge.source]:
            successors[edge.source].append(edge.target)
            predecessors[edge.target].append(edge.source)
    plans = []
    for name in workflow.topological_order():
        inputs = tuple(predecessors[name]) or (sdk.REQUEST_INPUT,)
        readers = tuple(successors[name]) + ((sdk.GATEWAY_READER,) if name == workflow.exit else ())
        batch = workflow.function(name).batch
        plans.append(FunctionPlan(name=name, inputs=inputs, readers=readers,
                                  max_batch=1 if batch is None else batch.max_size))
    return RequestPlan(functions=tuple(plans), exit=workflow.exit)


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What a successful function call reported back."""

    outputs: Mapping[str, str]  # reader -> ref
    get_s: float
    compute_s: float
    put_s: float
    queue_s: float  # waiting for a free replica (and inside the worker for its turn)
    refs: tuple[str, ...] = ()  # every ref the call stored (the distinct values of outputs)
    batch_size: int = 1  # calls in the handler call that served it


class FunctionInvoker(Protocol):
    """Calls one function once; raises ``errors.CallFailed`` when that call failed."""

    async def invoke(self, function: str, inputs: Mapping[str, str], *, request_id: str,
                     attempt: int, final: bool, timeout_s: float) -> CallOutcome: ...


@dataclass(frozen=True, slots=True)
class DagPolicy:
    request_timeout_s: float = 60.0
    call_timeout_s: float = 30.0
    max_retries: int = 2  # extra attempts after the first failed one
    # Times a request starts over when a call's input died with its node (cross-node passing).
    request_retries: int = 1

    def __post_init__(self) -> None:
        if not self.request_timeout_s > 0 or not self.call_timeout_s > 0:
            raise ValueError("timeouts must be positive")
        if self.max_retries < 0 or self.request_retries < 0:
            raise ValueError("max_retries and request_retries must not be negative")


@dataclass(frozen=True, slots=True)
class CallRecord:
    function: str
    attempts: int
    started_s: float  # since the request started
    finished_s: float
    get_s: float
    compute_s: float
    put_s: float
    queue_s: float
    batch_size: int = 1


@dataclass(frozen=True, slots=True)
class Breakdown:
    """Where a request's latency went, along its critical path."""

    total_s: float
    compute_s: float
    data_passing_s: float
    queueing_s: float
    other_s: float  # transport, scheduling, retries

    def as_dict(self) -> dict[str, float]:
        return {"total_s": self.total_s, "compute_s": self.compute_s,
                "data_passing_s": self.data_passing_s, "queueing_s": self.queueing_s,
                "other_s": self.other_s}


@dataclass(slots=True)
class RefLedger:
    """Every ref created for one request; the gateway frees them when it ends.

    ``on_add`` hears of each ref once, as it joins (the gateway tells the data plane where
    the request that will read it stands in the queue)."""

    refs: list[str] = field(default_factory=list)
    on_add: Callable[[Sequence[str]], None] | None = None

    def add(self, refs: Sequence[str]) -> None:
        new = [ref for ref in dict.fromkeys(refs) if ref not in self.refs]
        self.refs.extend(new)
        if new and self.on_add is not None:
            self.on_add(new)


@dataclass(frozen=True, slots=True)
class RequestTrace:
    output_ref: str
    calls: tuple[CallRecord, ...]
    total_s: float

    def critical_path(self, plan: RequestPlan) -> tuple[CallRecord, ...]:
        """The chain of calls that decided when the request finished."""
        by_name = {c.function: c for c in self.calls}
        current = max(self.calls, key=lambda c: c.finished_s)
        path = [current]
        while True:
            preds = [by_name[p] for p in plan.function(current.function).inputs if p in by_name]
            if not preds:
                break
            current = max(preds, key=lambda c: c.finished_s)
            path.append(current)
        return tuple(reversed(path))

    def breakdown(self, plan: RequestPlan, *, extra_data_passing_s: float = 0.0) -> Breakdown:
        path = self.critical_path(plan)
        compute = sum(c.compute_s for c in path)
        data = sum(c.get_s + c.put_s for c in path) + extra_data_passing_s
        queue = sum(c.queue_s for c in path)
        total = self.total_s + extra_data_passing_s
        return Breakdown(total_s=total, compute_s=compute, data_passing_s=data, queueing_s=queue,
                         other_s=max(0.0, total - compute - data - queue))


async def _call_with_retries(invoker: FunctionInvoker, plan: FunctionPlan, inputs: Mapping[str, str],
                             *, request_id: str, policy: DagPolicy, deadline: float,
                             ledger: RefLedger, started: float
                             ) -> tuple[CallRecord, Mapping[str, str]]:
    attempts = 0
    last_cause = ""
    call_started = time.monotonic() - started
    while attempts <= policy.max_retries:
        attempts += 1
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise errors.RequestTimedOut(f"request {request_id} timed out before {plan.name!r} ran")
        timeout_s = min(policy.call_timeout_s, remaining_s)
        try:
            async with asyncio.timeout(timeout_s):
                outcome = await invoker.invoke(plan.name, inputs, request_id=request_id,
                                               attempt=attempts, final=attempts > policy.max_retries,
                                               timeout_s=timeout_s)
        except TimeoutError:
            last_cause = f"call timed out after {timeout_s:.3f}s"
            if time.monotonic() >= deadline:
                raise errors.RequestTimedOut(
                    f"request {request_id} timed out in {plan.name!r} (attempt {attempts})") from None
            logger.info("request %s: %s attempt %d: %s", request_id, plan.name, attempts, last_cause)
            if attempts > policy.max_retries:
                raise errors.RequestTimedOut(
                    f"function {plan.name!r} timed out on all {attempts} attempt(s)") from None
            continue
        except errors.CallFailed as e:
            last_cause = str(e)
            logger.info("request %s: %s attempt %d failed: %s", request_id, plan.name, attempts, e)
            if e.input_lost:        # the same inputs can't come back: the request starts over
                raise errors.InputLost(plan.name, attempts, last_cause) from e
            if not e.retryable:
                raise errors.FunctionFailed(plan.name, attempts, last_cause) from e
            continue
        ledger.add(outcome.refs or tuple(dict.fromkeys(outcome.outputs.values())))
        missing = set(plan.readers) - set(outcome.outputs)
        if missing:
            raise errors.FunctionFailed(plan.name, attempts,
                                        f"call returned no output for reader(s) {sorted(missing)}")
        record = CallRecord(function=plan.name, attempts=attempts, started_s=call_started,
                            finished_s=time.monotonic() - started, get_s=outcome.get_s,
                            compute_s=outcome.compute_s, put_s=outcome.put_s, queue_s=outcome.queue_s,
                            batch_size=outcome.batch_size)
        return record, outcome.outputs
    raise errors.FunctionFailed(plan.name, attempts, last_cause)


async def run_request(plan: RequestPlan, invoker: FunctionInvoker, input_ref: str, *,
                      request_id: str, policy: DagPolicy, ledger: RefLedger) -> RequestTrace:
    """Run every function of ``plan`` once for this request; return the exit's output ref.

    On failure the first error is raised (``FunctionFailed`` or ``RequestTimedOut``) after
    the other in-flight calls are cancelled; the refs they stored are in ``ledger``.
    """
    started = time.monotonic()
    deadline = started + policy.request_timeout_s
    loop = asyncio.get_running_loop()
    # producer -> (reader -> ref), resolved when the producer's call succeeds
    outputs: dict[str, asyncio.Future[Mapping[str, str]]] = {
        f.name: loop.create_future() for f in plan.functions}
    records: dict[str, CallRecord] = {}

    async def run_one(fplan: FunctionPlan) -> None:
        inputs: dict[str, str] = {}
        for source in fplan.inputs:
            if source == sdk.REQUEST_INPUT:
                inputs[source] = input_ref
            else:
                inputs[source] = (await outputs[source])[fplan.name]
        record, produced = await _call_with_retries(
            invoker, fplan, inputs, request_id=request_id, policy=policy, deadline=deadline,
            ledger=ledger, started=started)
        records[fplan.name] = record
        outputs[fplan.name].set_result(produced)

    try:
        async with asyncio.TaskGroup() as group:
            for fplan in plan.functions:
                group.create_task(run_one(fplan), name=f"{request_id}:{fplan.name}")
    except BaseExceptionGroup as eg:
        raise _first_meaningful(eg) from None
    finally:
        for future in outputs.values():
            if not future.done():
                future.cancel()
    exit_outputs = outputs[plan.exit].result()
    return RequestTrace(output_ref=exit_outputs[sdk.GATEWAY_READER],
                        calls=tuple(records[f.name] for f in plan.functions),
                        total_s=time.monotonic() - started)


def _first_meaningful(group: BaseExceptionGroup) -> BaseException:
    """The error to report: a runtime error over cancellations and generic ones."""
    flat: list[BaseException] = []

    def walk(eg: BaseExceptionGroup) -> None:
        for e in eg.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                flat.append(e)

    walk(group)
    for e in flat:
        if isinstance(e, errors.RuntimeFailure):
            return e
    for e in flat:
        if not isinstance(e, asyncio.CancelledError):
            return e
    return flat[0]
