"""Local mode's autoscaling: worker processes follow the autoscaler's decisions.

``ReplicaController`` listens to the ``ScaleMonitor`` and, per autoscaled function,
starts worker processes when fewer are serving or starting than desired, and stops the
newest when more are serving. A new replica joins the pool only once its ``/healthz``
answers 200 (so a worker that loads its model first gets calls only when warm); a
replica to stop leaves the pool first, so no new call reaches it, and its process is
stopped only after its running calls ended (``WorkerPool.leave``).

Acting is asynchronous (a worker takes seconds to start) and idempotent: each decision
is compared with what is serving plus what is starting, so a decision repeated every
second does not start the same replica twice. A worker that fails to start is logged
and the function waits ``RETRY_START_S`` (doubling, capped) before trying again, so a
broken handler does not fork a process every second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from faastube_spec.workflow import Workflow

from faastube_runtime import errors
from faastube_runtime.addresses import Address
from faastube_runtime.invoker import Replica
from faastube_runtime.load import Clock
from faastube_runtime.scaling import FunctionScale

logger = logging.getLogger(__name__)

RETRY_START_S = 1.0
MAX_RETRY_START_S = 30.0


class Launcher(Protocol):
    """Starts and stops worker processes (``LocalRuntime``)."""

    async def start_replica(self, function: str) -> Address:
        """Start a worker and return its address once its ``/healthz`` answers 200."""

    async def stop_replica(self, function: str, address: Address) -> None:
        """Stop the worker at ``address`` (it takes no calls any more)."""


class Membership(Protocol):
    """The pool's replica sets (``WorkerPool``)."""

    def replicas(self, function: str) -> tuple[Replica, ...]: ...

    def join(self, function: str, address: Address) -> Replica: ...

    async def leave(self, function: str, address: Address) -> None: ...


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    at_s: float  # the controller's clock (monotonic)
    function: str
    action: Literal["up", "down", "failed"]
    replicas: int  # serving after the event
    detail: str


@dataclass(frozen=True, slots=True)
class FunctionScaling:
    """What one function did over a run."""

    initial: int
    final: int
    fewest: int
    most: int
    scale_ups: int
    scale_downs: int
    failed_starts: int

    def as_dict(self) -> dict[str, int]:
        return {"initial": self.initial, "final": self.final, "fewest": self.fewest, "most": self.most,
                "scaleUps": self.scale_ups, "scaleDowns": self.scale_downs, "failedStarts": self.failed_starts}


class ReplicaController:
    """Keeps each autoscaled function's worker processes at the autoscaler's ``desired``."""

    def __init__(self, workflow: Workflow, pool: Membership, launcher: Launcher, *,
                 clock: Clock = time.monotonic, on_event: Callable[[ScaleEvent], None] | None = None) -> None:
        self.workflow = workflow
        self._pool = pool
        self._launcher = launcher
        self._clock = clock
        self._on_event = on_event
        self._scaled = {fn.name for fn in workflow.functions if fn.autoscaled}
        self._starting = dict.fromkeys(self._scaled, 0)
        self._failures = dict.fromkeys(self._scaled, 0)
        self._retry_at = dict.fromkeys(self._scaled, 0.0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: set[Replica] = set()
        self.events: list[ScaleEvent] = []
        serving = {name: len(pool.replicas(name)) for name in (fn.name for fn in workflow.functions)}
        self._initial = dict(serving)
        self._fewest = dict(serving)
        self._most = dict(serving)
        self._closed = False

    def apply(self, decisions: Mapping[str, FunctionScale]) -> None:
        """Start or stop replicas toward each autoscaled function's desired count (a monitor listener)."""
        if self._closed:
            return
        now = self._clock()
        for name in self._scaled:
            scale = decisions.get(name)
            if scale is None:
                continue
            serving = self._pool.replicas(name)
            have = len(serving) + self._starting[name]
            if scale.desired > have and now >= self._retry_at[name]:
                for _ in range(scale.desired - have):
                    self._starting[name] += 1
                    self._spawn(self._start(name, scale))
            elif scale.desired < len(serving) and not self._starting[name]:
                # the newest first: the oldest replicas are the warmest
                for replica in sorted(serving, key=lambda r: r.index)[scale.desired:]:
                    if replica not in self._stopping:
                        self._stopping.add(replica)
                        self._spawn(self._stop(name, replica, scale))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, name: str, scale: FunctionScale) -> None:
        try:
            address = await self._launcher.start_replica(name)
        except errors.RuntimeFailure as e:
            self._failures[name] += 1
            wait_s = min(MAX_RETRY_START_S, RETRY_START_S * 2 ** (self._failures[name] - 1))
            self._retry_at[name] = self._clock() + wait_s
            self._record(name, "failed", f"a new worker did not start ({e}); next try in {wait_s:.0f}s")
            return
        finally:
            self._starting[name] -= 1
        self._failures[name] = 0
        if self._closed:
            await self._launcher.stop_replica(name, address)
            return
        replica = self._pool.join(name, address)
        self._record(name, "up", f"{name}[{replica.index}] started ({scale.reason}, concurrency "
                                 f"{scale.concurrency:.2f}, desired {scale.desired})")

    async def _stop(self, name: str, replica: Replica, scale: FunctionScale) -> None:
        try:
            await self._pool.leave(name, replica.address)
            self._record(name, "down", f"{name}[{replica.index}] stopping ({scale.reason}, concurrency "
                                       f"{scale.concurrency:.2f}, desired {scale.desired})")
            await self._launcher.stop_replica(name, replica.address)
        finally:
            self._stopping.discard(replica)

    def _record(self, name: str, action: Literal["up", "down", "failed"], detail: str) -> None:
        serving = len(self._pool.replicas(name))
        self._fewest[name] = min(self._fewest[name], serving)
        self._most[name] = max(self._most[name], serving)
        event = ScaleEvent(at_s=self._clock(), function=name, action=action, replicas=serving, detail=detail)
        self.events.append(event)
        log = logger.warning if action == "failed" else logger.info
        log("scaled %s %s to %d replica(s): %s", name, action, serving, detail)
        if self._on_event is not None:
            self._on_event(event)

    async def idle(self) -> None:
        """Wait until no start or stop is under way."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Act no more; starts under way are cancelled (their processes go with the runtime)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def report(self) -> dict[str, FunctionScaling]:
        """Per function: serving at the start and now, fewest and most, scale events."""
        out = {}
        for fn in self.workflow.functions:
            name = fn.name
            events = [e for e in self.events if e.function == name]
            serving = len(self._pool.replicas(name))
            out[name] = FunctionScaling(
                initial=self._initial[name], final=serving, fewest=min(self._fewest[name], serving),
                most=max(self._most[name], serving), scale_ups=sum(e.action == "up" for e in events),
                scale_downs=sum(e.action == "down" for e in events),
                failed_starts=sum(e.action == "failed" for e in events))
        return out
