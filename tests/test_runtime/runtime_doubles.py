"""Test doubles for pure DAG-scheduling tests of the runtime (not used by the full tests).

``MemoryStore`` follows contract 4's semantics that the runtime relies on: ``put``
with ``consumers`` frees the object after that many ``release`` calls; ``free``
drops it now; unknown refs raise ``RefNotFound``. ``InProcessInvoker`` runs the
real ``sdk.execute`` against it, so the DAG, the calling convention and the ref
accounting are the production code.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from faastube import errors, sdk
from faastube_runtime import dag
from faastube_runtime import errors as rt_errors


class MemoryStore:
    def __init__(self) -> None:
        self.objects: dict[str, tuple[np.ndarray, int | None, int]] = {}
        self._ids = itertools.count(1)
        self.puts = 0

    def put(self, array: Any, *, consumers: int | None = None, ttl: float | None = None) -> str:
        ref = f"mem-{next(self._ids)}"
        self.objects[ref] = (np.array(array, copy=True), consumers, 0)
        self.puts += 1
        return ref

    def get(self, ref: str, *, device: int | str | None = None, copy: bool = False) -> Any:
        if ref not in self.objects:
            raise errors.RefNotFound(ref)
        array = self.objects[ref][0]
        return array.copy() if copy else array

    def release(self, ref: str) -> None:
        if ref not in self.objects:
            raise errors.RefNotFound(ref)
        array, consumers, released = self.objects[ref]
        released += 1
        if consumers is not None and released >= consumers:
            del self.objects[ref]
        else:
            self.objects[ref] = (array, consumers, released)

    def free(self, ref: str) -> None:
        if self.objects.pop(ref, None) is None:
            raise errors.RefNotFound(ref)


class InProcessInvoker:
    """Runs handlers in this process; ``fail`` / ``delay_s`` inject faults per function."""

    def __init__(self, store: MemoryStore, handlers: Mapping[str, Callable[..., Any]], plan: dag.RequestPlan,
                 *, delay_s: Mapping[str, float] | None = None) -> None:
        self.store = store
        self.handlers = dict(handlers)
        self.plan = plan
        self.delay_s = dict(delay_s or {})
        self.attempts: dict[str, int] = {}
        self.running: dict[str, int] = {}
        self.max_running: dict[str, int] = {}

    async def invoke(self, function: str, inputs: Mapping[str, str], *, request_id: str,
                     attempt: int, final: bool, timeout_s: float) -> dag.CallOutcome:
        self.attempts[function] = self.attempts.get(function, 0) + 1
        self.running[function] = self.running.get(function, 0) + 1
        self.max_running[function] = max(self.max_running.get(function, 0), self.running[function])
        try:
            if self.delay_s.get(function):
                await asyncio.sleep(self.delay_s[function])
            try:
                inv = sdk.execute(self.store, self.handlers[function], inputs=inputs,
                                  readers=self.plan.function(function).readers)
            except sdk.HandlerError as e:
                raise rt_errors.CallFailed(str(e), retryable=isinstance(e, sdk.HandlerFailed)) from e
            except sdk.HandlerContractError as e:
                raise rt_errors.CallFailed(str(e), retryable=False) from e
            t = inv.timings
            return dag.CallOutcome(outputs=inv.outputs, get_s=t.get_s, compute_s=t.compute_s,
                                   put_s=t.put_s, queue_s=0.0, refs=inv.refs)
        finally:
            self.running[function] -= 1
