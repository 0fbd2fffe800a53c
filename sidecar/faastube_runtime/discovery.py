"""Finding a function's replicas in a cluster: the A records of its headless Service.

The operator gives every function a headless Service; cluster DNS answers its
name with the IP of every *ready* pod behind it, so one lookup lists the
replicas and a readiness probe decides when a pod joins. DNS pushes nothing, so
``ServiceDiscovery`` looks again every ``interval_s`` and hands each answer to
the pool. A failed lookup (DNS server unreachable, timeout) keeps the replicas
known so far; a name with no records (no ready pod yet) means no replicas.

Resolution sits behind ``Resolver`` so tests can give fixed answers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Self

from faastube_runtime import errors
from faastube_runtime.addresses import Address

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0
DEFAULT_RESOLVE_TIMEOUT_S = 5.0
# getaddrinfo's answers for "this name has no addresses" (as opposed to "could not ask")
_NO_RECORDS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class ResolveFailed(errors.RuntimeFailure):
    """The lookup itself failed (not an empty answer): keep what was known."""


class Resolver(Protocol):
    async def resolve(self, host: str) -> list[str]:
        """The IP addresses ``host`` names ([] if none); ``ResolveFailed`` if the lookup failed."""


class SystemResolver:
    """The libc resolver (``/etc/resolv.conf``: cluster DNS and search domains in a pod)."""

    async def resolve(self, host: str) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            if e.errno in _NO_RECORDS:
                return []
            raise ResolveFailed(f"resolving {host!r}: {e.strerror or e}") from e
        return sorted({str(info[4][0]) for info in infos})


class ReplicaSink(Protocol):
    def set_replicas(self, function: str, addresses: Sequence[Address]) -> None: ...


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """A function whose replicas are the addresses of ``host`` on ``port``."""

    function: str
    host: str
    port: int


class ServiceDiscovery:
    """Keeps a pool's replica sets equal to what DNS says; ``async with`` runs it."""

    def __init__(self, sink: ReplicaSink, targets: Sequence[ServiceTarget], *,
                 resolver: Resolver | None = None, interval_s: float = DEFAULT_INTERVAL_S,
                 resolve_timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S) -> None:
        if not interval_s > 0 or not resolve_timeout_s > 0:
            raise errors.BadInput("discovery interval and resolve timeout: must be positive")
        self._sink = sink
        self._targets = tuple(targets)
        self._resolver = resolver if resolver is not None else SystemResolver()
        self._interval_s = interval_s
        self._resolve_timeout_s = resolve_timeout_s
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    async def refresh(self) -> None:
        """Look every target up once and apply the answers."""
        answers = await asyncio.gather(*(self._lookup(t) for t in self._targets))
        for target, ips in zip(self._targets, answers, strict=True):
            if ips is not None:
                self._sink.set_replicas(target.function, [Address.tcp(ip, target.port) for ip in ips])
        self.rounds += 1

    async def _lookup(self, target: ServiceTarget) -> list[str] | None:
        try:
            async with asyncio.timeout(self._resolve_timeout_s):
                return await self._resolver.resolve(target.host)
        except (ResolveFailed, TimeoutError, OSError) as e:
            logger.warning("replicas of %s: %s; keeping the ones known", target.function,
                           e if str(e) else f"lookup of {target.host!r} timed out")
            return None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.refresh()

    async def __aenter__(self) -> Self:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="replica-discovery")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
