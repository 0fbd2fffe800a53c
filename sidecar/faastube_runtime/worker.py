"""A function worker: one process serving one function's calls from the gateway.

The gateway reaches each worker over HTTP (``POST /call``), on a Unix socket in
local mode or on a TCP port in a cluster (``addresses``); a call names the input refs, the worker fetches them from the node's sidecar,
runs the handler and answers with the output refs and timings. One call runs at
a time per process (replicas are processes), on one dedicated thread: the
handler is ordinary blocking code, and CUDA's current device is per thread, so
that thread is the one bound to this worker's GPU.

Run as ``python -m faastube_runtime.worker --workflow W.yaml --function NAME
--listen SOCK --sidecar SOCK [--device N] [--passing tube|host-centric]`` (local
mode), or as ``faastube worker`` configured from the pod's environment
(``worker_cli``).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from faastube import errors as ft_errors
from faastube import sdk
from faastube_spec.workflow import Workflow, load_workflow

from faastube_runtime import dag, errors, handlers, startup, wire
from faastube_runtime.addresses import Address, parse_address

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 5.0


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
    if isinstance(exc, sdk.HandlerFailed):
        return 500, True
    if isinstance(exc, ft_errors.RetryableError):
        return 503, True
    if isinstance(exc, ft_errors.FaastubeError):
        return 500, False
    return 500, True


class FunctionWorker:
    """Validates calls and runs them on the worker's one handler thread."""

    def __init__(self, workflow: Workflow, function: str, handler: Callable[..., Any],
                 client: sdk.DataClient, *, device: int | None = None,
                 passing: sdk.Passing = "tube") -> None:
        self.plan = dag.plan_workflow(workflow).function(function)
        self.function = function
        self._handler = handler
        self._client = client
        self._device = device
        self._passing = passing
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"fn-{function}", initializer=self._bind_device)
        self.calls_served = 0
        # views of a failed call's inputs, kept open for its retry (see sdk.execute)
        self._held: dict[str, Any] = {}
        self._held_request = ""

    def _bind_device(self) -> None:
        if self._device is None:
            return
        import cupy

        cupy.cuda.Device(self._device).use()
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.cuda.set_device(self._device)

    def _drop_held(self) -> None:
        if not self._held:
            return
        self._held.clear()
        # Dropped views end their reads lazily (on the client's next request); send them now
        # so the objects' memory is not pinned until this worker's next call.
        flush = getattr(self._client, "flush", None)
        if flush is not None:
            flush()

    async def call(self, body: Any) -> wire.ReplyBody:
        received = time.monotonic()
        call = wire.parse_call(body, expected_inputs=set(self.plan.inputs))
        deadline = received + call["timeout_s"]
        loop = asyncio.get_running_loop()

        def work() -> tuple[float, sdk.Invocation]:
            started = time.monotonic()
            if call["request_id"] != self._held_request:
                self._drop_held()  # a new request: earlier failures will not be retried here
                self._held_request = call["request_id"]
            if started > deadline:
                raise sdk.CallExpired("the call waited past its deadline before it could start")
            try:
                return started - received, sdk.execute(
                    self._client, self._handler, inputs=call["inputs"], readers=self.plan.readers,
                    device=self._device, passing=self._passing, deadline=deadline, held=self._held)
            except Exception:
                # Keep a failed call's reads open only while a retry may follow; the gateway
                # sends /forget when the request ends.
                if call["final"]:
                    self._drop_held()
                raise

        wait_s, invocation = await loop.run_in_executor(self._executor, work)
        self.calls_served += 1
        t = invocation.timings
        return wire.ReplyBody(outputs=dict(invocation.outputs), refs=list(invocation.refs),
                              timings=wire.TimingsBody(get_s=t.get_s, compute_s=t.compute_s,
                                                       put_s=t.put_s, wait_s=wait_s))

    async def forget(self, body: Any) -> int:
        """The gateway is done with a request: end the reads kept open for its retries."""
        request_id = wire.parse_forget(body)

        def drop() -> int:
            if request_id != self._held_request:
                return 0
            count = len(self._held)
            self._drop_held()
            return count

        return await asyncio.get_running_loop().run_in_executor(self._executor, drop)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def build_app(worker: FunctionWorker) -> web.Application:
    async def handle_call(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(errors.BadInput(f"call body is not JSON: {e}"))
        try:
            reply = await worker.call(body)
        except Exception as e:  # noqa: BLE001 - every failure becomes an error reply the gateway acts on
            status, _ = _status_for(e)
            (logger.warning if status >= 500 else logger.info)(
                "%s: call failed: %s: %s", worker.function, type(e).__name__, e)
            return _error(e)
        return web.json_response(reply)

    async def handle_forget(request: web.Request) -> web.Response:
        try:
            dropped = await worker.forget(await request.json())
        except (json.JSONDecodeError, UnicodeDecodeError, errors.BadInput) as e:
            return _error(errors.BadInput(f"forget body: {e}"))
        return web.json_response({"dropped": dropped})

    async def handle_health(_request: web.Request) -> web.Response:
        return web.json_response({"function": worker.function, "calls": worker.calls_served})

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
    workflow = config.workflow
    try:
        spec = workflow.function(config.function)
    except KeyError as e:
        raise errors.BadInput(f"--function: {e.args[0]}") from None
    handler = handlers.load_handler(workflow, spec)
    client = await asyncio.to_thread(startup.connect_sidecar, config.sidecar_socket,
                                     namespace=config.namespace, workflow=workflow.name,
                                     function=config.function,
                                     startup_timeout_s=config.startup_timeout_s)
    try:
        device = config.device if config.gpu_index is None else cuda_ordinal(client, config.gpu_index)
    except BaseException:
        client.close()
        raise
    worker = FunctionWorker(workflow, config.function, handler, client, device=device,
                            passing=config.passing)
    runner = web.AppRunner(build_app(worker), handle_signals=False, access_log=None,
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
        logger.info("worker %s listening on %s (device %s, %s passing)", config.function,
                    runner.addresses, device, config.passing)
        await stop.wait()
    finally:
        await runner.cleanup()
        worker.close()
        client.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workflow", required=True, help="the workflow YAML")
    parser.add_argument("--function", required=True, help="the function this worker serves")
    parser.add_argument("--listen", required=True,
                        help="where to serve calls: a Unix socket path, unix:/path or tcp://host:port")
    parser.add_argument("--sidecar", required=True, help="the sidecar's Unix socket")
    parser.add_argument("--device", type=int, default=None, help="GPU index (omit for a CPU function)")
    parser.add_argument("--passing", choices=sdk.PASSINGS, default="tube")


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
                              sidecar_socket=args.sidecar, device=args.device, passing=args.passing)
        asyncio.run(serve(config))
    except ft_errors.FaastubeError as e:
        print(f"worker {args.function}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
