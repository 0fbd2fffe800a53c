"""A function worker: one process serving one function's calls from the gateway.

The gateway reaches each worker over HTTP (``POST /call``), on a Unix socket in
local mode or on a TCP port in a cluster (``addresses``); a call names the input refs, the worker fetches them from the node's sidecar,
runs the handler and answers with the output refs and timings. The handler runs on
one dedicated thread: it is ordinary blocking code, and CUDA's current device is per
thread, so that thread is the one bound to this worker's GPU. Calls queue for it and
are gathered into batches by the function's batch policy (``batcher``; without one,
a batch is one call, so calls run one at a time).

A worker is *ready* (``GET /healthz`` 200) only once it is warm: the handler imported,
the sidecar reached, the handler's ``warmup`` hook run and a warm-up call made on zeros
of its inputs' shapes (from the workflow's edges). Until then ``/healthz`` and ``/call``
answer 503; a warm-up that fails ends the process with status 3.

Run as ``python -m faastube_runtime.worker --workflow W.yaml --function NAME
--listen SOCK --sidecar SOCK [--device N] [--passing tube|host-centric]`` (local
mode), or as ``faastube worker`` configured from the pod's environment
(``worker_cli``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from faastube import errors as ft_errors
from faastube import sdk
from faastube_spec.workflow import Workflow, load_workflow

from faastube_runtime import batcher, dag, errors, handlers, startup, wire
from faastube_runtime.addresses import Address, parse_address

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 5.0
# Exit status of a worker whose warm-up failed (2: its configuration is wrong).
EXIT_WARMUP_FAILED = 3


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    workflow: Workflow
    function: str
    listen: Address
    sidecar_socket: str
    device: int | None = None  # CUDA ordinal in this process
    # The node's GPU index (the operator's placement): translated to this process's CUDA
    # ordinal through the sidecar's device map, since a container sees its GPU as device 0.
    gpu_index: int | None = None
    passing: sdk.Passing = "tube"
    startup_timeout_s: float = 0.0  # how long to wait for the sidecar's socket (0: try once)
    namespace: str | None = None  # the Workflow's (None: the client's default)
    # Where handler modules are looked up first (None: the workflow file's folder). Local mode
    # hands workers the workflow it runs as a file of its own, next to none of the handlers.
    handlers_dir: Path | None = None


def _status_for(exc: BaseException) -> tuple[int, bool]:
    """HTTP status and whether another attempt may succeed."""
    if isinstance(exc, errors.BadInput):
        return 400, False
    if isinstance(exc, sdk.HandlerContractError):
        return 422, False
    if isinstance(exc, ft_errors.RefNotFound):
        return 410, False
    if isinstance(exc, sdk.CallExpired):
        return 504, True
    if isinstance(exc, sdk.HandlerFailedPermanently):
        return 500, False
    if isinstance(exc, sdk.HandlerFailed):
        return 500, True
    if isinstance(exc, ft_errors.RetryableError):
        return 503, True
    if isinstance(exc, ft_errors.FaastubeError):
        return 500, False
    return 500, True


@dataclass(frozen=True, slots=True)
class WarmupReport:
    """How a worker got warm: seconds per step (None: the step did not run), and why not."""

    total_s: float
    hook_s: float | None = None  # the handler's ``warmup`` hook
    call_s: float | None = None  # a warm-up call on one request's inputs
    batch_call_s: float | None = None  # a warm-up call on a full batch (maxSize requests)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"total_s": self.total_s, "hook_s": self.hook_s, "call_s": self.call_s,
                "batch_call_s": self.batch_call_s, "note": self.note}


class _HeldReads:
    """Views of failed calls' inputs, per request, kept open (uncounted) for their retries.

    Dropped when the gateway forgets the request, when its call was the final attempt, or,
    oldest first, beyond ``limit`` requests (a gateway that died sends no ``/forget``).
    Used on the handler thread only.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_request: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def of(self, request_id: str) -> dict[str, Any]:
        views = self._by_request.setdefault(request_id, {})
        self._by_request.move_to_end(request_id)
        return views

    def settle(self, request_id: str) -> int:
        """Forget an empty entry, and the oldest requests beyond the limit; views dropped."""
        dropped = 0
        if not self._by_request.get(request_id, True):
            del self._by_request[request_id]
        while len(self._by_request) > self.limit:
            _, views = self._by_request.popitem(last=False)
            dropped += len(views)
        return dropped

    def drop(self, request_id: str) -> int:
        return len(self._by_request.pop(request_id, {}))

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_request.values())


@dataclass(slots=True)
class _Queued:
    call: wire.CallBody
    received: float
    deadline: float
    future: asyncio.Future[tuple[sdk.Invocation, float]]


class FunctionWorker:
    """Validates calls, gathers them into batches and runs them on the worker's one handler thread."""

    def __init__(self, workflow: Workflow, function: str, handler: Callable[..., Any],
                 client: sdk.DataClient, *, device: int | None = None,
                 passing: sdk.Passing = "tube") -> None:
        self.plan = dag.plan_workflow(workflow).function(function)
        self.spec = workflow.function(function)
        self.function = function
        self._workflow = workflow
        self._handler = handler
        self._client = client
        self._device = device
        self._passing = passing
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"fn-{function}", initializer=self._bind_device)
        self.policy = batcher.BatchPolicy.of(self.spec.batch)
        self._batcher: batcher.Batcher[_Queued] = batcher.Batcher(self.policy, self._run_batch)
        self._batching: asyncio.Task[None] | None = None
        self.calls_served = 0
        self._held = _HeldReads(limit=max(4, 2 * self.policy.max_size))
        self._checks = sdk.OutputChecks(function, {
            e.target: sdk.EdgeDeclaration(size_bytes=e.size_bytes, shape=e.shape, dtype=e.dtype)
            for e in workflow.edges if e.source == function})

    @property
    def queued(self) -> int:
        """Calls waiting for the handler thread (not those of the batch running)."""
        return len(self._batcher)

    def _bind_device(self) -> None:
        if self._device is None:
            return
        import cupy

        cupy.cuda.Device(self._device).use()
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.cuda.set_device(self._device)

    def _flush(self) -> None:
        # Dropped views end their reads lazily (on the client's next request); send them now
        # so the objects' memory is not pinned until this worker's next call.
        flush = getattr(self._client, "flush", None)
        if flush is not None:
            flush()

    # --- warm-up ----------------------------------------------------------------------------

    def warmup_inputs(self) -> tuple[dict[str, tuple[tuple[int, ...], str]], str]:
        """name -> (shape, dtype) of one request's inputs, from the edges; or ({}, why not)."""
        shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        missing: list[str] = []
        for name in self.plan.inputs:
            if name == sdk.REQUEST_INPUT:
                if self._workflow.input_shape is None or self._workflow.input_dtype is None:
                    missing.append("the request's input (spec.input)")
                else:
                    shapes[name] = (self._workflow.input_shape, self._workflow.input_dtype)
                continue
            edge = self._workflow.edge(name, self.function)
            if edge.shape is None or edge.dtype is None:
                missing.append(f"the edge {name} -> {self.function}")
            else:
                shapes[name] = (edge.shape, edge.dtype)
        if missing:
            return {}, f"no warm-up call: no shape and dtype for {', '.join(missing)}"
        return shapes, ""

    async def warm_up(self) -> WarmupReport:
        """Run the handler's ``warmup`` hook, then warm-up calls on zeros; raises ``sdk.WarmupFailed``."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._warm_up)

    def _warm_up(self) -> WarmupReport:
        started = time.perf_counter()
        options = sdk.options_of(self._handler)
        framework: sdk.Framework = options.framework if options.framework != "auto" else (
            "numpy" if self._device is None else "cupy")
        hook_s = call_s = batch_call_s = None
        if sdk.run_warmup_hook(self._handler, sdk.WarmupContext(function=self.function, device=self._device,
                                                                framework=framework, passing=self._passing)):
            hook_s = time.perf_counter() - started
        shapes, note = self.warmup_inputs()
        if not shapes:
            logger.warning("function %s gets %s; its first request pays for what a warm-up call warms "
                           "(give those edges shape and dtype)", self.function, note)
        else:
            call_s = self._warm_up_call(shapes, requests=1)
            # A full batch too: the largest inputs the handler will see (memory, autotuning).
            if self.policy.max_size > 1:
                if options.batch == "stack" and not _stackable(shapes):
                    note = "no full-batch warm-up call: the inputs have no common axis 0 to stack"
                else:
                    batch_call_s = self._warm_up_call(shapes, requests=self.policy.max_size)
            self._flush()
        return WarmupReport(total_s=time.perf_counter() - started, hook_s=hook_s, call_s=call_s,
                            batch_call_s=batch_call_s, note=note)

    def _warm_up_call(self, shapes: dict[str, tuple[tuple[int, ...], str]], *, requests: int) -> float:
        started = time.perf_counter()
        try:
            sdk.warm_up_call(self._client, self._handler, inputs=shapes, readers=self.plan.readers,
                             device=self._device, passing=self._passing, requests=requests)
        except sdk.WarmupFailed as e:
            described = ", ".join(f"{n} {d}{list(sh)}" for n, (sh, d) in shapes.items())
            raise sdk.WarmupFailed(f"the warm-up call of {self.function!r} on zeros ({requests} request(s) "
                                   f"of {described}) failed: {e.__cause__ or e}") from e
        return time.perf_counter() - started

    # --- calls ------------------------------------------------------------------------------

    async def call(self, body: Any) -> wire.ReplyBody:
        received = time.monotonic()
        call = wire.parse_call(body, expected_inputs=set(self.plan.inputs))
        if self._batching is None:
            self._batching = asyncio.ensure_future(self._batcher.run_forever())
        future: asyncio.Future[tuple[sdk.Invocation, float]] = asyncio.get_running_loop().create_future()
        self._batcher.submit(_Queued(call=call, received=received, deadline=received + call["timeout_s"],
                                     future=future))
        invocation, finished = await future
        self.calls_served += 1
        t = invocation.timings
        # Whatever of the call's time was not its own data passing or compute was waiting: in the
        # queue, then for the other calls of its batch.
        wait_s = max(0.0, (finished - received) - (t.get_s + t.compute_s + t.put_s))
        return wire.ReplyBody(outputs=dict(invocation.outputs), refs=list(invocation.refs),
                              timings=wire.TimingsBody(get_s=t.get_s, compute_s=t.compute_s,
                                                       put_s=t.put_s, wait_s=wait_s),
                              batch_size=invocation.batch_size)

    async def _run_batch(self, items: list[_Queued]) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._executor, self._work, items)
        except BaseException as e:
            for item in items:
                if not item.future.done():
                    item.future.set_exception(e if isinstance(e, Exception) else errors.RuntimeFailure(str(e)))
            raise
        finished = time.monotonic()
        abandoned: list[str] = []
        for item, outcome in zip(items, outcomes, strict=True):
            if item.future.done():  # its HTTP exchange is gone: nobody will learn these refs
                if isinstance(outcome, sdk.Invocation):
                    abandoned.extend(outcome.refs)
            elif isinstance(outcome, Exception):
                item.future.set_exception(outcome)
            else:
                item.future.set_result((outcome, finished))
        if abandoned:
            await loop.run_in_executor(self._executor, sdk.discard, self._client, abandoned)

    def _work(self, items: list[_Queued]) -> list[sdk.Invocation | Exception]:
        """One batch, on the handler thread."""
        calls = [sdk.Call(inputs=item.call["inputs"], deadline=item.deadline,
                          held=self._held.of(item.call["request_id"])) for item in items]
        outcomes = sdk.execute_batch(self._client, self._handler, calls, readers=self.plan.readers,
                                     device=self._device, passing=self._passing, checks=self._checks)
        del calls
        dropped = 0
        for item, outcome in zip(items, outcomes, strict=True):
            request_id = item.call["request_id"]
            # Keep a failed call's reads open only while a retry may follow; the gateway
            # sends /forget when the request ends.
            if isinstance(outcome, Exception) and item.call["final"]:
                dropped += self._held.drop(request_id)
            dropped += self._held.settle(request_id)
        if dropped:
            self._flush()
        return outcomes

    async def forget(self, body: Any) -> int:
        """The gateway is done with a request: end the reads kept open for its retries."""
        request_id = wire.parse_forget(body)

        def drop() -> int:
            count = self._held.drop(request_id)
            if count:
                self._flush()
            return count

        return await asyncio.get_running_loop().run_in_executor(self._executor, drop)

    def close(self) -> None:
        if self._batching is not None:
            self._batching.cancel()
            self._batching = None
        self._executor.shutdown(wait=True, cancel_futures=True)


def _stackable(shapes: dict[str, tuple[tuple[int, ...], str]]) -> bool:
    return all(shape for shape, _ in shapes.values()) and len({shape[0] for shape, _ in shapes.values()}) == 1


class WorkerState:
    """What the HTTP side serves: the worker once it is warm, and how far it got until then."""

    def __init__(self, function: str) -> None:
        self.function = function
        self.phase = "starting"
        self.worker: FunctionWorker | None = None
        self.client: Any = None
        self.warmup: WarmupReport | None = None

    @classmethod
    def serving(cls, worker: FunctionWorker, warmup: WarmupReport | None = None) -> WorkerState:
        state = cls(worker.function)
        state.worker, state.warmup, state.phase = worker, warmup, "ready"
        return state

    @property
    def ready(self) -> bool:
        return self.phase == "ready" and self.worker is not None

    def health(self) -> tuple[int, dict[str, Any]]:
        if not self.ready or self.worker is None:
            return 503, {"ready": False, "function": self.function, "phase": self.phase}
        return 200, {"ready": True, "function": self.function, "calls": self.worker.calls_served,
                     "warmup": None if self.warmup is None else self.warmup.as_dict()}


def build_app(target: FunctionWorker | WorkerState) -> web.Application:
    state = target if isinstance(target, WorkerState) else WorkerState.serving(target)

    async def handle_call(request: web.Request) -> web.Response:
        worker = state.worker
        if not state.ready or worker is None:
            return _error(errors.NotReady(f"function {state.function!r} is not ready: {state.phase}"))
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(errors.BadInput(f"call body is not JSON: {e}"))
        try:
            reply = await worker.call(body)
        except Exception as e:  # noqa: BLE001 - every failure becomes an error reply the gateway acts on
            status, _ = _status_for(e)
            # A handler's error: its traceback goes to this worker's log (fn-*.log in local mode).
            (logger.warning if status >= 500 else logger.info)(
                "%s: call failed: %s: %s", worker.function, type(e).__name__, e,
                exc_info=e.__cause__ if isinstance(e, sdk.HandlerError) else None)
            return _error(e)
        return web.json_response(reply)

    async def handle_forget(request: web.Request) -> web.Response:
        worker = state.worker
        if worker is None:
            return web.json_response({"dropped": 0})
        try:
            dropped = await worker.forget(await request.json())
        except (json.JSONDecodeError, UnicodeDecodeError, errors.BadInput) as e:
            return _error(errors.BadInput(f"forget body: {e}"))
        return web.json_response({"dropped": dropped})

    async def handle_health(_request: web.Request) -> web.Response:
        status, body = state.health()
        return web.json_response(body, status=status)

    app = web.Application(client_max_size=1 << 20)
    app.router.add_post(wire.CALL_PATH, handle_call)
    app.router.add_post(wire.FORGET_PATH, handle_forget)
    app.router.add_get(wire.HEALTH_PATH, handle_health)
    return app


def _error(exc: BaseException) -> web.Response:
    status, retryable = _status_for(exc)
    body = wire.ErrorBody(error=type(exc).__name__, message=str(exc)[:2000], retryable=retryable)
    return web.json_response(body, status=status)


def cuda_ordinal(client: Any, gpu_index: int) -> int:
    """This process's CUDA ordinal of the node's GPU ``gpu_index``, from the sidecar's map."""
    ordinal = client.cuda_ordinal(gpu_index)
    if ordinal is not None:
        return int(ordinal)
    gpu_of: dict[int, int] = client.gpu_indices
    raise errors.BadInput(
        f"GPU index {gpu_index}: not visible in this process (the sidecar maps CUDA devices "
        f"{sorted(gpu_of.items()) or 'none'} as (ordinal, GPU index); backend "
        f"{getattr(client, 'backend', '?')})")


async def serve(config: WorkerConfig) -> None:
    """Listen at once (``/healthz`` says how far start-up got), then connect to the sidecar and
    warm up; serve until SIGTERM. Raises ``sdk.WarmupFailed`` when the warm-up fails."""
    workflow = config.workflow
    try:
        spec = workflow.function(config.function)
    except KeyError as e:
        raise errors.BadInput(f"--function: {e.args[0]}") from None
    handler = handlers.load_handler(workflow, spec, search_dir=config.handlers_dir)
    state = WorkerState(config.function)
    runner = web.AppRunner(build_app(state), handle_signals=False, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await runner.setup()
    try:
        listen = config.listen
        site: web.BaseSite
        if listen.scheme == "unix":
            if os.path.exists(listen.path):
                os.unlink(listen.path)
            site = web.UnixSite(runner, listen.path)
        else:
            site = web.TCPSite(runner, listen.host, listen.port)
        try:
            await site.start()
        except OSError as e:
            raise errors.BadInput(f"--listen: cannot listen on {listen}: {e.strerror or e}") from e
        logger.info("worker %s listening on %s (%s passing); warming up", config.function,
                    runner.addresses, config.passing)
        starting = asyncio.ensure_future(_get_ready(config, handler, state))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not starting.done():
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            else:
                starting.result()  # a failed start-up ends the worker with its error
        await stopping
    finally:
        await runner.cleanup()
        if state.worker is not None:
            state.worker.close()
        if state.client is not None:
            state.client.close()


async def _get_ready(config: WorkerConfig, handler: Callable[..., Any], state: WorkerState) -> None:
    state.phase = "waiting for the sidecar"
    state.client = await asyncio.to_thread(startup.connect_sidecar, config.sidecar_socket,
                                           namespace=config.namespace, workflow=config.workflow.name,
                                           function=config.function,
                                           startup_timeout_s=config.startup_timeout_s)
    device = config.device if config.gpu_index is None else cuda_ordinal(state.client, config.gpu_index)
    state.worker = FunctionWorker(config.workflow, config.function, handler, state.client, device=device,
                                  passing=config.passing)
    state.phase = "warming up"
    report = await state.worker.warm_up()
    state.warmup = report
    state.phase = "ready"
    steps = [f"{name} {value:.3f}s" for name, value in (("hook", report.hook_s), ("call", report.call_s),
                                                         ("full-batch call", report.batch_call_s))
             if value is not None]
    logger.info("worker %s ready on device %s: warm in %.3fs (%s)%s", config.function, device, report.total_s,
                ", ".join(steps) or "nothing to warm", f"; {report.note}" if report.note else "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workflow", required=True, help="the workflow YAML")
    parser.add_argument("--function", required=True, help="the function this worker serves")
    parser.add_argument("--listen", required=True,
                        help="where to serve calls: a Unix socket path, unix:/path or tcp://host:port")
    parser.add_argument("--sidecar", required=True, help="the sidecar's Unix socket")
    parser.add_argument("--device", type=int, default=None, help="GPU index (omit for a CPU function)")
    parser.add_argument("--passing", choices=sdk.PASSINGS, default="tube")
    parser.add_argument("--handlers-dir", type=Path, default=None,
                        help="look for handler modules here first (default: the workflow file's folder)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faastube_runtime.worker", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("FAASTUBE_LOG_LEVEL", "WARNING"))
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s worker[{args.function}] %(name)s: %(message)s")
    try:
        config = WorkerConfig(workflow=load_workflow(args.workflow), function=args.function,
                              listen=parse_address(args.listen, field="--listen", listen=True),
                              sidecar_socket=args.sidecar, device=args.device, passing=args.passing,
                              handlers_dir=args.handlers_dir)
        asyncio.run(serve(config))
    except sdk.WarmupFailed as e:
        print(f"worker {args.function}: warm-up failed: {e}", file=sys.stderr)
        return EXIT_WARMUP_FAILED
    except ft_errors.FaastubeError as e:
        print(f"worker {args.function}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
