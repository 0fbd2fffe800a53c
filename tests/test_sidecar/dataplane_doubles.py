"""Helpers for driving the data-plane service in-process, as a client would over the wire."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from faastube import protocol
from faastube.locations import HOST, Location
from faastube_sidecar.backends.host import HostBackend
from faastube_sidecar.dataplane import DEFAULT_MEMORY_POLICY, DataPlane, DataPlaneConfig, Session
from faastube_sidecar.elastic import MemoryPolicy
from faastube_sidecar.identity import Identity
from faastube_sidecar.pool import PoolLimits

MiB = 1 << 20
ALICE = Identity("ns", "wf-a", "producer")
ALICE_READER = Identity("ns", "wf-a", "consumer")
MALLORY = Identity("ns", "wf-b", "thief")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_dataplane(*, memory: MemoryPolicy = DEFAULT_MEMORY_POLICY, **limits: Any) -> tuple[DataPlane, Clock]:
    clock = Clock()
    host = PoolLimits(**{"slab_bytes": MiB, "max_bytes": 8 * MiB, "arena_bytes": MiB, "quota_bytes": 8 * MiB,
                         **limits})
    config = DataPlaneConfig(default_ttl_s=60.0, host_limits=host, publish_grace_s=0.05, memory=memory)
    return DataPlane(HostBackend(), config, clock=clock), clock


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def session(dp: DataPlane, identity: Identity) -> Session:
    s = dp.open_session()
    dp.hello(s, identity, {"version": protocol.VERSION})
    return s


class Writer:
    """The client side of arenas, reduced to a bump pointer: enough to publish in tests."""

    def __init__(self, dp: DataPlane, s: Session, location: Location = HOST) -> None:
        self.dp, self.s, self.location = dp, s, location
        self.slab: int | None = None
        self.size = 0
        self.next = 0

    def place(self, nbytes: int) -> tuple[int, int]:
        reserved = (max(nbytes, 1) + 511) // 512 * 512
        if self.slab is None or self.next + reserved > self.size:
            reply, fds = self.dp.arena(self.s, {"location": self.location, "nbytes": nbytes})
            close_fds(fds)
            self.slab, self.size, self.next = reply["arena"]["slab"], reply["arena"]["size"], 0
        offset, self.next = self.next, self.next + reserved
        return self.slab, offset

    def put(self, nbytes: int = 4096, **publish: Any) -> str:
        slab, offset = self.place(nbytes)
        ref = protocol.new_ref()
        self.dp.publish(self.s, {"ref": ref, "slab": slab, "offset": offset, "nbytes": nbytes, "dtype": "|u1",
                                 "shape": [nbytes], **publish})
        return ref


async def get(dp: DataPlane, s: Session, ref: str) -> dict[str, Any]:
    reply, fds = await dp.get(s, {"ref": ref, "location": HOST})
    close_fds(fds)
    return reply


def used(dp: DataPlane) -> int:
    return sum(pool.used_bytes for pool in dp.pools.values())


def reserved(dp: DataPlane) -> int:
    return sum(pool.reserved_bytes for pool in dp.pools.values())


class ArenaWriter:
    """A writer that keeps its arenas as the real client does (`faastube.arena.Arenas`): it places
    objects first-fit, takes `freed` and `retired` notices, and asks for an arena the way dispatch
    serves it (waiting for eviction when the pool is full). Objects' bytes are really written."""

    def __init__(self, dp: DataPlane, s: Session, location: Location = HOST) -> None:
        from faastube.arena import Arenas

        self.dp, self.s, self.location = dp, s, location
        self.arenas = Arenas()
        self.handles: dict[int, Any] = {}

    def notices(self, reply: dict[str, Any]) -> None:
        for slab_id, offset in reply.get("freed", ()):
            self.arenas.give(slab_id, offset)
        for slab_id in reply.get("retired", ()):
            if self.arenas.retire(slab_id):
                self.dp.unmap(self.s, {"slabs": [slab_id]})

    async def place(self, nbytes: int) -> tuple[int, int]:
        hit = self.arenas.allocate(nbytes)
        if hit is None:
            self.notices(self.dp.ping(self.s, {})[0])
            hit = self.arenas.allocate(nbytes)
        if hit is None:
            fields = {"location": self.location, "nbytes": nbytes}
            now = self.dp.arena_now(self.s, fields)
            reply, fds = now if now is not None else await self.dp.arena_with_room(self.s, fields)
            close_fds(fds)
            self.notices(reply)
            self.arenas.add(reply["arena"]["slab"], reply["arena"]["size"])
            hit = self.arenas.allocate(nbytes)
            assert hit is not None, "the arena the sidecar gave has room"
        return hit

    async def put(self, data: bytes, **publish: Any) -> str:
        slab_id, offset = await self.place(len(data))
        segment = self.dp.pool_of_slab(slab_id).slab(slab_id).handle
        segment.bytes[offset:offset + len(data)] = memoryview(data)
        ref = protocol.new_ref()
        self.dp.publish(self.s, {"ref": ref, "slab": slab_id, "offset": offset, "nbytes": len(data),
                                 "dtype": "|u1", "shape": [len(data)], **publish})
        return ref


async def read(dp: DataPlane, s: Session, ref: str, location: Location = HOST) -> tuple[bytes, str]:
    """A get's bytes (copied out) and its path label; the lease is ended (counted)."""
    fields = {"ref": ref, "location": location}
    now = dp.get_local(s, fields)
    reply, fds = now if now is not None else await dp.get(s, fields)
    close_fds(fds)
    alloc = reply["alloc"]
    segment = dp.pool_of_slab(alloc["slab"]).slab(alloc["slab"]).handle
    data = bytes(segment.bytes[alloc["offset"]:alloc["offset"] + alloc["nbytes"]])
    dp.release(s, {"refs": [ref]})
    await asyncio.sleep(0)       # copies' completion callbacks run
    return data, reply["path"]
