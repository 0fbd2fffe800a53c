"""Helpers for driving the data-plane service in-process, as a client would over the wire."""

from __future__ import annotations

import os
from typing import Any

from faastube import protocol
from faastube.locations import HOST, Location
from faastube_sidecar.backends.host import HostBackend
from faastube_sidecar.dataplane import DataPlane, DataPlaneConfig, Session
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


def make_dataplane(**limits: Any) -> tuple[DataPlane, Clock]:
    clock = Clock()
    host = PoolLimits(**{"slab_bytes": MiB, "max_bytes": 8 * MiB, "arena_bytes": MiB, "quota_bytes": 8 * MiB,
                         **limits})
    config = DataPlaneConfig(default_ttl_s=60.0, host_limits=host, publish_grace_s=0.05)
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
