"""The invocation gateway: HTTP in front of a workflow, refs behind it.

``POST /invoke`` takes the request's input (an ``.npy`` body, or ``{"ref": ...}``
as JSON for data already in the pool), stores it once, drives the DAG
(``dag.run_request``) and answers with the exit's output: ``.npy`` bytes, or with
``?output=ref`` the stored ref (the caller then owns it). Each answer carries the
request's latency breakdown (compute, data passing, queueing, other) in the
``X-Faastube-Breakdown`` header (JSON), also in the body for ``?output=ref``.

A request is admitted (``Gateway.admit``: a slot among ``max_in_flight``) before a
byte of its body is read, and its array's declared size is counted against
``max_input_bytes_in_flight`` before the array is allocated; the body itself is read
within limits by ``bodies``. An admitted request holds only its array until it is
stored, then only refs.

Every object created for a request is freed when it ends, whatever the outcome.
HTTP errors: 400 bad input, 408 the body stopped arriving, 413 body too large, 415
wrong content type or encoding, 502 a function failed after its retries, 503
overloaded, 504 timed out. ``GET /healthz``, ``GET /metrics`` (Prometheus), ``GET /scale``
(the autoscaler's decision per function, for a controller to act on; ``scaling``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

import numpy as np
from aiohttp import web
from faastube import errors as ft_errors
from faastube import protocol, sdk
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from faastube_runtime import bodies, dag, errors
from faastube_runtime.bodies import NPY_CONTENT_TYPE
from faastube_runtime.metrics import GatewayMetrics
from faastube_runtime.scaling import ScaleMonitor

logger = logging.getLogger(__name__)

BREAKDOWN_HEADER = "X-Faastube-Breakdown"
DEFAULT_MAX_INPUT_BYTES_IN_FLIGHT = 4 << 30
RETRY_AFTER_S = 1


class RequestStore(Protocol):
    """The gateway's own use of the data plane: the request's input, the exit's output, cleanup."""

    async def put_input(self, array: np.ndarray, *, consumers: int) -> str: ...

    async def read_output(self, ref: str) -> np.ndarray: ...

    async def check(self, ref: str) -> None:
        """Raise ``RefNotFound`` / ``PermissionDenied`` unless ``ref`` names a readable object."""

    async def discard(self, refs: Sequence[str]) -> None: ...

    async def hint(self, refs: Sequence[str], *, position: int) -> None:
        """``refs`` will be read by the request at ``position`` of the queue (arrival order)."""


class ClientStore:
    """A ``RequestStore`` over a blocking ``faastube`` client, run on one helper thread.

    One thread keeps the client's calls ordered and the event loop free.

    Across nodes (``others``: node -> a client of that node's sidecar), the request's
    input is stored on the gateway's node and its output read from wherever it is (a get
    of another node's ref fetches it), but an object is freed, checked and hinted at by
    the sidecar that holds it, the node its ref names: another node's sidecar does not
    know it.
    """

    def __init__(self, client: Any, *, others: Mapping[str, Any] | None = None) -> None:
        self._client = client
        self._others = dict(others or {})
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

    def _holder(self, ref: str) -> Any:
        """The client of the sidecar that holds ``ref`` (ours unless it names another node we reach)."""
        return self._others.get(protocol.ref_node(ref) or "", self._client) if self._others else self._client

    def _by_holder(self, refs: Sequence[str]) -> list[tuple[Any, list[str]]]:
        groups: dict[int, tuple[Any, list[str]]] = {}
        for ref in refs:
            client = self._holder(ref)
            groups.setdefault(id(client), (client, []))[1].append(ref)
        return list(groups.values())

    async def check(self, ref: str) -> None:
        await self._run(self._holder(ref).stat, ref)

    async def discard(self, refs: Sequence[str]) -> None:
        for client, held in self._by_holder(refs):
            await self._run(sdk.discard, client, held)

    async def hint(self, refs: Sequence[str], *, position: int) -> None:
        for client, held in self._by_holder(refs):
            hint = getattr(client, "hint", None)  # a client without queue hints: nothing to say
            if hint is not None and held:
                await self._run(hint, {ref: position for ref in held})

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    policy: dag.DagPolicy = field(default_factory=dag.DagPolicy)
    max_in_flight: int = 256
    # The input arrays of the requests in flight, together (each counted from its .npy
    # header, before it is allocated): what uploads may cost the gateway's memory at most.
    max_input_bytes_in_flight: int = DEFAULT_MAX_INPUT_BYTES_IN_FLIGHT
    limits: bodies.ReadLimits = field(default_factory=bodies.ReadLimits)

    def problems(self) -> list[str]:
        """What is wrong with this configuration (empty when it can be used)."""
        out = list(self.limits.problems())
        if self.max_in_flight < 1:
            out.append(f"max_in_flight: must be at least 1, got {self.max_in_flight}")
        if self.max_input_bytes_in_flight < self.limits.max_body_bytes:
            out.append(f"max_input_bytes_in_flight ({self.max_input_bytes_in_flight}) must be at least "
                       f"max_body_bytes ({self.limits.max_body_bytes}), or the largest body could never be served")
        return out


@dataclass(frozen=True, slots=True)
class InvokeResult:
    output: np.ndarray | None
    output_ref: str | None
    breakdown: dag.Breakdown
    request_id: str


class Admission:
    """A request's place in the gateway: one of ``max_in_flight`` slots, and the input bytes it holds.

    Taken before the body is read (``Gateway.admit``); ``close`` (or the ``with`` block) gives
    both back.
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway: Gateway | None = gateway
        self.input_bytes = 0

    @property
    def closed(self) -> bool:
        return self._gateway is None

    def reserve(self, nbytes: int) -> None:
        """Count ``nbytes`` of input against ``max_input_bytes_in_flight``, or raise ``Overloaded``."""
        if self._gateway is None:
            raise errors.RuntimeFailure("reserve on a closed admission")
        self._gateway._reserve(nbytes)
        self.input_bytes += nbytes

    def close(self) -> None:
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            gateway._release(self.input_bytes)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Gateway:
    """Serves requests of one workflow; the HTTP layer (``build_app``) only translates."""

    def __init__(self, workflow_name: str, plan: dag.RequestPlan, invoker: dag.FunctionInvoker,
                 store: RequestStore, *, config: GatewayConfig | None = None,
                 metrics: GatewayMetrics | None = None, scale: ScaleMonitor | None = None) -> None:
        self.workflow_name = workflow_name
        self.plan = plan
        self.config = config if config is not None else GatewayConfig()
        problems = self.config.problems()
        if problems:
            raise errors.BadInput("gateway configuration: " + "; ".join(problems))
        self.metrics = metrics if metrics is not None else GatewayMetrics.create()
        self.scale = scale  # None: /scale answers 404
        self._invoker = invoker
        self._store = store
        self._ids = itertools.count(1)
        self._hints: set[asyncio.Task[None]] = set()
        self.in_flight = 0
        self.input_bytes_in_flight = 0

    def _hint(self, refs: Sequence[str], position: int) -> None:
        task = asyncio.ensure_future(self._send_hint(list(refs), position))
        self._hints.add(task)
        task.add_done_callback(self._hints.discard)

    async def _send_hint(self, refs: list[str], position: int) -> None:
        try:
            await self._store.hint(refs, position=position)
        except Exception as e:  # noqa: BLE001 - a hint is advice: losing one costs eviction order only
            logger.debug("queue hint for %d ref(s) not sent: %s", len(refs), e)

    async def _run_request(self, input_ref: str, request_id: str, ledger: dag.RefLedger) -> dag.RequestTrace:
        """Run the request; start it over when a call's input died with its node."""
        policy = self.config.policy
        for attempt in range(policy.request_retries + 1):
            try:
                return await dag.run_request(self.plan, self._invoker, input_ref, request_id=request_id,
                                             policy=policy, ledger=ledger)
            except errors.InputLost as e:
                if attempt == policy.request_retries:
                    raise
                logger.warning("request %s: %s; starting it over (%d of %d)", request_id, e, attempt + 1,
                               policy.request_retries)
                self.metrics.requests.labels(self.workflow_name, "restarted").inc()
        raise AssertionError("unreachable")

    def admit(self) -> Admission:
        """A slot for one request, or ``Overloaded`` when ``max_in_flight`` are being served."""
        if self.in_flight >= self.config.max_in_flight:
            raise errors.Overloaded(f"{self.in_flight} requests in flight (limit "
                                    f"{self.config.max_in_flight}); retry later")
        self.in_flight += 1
        self.metrics.in_flight.labels(self.workflow_name).inc()
        return Admission(self)

    def _reserve(self, nbytes: int) -> None:
        limit = self.config.max_input_bytes_in_flight
        if self.input_bytes_in_flight + nbytes > limit:
            raise errors.Overloaded(f"inputs of the requests in flight hold {self.input_bytes_in_flight} bytes; "
                                    f"{nbytes} more would pass the limit of {limit}; retry later")
        self.input_bytes_in_flight += nbytes
        self.metrics.input_bytes.labels(self.workflow_name).inc(nbytes)

    def _release(self, input_bytes: int) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.labels(self.workflow_name).dec()
        self.input_bytes_in_flight -= input_bytes
        self.metrics.input_bytes.labels(self.workflow_name).dec(input_bytes)

    def count_failure(self, exc: Exception) -> None:
        """Count a request that did not succeed, by what went wrong."""
        outcome = "overloaded" if isinstance(exc, errors.Overloaded) else type(exc).__name__
        self.metrics.requests.labels(self.workflow_name, outcome).inc()

    async def run(self, admission: Admission, *, array: np.ndarray | None = None, ref: str | None = None,
                  return_ref: bool = False) -> InvokeResult:
        """Run one admitted request on an input array or an existing ref.

        The array is let go of as soon as it is stored: pass it without keeping a reference, and
        the upload's memory goes back before the request's functions run.
        """
        if admission.closed:
            raise errors.RuntimeFailure("run needs an open admission (Gateway.admit)")
        if (array is None) == (ref is None):
            raise errors.BadInput("give exactly one of an input array or an input ref")
        seq = next(self._ids)
        request_id = f"r{seq}"
        # The arrival number is the request's place in the queue: when a GPU fills up, the
        # sidecar moves out first the objects whose readers are furthest back.
        ledger = dag.RefLedger(on_add=lambda refs: self._hint(refs, seq))
        keep: str | None = None
        started = time.monotonic()
        try:
            if array is not None:
                # Read once per entry function per attempt: a request that starts over (an input
                # lost with its node) reads it again; what is left is freed with the request.
                input_ref = await self._store.put_input(
                    array, consumers=len(self.plan.sources) * (1 + self.config.policy.request_retries))
                ledger.add([input_ref])
                array = None  # stored: the pool has it now
            elif ref is not None:
                await self._store.check(ref)
                input_ref = ref  # the caller's object: not ours to free
            stored_s = time.monotonic() - started
            trace = await self._run_request(input_ref, request_id, ledger)
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
            logger.info("request %s failed: %s", request_id, e)
            raise
        except (ft_errors.RefNotFound, ft_errors.PermissionDenied, ft_errors.InvalidRequest) as e:
            raise errors.BadInput(f"{'input ref' if ref is not None else 'input'}: {e}") from e
        finally:
            forget = getattr(self._invoker, "forget", None)
            if forget is not None:
                forget(request_id)
            leftovers = [r for r in ledger.refs if r != keep]
            if leftovers:
                await asyncio.shield(self._store.discard(leftovers))
                self.metrics.freed_refs.labels(self.workflow_name).inc(len(leftovers))


def to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _error_response(exc: Exception) -> web.Response:
    if isinstance(exc, errors.RuntimeFailure):
        status = exc.http_status
    else:  # the data plane failed under us (sidecar gone, pool full)
        status = 503 if isinstance(exc, ft_errors.RetryableError) else 500
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return web.json_response({"error": type(exc).__name__, "message": str(exc)}, status=status, headers=headers)


async def _answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response``, then close the connection: the rest of the body is not worth waiting for."""
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # the client is gone already
    if request.transport is not None:
        request.transport.close()
    return response


def _output_mode(request: web.Request) -> bool:
    """Whether the caller asked for the output's ref (``?output=ref``) rather than its bytes."""
    mode = request.query.get("output", "array")
    if mode not in ("array", "ref"):
        raise errors.BadInput(f"query output: must be 'array' or 'ref', got {mode!r:.40}")
    return mode == "ref"


def build_app(gateway: Gateway) -> web.Application:
    limits = gateway.config.limits

    async def handle_invoke(request: web.Request) -> web.Response:
        try:
            return_ref = _output_mode(request)
            kind = bodies.check_head(request, limits)  # nothing is read before the admission
            with gateway.admit() as admission:
                reader = bodies.BodyReader(request.content, declared_bytes=request.content_length,
                                           limits=limits)
                if kind is bodies.BodyKind.REF:
                    ref = bodies.parse_ref(await reader.read_to_end(limit_bytes=bodies.MAX_REF_BODY_BYTES))
                    result = await gateway.run(admission, ref=ref, return_ref=return_ref)
                else:
                    header = await bodies.read_npy_header(reader)
                    bodies.check_npy_size(header, body_bytes=request.content_length,
                                          max_body_bytes=limits.max_body_bytes)
                    admission.reserve(header.data_bytes)
                    # No name for the array here: the run holds the only reference and drops it
                    # once the array is stored.
                    result = await gateway.run(admission, array=await bodies.read_npy_data(reader, header),
                                               return_ref=return_ref)
        except (errors.RuntimeFailure, ft_errors.FaastubeError) as e:
            gateway.count_failure(e)
            if not isinstance(e, errors.RuntimeFailure):
                logger.warning("invoke failed in the data plane: %s: %s", type(e).__name__, e)
            else:
                logger.debug("invoke refused or failed: %s: %s", type(e).__name__, e)
            response = _error_response(e)
            if isinstance(e, errors.BodyTimedOut):
                return await _answer_and_close(request, response)
            return response
        breakdown = result.breakdown.as_dict()
        headers = {BREAKDOWN_HEADER: json.dumps(breakdown), "X-Faastube-Request-Id": result.request_id}
        if result.output_ref is not None:
            return web.json_response({"ref": result.output_ref, "breakdown": breakdown}, headers=headers)
        if result.output is None:  # the store returned nothing for the exit's ref
            return _error_response(errors.RuntimeFailure("no output was read for the exit"))
        return web.Response(body=to_npy(result.output), content_type=NPY_CONTENT_TYPE, headers=headers)

    async def handle_health(_request: web.Request) -> web.Response:
        return web.json_response({"workflow": gateway.workflow_name, "inFlight": gateway.in_flight})

    async def handle_scale(_request: web.Request) -> web.Response:
        if gateway.scale is None:
            return web.json_response({"error": "NotFound", "message": "this gateway does not monitor scaling"},
                                     status=404)
        return web.json_response({name: scale.as_json() for name, scale in gateway.scale.snapshot().items()})

    async def handle_metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(gateway.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    # /invoke reads its body itself (bodies); other routes take none worth more than this
    app = web.Application(client_max_size=bodies.MAX_REF_BODY_BYTES)
    app.router.add_post("/invoke", handle_invoke)
    app.router.add_get("/healthz", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/scale", handle_scale)
    return app


def make_runner(gateway: Gateway, *, shutdown_timeout_s: float = 60.0) -> web.AppRunner:
    """The gateway's app in a runner whose connections keep to the gateway's limits.

    ``header_timeout_s`` is aiohttp's keep-alive timeout: it closes a connection that has
    no complete request head that long after it opened or after its last answer (aiohttp
    arms it at connection start; the tests check that it does). Bodies are not decompressed
    (``bodies.check_head`` refuses encoded ones), so a small upload cannot expand in memory.
    """
    return web.AppRunner(build_app(gateway), access_log=None, handle_signals=False,
                         shutdown_timeout=shutdown_timeout_s,
                         keepalive_timeout=gateway.config.limits.header_timeout_s,
                         auto_decompress=False)
