"""Calling function workers over HTTP (Unix socket or TCP), a bounded number of calls per replica.

Each function has a queue of free replica *slots*; a call takes one (waiting is the
request's queueing time), sends ``POST /call``, and puts the slot back. A replica has
one slot, or its function's ``batch.maxSize`` slots when the function batches (the
worker gathers the calls it holds into one handler call). So the concurrency of a
function is bounded by replicas x slots, and a waiting call costs nothing but a
parked coroutine.

The replica set may change while serving (``set_replicas``: in a cluster, pods
come and go behind a function's Service; ``join`` and ``leave``: local mode's
autoscaling starting and stopping worker processes). A removed replica finishes the
call it is running and is then dropped instead of going back to the queue (``leave``
returns only then, so its process can be stopped); a call for a function with no
replica waits for one, within its timeout, and ``watch_starvation`` hears of it at
once (a scaled-to-zero function needs a replica started).

Per function, a ``load.LoadCounter`` counts the calls running on a replica and the
calls waiting for one (``load``): what the autoscaler samples.

A call the gateway gives up on (timeout, failed sibling) is not cut off: the worker
is busy with it either way. It becomes an orphan that runs to its end; whatever
refs it reports are handed to ``discard`` (the pool must not keep them), and only
then does the replica take new calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import aiohttp

from faastube_runtime import dag, errors, wire
from faastube_runtime.addresses import Address
from faastube_runtime.load import Clock, LoadCounter, LoadReading

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Replica:
    function: str
    index: int  # distinct per function over the pool's life (log names: fn[index])
    address: Address


class WorkerPool:
    """A ``dag.FunctionInvoker`` over worker processes; use as an async context manager.

    ``require_all`` (local mode) refuses to start unless every function has a
    replica; a cluster gateway starts empty and learns replicas as pods get ready.
    """

    def __init__(self, plan: dag.RequestPlan, replicas: Mapping[str, Sequence[Replica]], *,
                 discard: Callable[[Sequence[str]], Awaitable[None]],
                 require_all: bool = True, clock: Clock = time.monotonic) -> None:
        names = {f.name for f in plan.functions}
        unknown = set(replicas) - names
        if unknown:
            raise errors.StartupFailed(f"replicas given for unknown function(s) {sorted(unknown)}")
        missing = names - {name for name, r in replicas.items() if r}
        if missing and require_all:
            raise errors.StartupFailed(f"no worker replica for function(s) {sorted(missing)}")
        self._plan = plan
        # function -> address -> replica: the current members; the idle queues may still
        # hold replicas removed since (skipped when taken)
        self._members: dict[str, dict[Address, Replica]] = {name: {} for name in names}
        self._next_index = {name: 0 for name in names}
        self._idle: dict[str, asyncio.Queue[Replica]] = {name: asyncio.Queue() for name in names}
        self._sessions: dict[Replica, aiohttp.ClientSession] = {}
        self._discard = discard
        self._orphans: set[asyncio.Task[None]] = set()
        # request id -> replicas whose call for it failed or was abandoned (they may hold reads)
        self._failed_on: dict[str, set[Replica]] = {}
        self._initial = {name: list(r) for name, r in replicas.items()}
        self._entered = False
        self._load = {name: LoadCounter(clock) for name in names}
        # calls on a replica (slots taken, abandoned calls too); its session closes once none is
        self._busy: dict[Replica, int] = {}
        self._leaving: dict[Replica, asyncio.Event] = {}  # set once a removed replica is unused
        self._on_starved: Callable[[str], None] | None = None

    async def __aenter__(self) -> Self:
        # Sessions are made inside the loop that uses them.
        self._entered = True
        for name, replicas in self._initial.items():
            for replica in replicas:
                self._add(replica)
                self._next_index[name] = max(self._next_index[name], replica.index + 1)
        return self

    def _add(self, replica: Replica) -> None:
        self._members[replica.function][replica.address] = replica
        self._sessions[replica] = aiohttp.ClientSession(connector=replica.address.connector(),
                                                        timeout=aiohttp.ClientTimeout(total=None))
        for _ in range(self._plan.function(replica.function).max_batch):  # one slot per call it may hold
            self._idle[replica.function].put_nowait(replica)

    def replicas(self, function: str) -> tuple[Replica, ...]:
        """The current members of ``function``'s replica set."""
        return tuple(self._members[function].values())

    def set_replicas(self, function: str, addresses: Sequence[Address]) -> None:
        """Make ``addresses`` the replica set of ``function`` (idempotent)."""
        if function not in self._members:
            raise errors.BadInput(f"unknown function {function!r}")
        if not self._entered:
            raise errors.StartupFailed("set_replicas before the pool was entered")
        current = self._members[function]
        wanted = set(addresses)
        for address in [a for a in current if a not in wanted]:
            replica = current.pop(address)
            logger.info("replica %s[%d] at %s left", function, replica.index, address)
            self._prune_idle(function)
        for address in addresses:
            if address not in current:
                replica = Replica(function, self._next_index[function], address)
                self._next_index[function] += 1
                logger.info("replica %s[%d] at %s joined", function, replica.index, address)
                self._add(replica)

    def join(self, function: str, address: Address) -> Replica:
        """Add one replica of ``function`` at ``address`` (the existing one if it is a member)."""
        current = self._check_function(function)
        if address in current:
            return current[address]
        replica = Replica(function, self._next_index[function], address)
        self._next_index[function] += 1
        logger.info("replica %s[%d] at %s joined", function, replica.index, address)
        self._add(replica)
        return replica

    async def leave(self, function: str, address: Address) -> None:
        """Remove a replica and return once nothing uses it: its calls ended, its kept reads forgotten.

        New calls stop going to it at once; only then is it safe to stop its process.
        """
        replica = self._check_function(function).pop(address, None)
        if replica is None:
            return
        logger.info("replica %s[%d] at %s leaving", function, replica.index, address)
        self._prune_idle(function)
        if self._in_use(replica):
            released = self._leaving.setdefault(replica, asyncio.Event())
            await released.wait()

    def _check_function(self, function: str) -> dict[Address, Replica]:
        if function not in self._members:
            raise errors.BadInput(f"unknown function {function!r}")
        if not self._entered:
            raise errors.StartupFailed("replica set changed before the pool was entered")
        return self._members[function]

    def _in_use(self, replica: Replica) -> bool:
        return self._busy.get(replica, 0) > 0 or self._failed_on_any(replica)

    def _note_released(self, replica: Replica) -> None:
        """Wake a ``leave`` waiting for ``replica`` once nothing uses it any more."""
        released = self._leaving.get(replica)
        if released is not None and not self._in_use(replica):
            del self._leaving[replica]
            released.set()

    def load(self, function: str) -> LoadReading:
        """Calls of ``function`` running and waiting now, and their integral over time."""
        return self._load[function].read()

    def watch_starvation(self, callback: Callable[[str], None] | None) -> None:
        """Call ``callback(function)`` whenever a call starts waiting for a function with no replica."""
        self._on_starved = callback

    def _prune_idle(self, function: str) -> None:
        """Drop idle replicas that are no longer members (busy ones go when they come back)."""
        queue = self._idle[function]
        kept = []
        while not queue.empty():
            replica = queue.get_nowait()
            if self._is_member(replica):
                kept.append(replica)
            elif not self._failed_on_any(replica):
                self._close_session(replica)
            # else: its session stays until the request's /forget is sent (_send_forget closes it)
        for replica in kept:
            queue.put_nowait(replica)

    def _is_member(self, replica: Replica) -> bool:
        return self._members[replica.function].get(replica.address) is replica

    def _close_session(self, replica: Replica) -> None:
        if self._busy.get(replica):
            return  # another slot's call is still on it; the last one back closes it
        session = self._sessions.pop(replica, None)
        if session is not None:
            self._track(session.close())

    def _give_back(self, replica: Replica) -> None:
        self._busy[replica] -= 1
        if not self._busy[replica]:
            del self._busy[replica]
        self._load[replica.function].call_ended()
        self._note_released(replica)
        if self._is_member(replica):
            self._idle[replica.function].put_nowait(replica)
        elif not self._failed_on_any(replica):
            self._close_session(replica)

    def _failed_on_any(self, replica: Replica) -> bool:
        return any(replica in failed for failed in self._failed_on.values())

    async def _take(self, function: str) -> Replica:
        while True:
            replica = await self._idle[function].get()
            if self._is_member(replica):
                self._busy[replica] = self._busy.get(replica, 0) + 1
                return replica
            self._close_session(replica)

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def drain(self) -> None:
        """Wait for calls that were given up on to finish and their outputs to be freed."""
        while self._orphans:
            await asyncio.gather(*list(self._orphans), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()

    def waiting(self, function: str) -> int:
        """Free slots of ``function``'s replicas right now (one per idle replica without batching)."""
        return self._idle[function].qsize()

    async def invoke(self, function: str, inputs: Mapping[str, str], *, request_id: str,
                     attempt: int, final: bool, timeout_s: float) -> dag.CallOutcome:
        queued = time.monotonic()
        load = self._load[function]
        load.wait_started()
        if not self._members[function] and self._on_starved is not None:
            self._on_starved(function)
        try:
            replica = await self._take(function)
        finally:
            load.wait_ended()
        load.call_started()
        queue_s = time.monotonic() - queued
        body = wire.CallBody(request_id=request_id, attempt=attempt, final=final, inputs=dict(inputs),
                             timeout_s=max(1e-3, timeout_s - queue_s))
        call = asyncio.ensure_future(self._post(replica, body))
        try:
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            self._failed_on.setdefault(request_id, set()).add(replica)
            self._track(self._finish_orphan(call, replica))
            raise
        except BaseException:
            self._failed_on.setdefault(request_id, set()).add(replica)
            self._give_back(replica)
            raise
        self._give_back(replica)
        t = reply["timings"]
        return dag.CallOutcome(outputs=reply["outputs"], get_s=t["get_s"], compute_s=t["compute_s"],
                               put_s=t["put_s"], queue_s=queue_s + t["wait_s"],
                               refs=tuple(reply["refs"]), batch_size=reply["batch_size"])

    def _track(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    def forget(self, request_id: str) -> None:
        """The request is over: replicas that failed on it may end the reads kept for retries.

        Runs in the background (a busy replica answers after its current call); ``drain``
        waits for it.
        """
        for replica in self._failed_on.pop(request_id, ()):
            self._track(self._send_forget(replica, request_id))

    async def _send_forget(self, replica: Replica, request_id: str) -> None:
        session = self._sessions.get(replica)
        if session is None:
            self._note_released(replica)
            return
        try:
            async with session.post(f"{replica.address.base_url}{wire.FORGET_PATH}",
                                    json={"request_id": request_id}) as response:
                await response.read()
        except aiohttp.ClientError as e:
            logger.debug("forget %s on %s[%d]: %s", request_id, replica.function, replica.index, e)
        finally:
            if not self._is_member(replica) and not self._failed_on_any(replica):
                self._close_session(replica)
            self._note_released(replica)  # a leaving replica's kept reads are let go now

    async def _finish_orphan(self, call: asyncio.Future[wire.ReplyBody], replica: Replica) -> None:
        try:
            reply = await call
        except Exception as e:  # noqa: BLE001 - nobody waits for an abandoned call's error
            logger.debug("abandoned call on %s[%d] ended with %s", replica.function, replica.index, e)
        else:
            logger.info("freeing %d output(s) of an abandoned call on %s[%d]", len(reply["refs"]),
                        replica.function, replica.index)
            await self._discard(reply["refs"])
        finally:
            self._give_back(replica)

    async def _post(self, replica: Replica, body: wire.CallBody) -> wire.ReplyBody:
        session = self._sessions[replica]
        where = f"{replica.function}[{replica.index}]"
        try:
            async with session.post(f"{replica.address.base_url}{wire.CALL_PATH}", json=body) as response:
                text = await response.text()
                status = response.status
        except aiohttp.ClientError as e:
            raise errors.CallFailed(f"{where}: worker unreachable: {e}", retryable=True) from e
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            raise errors.CallFailed(f"{where}: HTTP {status} with a non-JSON body {text[:200]!r}",
                                    retryable=True) from None
        if status != 200:
            err = wire.parse_error(payload)
            raise errors.CallFailed(f"{where}: {err['error']}: {err['message']}", retryable=err["retryable"],
                                    input_lost=err["error"] == "InputLost")
        readers = set(self._plan.function(replica.function).readers)
        try:
            return wire.parse_reply(payload, expected_readers=readers)
        except errors.BadInput as e:
            # free whatever it did store: nobody else will ever learn those refs
            stored = payload.get("refs") if isinstance(payload, dict) else None
            if isinstance(stored, list):
                await self._discard([r for r in stored if isinstance(r, str) and 0 < len(r) <= 256])
            raise errors.CallFailed(f"{where}: malformed reply: {e}", retryable=False) from e
