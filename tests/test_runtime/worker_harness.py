"""A function worker served on its Unix socket, as the gateway reaches it, against a real
sidecar: for the tests that post calls to one (test_worker_calls.py, test_batching.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import numpy as np
from faastube import client as ft_client
from faastube_runtime import wire
from faastube_runtime.worker import FunctionWorker, build_app
from faastube_spec.workflow import Workflow


class Served:
    """A served worker: post bodies to it; ``tester``, a client of the same workflow, puts its
    inputs and reads its outputs."""

    def __init__(self, session: aiohttp.ClientSession, tester: ft_client.Client, worker: FunctionWorker,
                 *, tester_function: str) -> None:
        self.session = session
        self.tester = tester
        self.worker = worker
        self._tester_function = tester_function
        self._ids = iter(range(1, 1 << 30))
        self.inputs: dict[str, dict[str, str]] = {}  # request id -> its input refs

    async def post(self, path: str, body: object) -> tuple[int, dict[str, Any]]:
        async with self.session.post(f"http://w{path}", json=body) as r:
            return r.status, await r.json()

    async def call(self, arrays: dict[str, np.ndarray] | np.ndarray, *, timeout_s: float = 30.0,
                   request_id: str | None = None, final: bool = False) -> tuple[int, dict[str, Any]]:
        """Put ``arrays`` and call the worker with them. One array is the tester's own output,
        the input named after its function (as an upstream function's would be)."""
        named = {self._tester_function: arrays} if isinstance(arrays, np.ndarray) else arrays
        request_id = request_id or f"r{next(self._ids)}"
        refs = self.inputs[request_id] = {name: self.tester.put(a, consumers=1) for name, a in named.items()}
        body = {"request_id": request_id, "attempt": 1, "final": final, "inputs": refs, "timeout_s": timeout_s}
        return await self.post(wire.CALL_PATH, body)

    def read(self, ref: str) -> np.ndarray:
        return np.array(self.tester.get(ref, copy=True))


@contextlib.asynccontextmanager
async def serve(sidecar_socket: str, tmp_path: Path, wf: Workflow, function: str,
                handler: Callable[..., Any], *, tester_function: str) -> AsyncIterator[Served]:
    """``function`` of ``wf`` running ``handler``, served in this process until the block ends."""
    client = ft_client.connect(sidecar_socket, workflow=wf.name, function=function)
    worker = FunctionWorker(wf, function, handler, client)
    runner = aiohttp.web.AppRunner(build_app(worker))
    await runner.setup()
    sock = str(tmp_path / "w.sock")
    await aiohttp.web.UnixSite(runner, sock).start()
    tester = ft_client.connect(sidecar_socket, workflow=wf.name, function=tester_function)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as session:
            yield Served(session, tester, worker, tester_function=tester_function)
    finally:
        await runner.cleanup()
        worker.close()
        tester.close()
        client.close()
