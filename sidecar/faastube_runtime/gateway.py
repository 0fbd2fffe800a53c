"""The invocation gateway: HTTP in front of a workflow, refs behind it.

``POST /invoke`` takes the request's input (an ``.npy`` body, or ``{"ref": ...}``
as JSON for data already in the pool), stores it once, drives the DAG
(``dag.run_request``) and answers with the exit's output: ``.npy`` bytes, or with
``?output=ref`` the stored ref (the caller then owns it). Each answer carries the
request's latency breakdown (compute, data passing, queueing, other) in the
``X-Faastube-Breakdown`` header (JSON), also in the body for ``?output=ref``.

Every object created for a request is freed when it ends, whatever the outcome.
HTTP errors: 400 bad input, 502 a function failed after its retries, 503
overloaded, 504 timed out. ``GET /healthz``, ``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from aiohttp import web
from faastube import errors as ft_errors
from faastube import sdk
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from faastube_runtime import dag, errors
from faastube_runtime.metrics import GatewayMetrics

logger = logging.getLogger(__name__)

BREAKDOWN_HEADER = "X-Faastube-Breakdown"
NPY_CONTENT_TYPE = "application/x-npy"
DEFAULT_MAX_BODY_BYTES = 1 << 30


class RequestStore(Protocol):
    """The gateway's own use of the data plane: the request's input, the exit's output, cleanup."""

    async def put_input(self, array: np.ndarray, *, consumers: int) -> str: ...

    async def read_output(self, ref: str) -> np.ndarray: ...

    async def check(self, ref: str) -> None:
        """Raise ``RefNotFound`` / ``PermissionDenied`` unless ``ref`` names a readable object."""

    async def discard(self, refs: Sequence[str]) -> None: ...


class ClientStore:
    """A ``RequestStore`` over a blocking ``faastube`` client, run on one helper thread.

    One thread keeps the client's calls ordered and the event loop free.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gw-store")

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def put_input(self, array: np.ndarray, *, consumers: int) -> str:
        return str(await self._run(self._client.put, array, consumers=consumers))

    async def read_output(self, ref: str) -> np.ndarray:
        def read() -> np.ndarray:
            return np.array(self._client.get(ref, device="cpu", copy=True))

        return await self._run(read)  # type: ignore[no-any-return]

    async def check(self, ref: str) -> None:
        await self._run(self._client.stat, ref)

    async def discard(self, refs: Sequence[str]) -> None:
        await self._run(sdk.discard, self._client, list(refs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    policy: dag.DagPolicy = field(default_factory=dag.DagPolicy)
    max_in_flight: int = 256
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


@dataclass(frozen=True, slots=True)
class InvokeResult:
    output: np.ndarray | None
    output_ref: str | None
    breakdown: dag.Breakdown
    request_id: str


class Gateway:
    """Serves requests of one workflow; the HTTP layer (``build_app``) only translates."""

    def __init__(self, workflow_name: str, plan: dag.RequestPlan, invoker: dag.FunctionInvoker,
                 store: RequestStore, *, config: GatewayConfig | None = None,
                 metrics: GatewayMetrics | None = None) -> None:
        self.workflow_name = workflow_name
        self.plan = plan
        self.config = config if config is not None else GatewayConfig()
        self.metrics = metrics if metrics is not None else GatewayMetrics.create()
        self._invoker = invoker
        self._store = store
        self._ids = itertools.count(1)
        self.in_flight = 0

    async def invoke(self, *, array: np.ndarray | None = None, ref: str | None = None,
                     return_ref: bool = False) -> InvokeResult:
        """Run one request on an input array or an existing ref."""
        if (array is None) == (ref is None):
            raise errors.BadInput("give exactly one of an input array or an input ref")
        if self.in_flight >= self.config.max_in_flight:
            self.metrics.requests.labels(self.workflow_name, "overloaded").inc()
            raise errors.Overloaded(f"{self.in_flight} requests in flight (limit "
                                    f"{self.config.max_in_flight}); retry later")
        request_id = f"r{next(self._ids)}"
        self.in_flight += 1
        self.metrics.in_flight.labels(self.workflow_name).inc()
        ledger = dag.RefLedger()
        keep: str | None = None
        started = time.monotonic()
        try:
            if array is not None:
                input_ref = await self._store.put_input(array, consumers=len(self.plan.sources))
                ledger.add([input_ref])
            elif ref is not None:
                await self._store.check(ref)
                input_ref = ref  # the caller's object: not ours to free
            stored_s = time.monotonic() - started
            trace = await dag.run_request(self.plan, self._invoker, input_ref, request_id=request_id,
                                          policy=self.config.policy, ledger=ledger)
            output: np.ndarray | None = None
            read_started = time.monotonic()
            if return_ref:
                keep = trace.output_ref
            else:
                output = await self._store.read_output(trace.output_ref)
            extra_s = stored_s + (time.monotonic() - read_started)
            breakdown = trace.breakdown(self.plan, extra_data_passing_s=extra_s)
            self.metrics.observe_success(self.workflow_name, trace, breakdown)
            return InvokeResult(output=output, output_ref=keep, breakdown=breakdown, request_id=request_id)
        except errors.RuntimeFailure as e:
            self.metrics.requests.labels(self.workflow_name, type(e).__name__).inc()
            logger.info("request %s failed: %s", request_id, e)
            raise
        except (ft_errors.RefNotFound, ft_errors.PermissionDenied, ft_errors.InvalidRequest) as e:
            self.metrics.requests.labels(self.workflow_name, "BadInput").inc()
            raise errors.BadInput(f"input ref: {e}") from e
        finally:
            forget = getattr(self._invoker, "forget", None)
            if forget is not None:
                forget(request_id)
            self.in_flight -= 1
            self.metrics.in_flight.labels(self.workflow_name).dec()
            leftovers = [r for r in ledger.refs if r != keep]
            if leftovers:
                await asyncio.shield(self._store.discard(leftovers))
                self.metrics.freed_refs.labels(self.workflow_name).inc(len(leftovers))


def parse_npy(body: bytes) -> np.ndarray:
    """An array from ``.npy`` bytes; never unpickles."""
    if not body:
        raise errors.BadInput("body: empty; send an .npy array or JSON {\"ref\": ...}")
    try:
        value = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise errors.BadInput(f"body: not a valid .npy array: {e}") from e
    if not isinstance(value, np.ndarray):
        raise errors.BadInput("body: expected one .npy array, not an .npz archive")
    return value


def parse_ref_body(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise errors.BadInput(f"body: not valid JSON: {e}") from e
    if not isinstance(doc, dict) or set(doc) != {"ref"}:
        raise errors.BadInput('body: expected a JSON object {"ref": "<ref>"}')
    ref = doc["ref"]
    if not isinstance(ref, str) or not ref or len(ref) > 256:
        raise errors.BadInput("ref: must be a non-empty string of at most 256 characters")
    return ref


def to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _error_response(exc: errors.RuntimeFailure) -> web.Response:
    return web.json_response({"error": type(exc).__name__, "message": str(exc)}, status=exc.http_status)


def build_app(gateway: Gateway) -> web.Application:
    async def handle_invoke(request: web.Request) -> web.Response:
        try:
            output_mode = request.query.get("output", "array")
            if output_mode not in ("array", "ref"):
                raise errors.BadInput(f"query output: must be 'array' or 'ref', got {output_mode!r}")
            body = await request.read()
            if request.content_type == "application/json":
                result = await gateway.invoke(ref=parse_ref_body(body), return_ref=output_mode == "ref")
            else:
                result = await gateway.invoke(array=parse_npy(body), return_ref=output_mode == "ref")
        except errors.RuntimeFailure as e:
            return _error_response(e)
        except ft_errors.FaastubeError as e:  # the data plane failed under us (sidecar gone, full)
            logger.warning("invoke failed in the data plane: %s: %s", type(e).__name__, e)
            status = 503 if isinstance(e, ft_errors.RetryableError) else 500
            return web.json_response({"error": type(e).__name__, "message": str(e)}, status=status)
        breakdown = result.breakdown.as_dict()
        headers = {BREAKDOWN_HEADER: json.dumps(breakdown), "X-Faastube-Request-Id": result.request_id}
        if result.output_ref is not None:
            return web.json_response({"ref": result.output_ref, "breakdown": breakdown}, headers=headers)
        if result.output is None:  # the store returned nothing for the exit's ref
            return _error_response(errors.RuntimeFailure("no output was read for the exit"))
        return web.Response(body=to_npy(result.output), content_type=NPY_CONTENT_TYPE, headers=headers)

    async def handle_health(_request: web.Request) -> web.Response:
        return web.json_response({"workflow": gateway.workflow_name, "inFlight": gateway.in_flight})

    async def handle_metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(gateway.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=gateway.config.max_body_bytes)
    app.router.add_post("/invoke", handle_invoke)
    app.router.add_get("/healthz", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    return app
