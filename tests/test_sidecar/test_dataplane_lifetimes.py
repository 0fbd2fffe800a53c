"""Object lifetimes in the data-plane service: consumers, free, expiry, leases, sessions, access."""

from __future__ import annotations

import pytest
from faastube import errors
from faastube_sidecar.backends.host import HostBackend
from faastube_sidecar.dataplane import DataPlane, DataPlaneConfig
from faastube_sidecar.identity import Identity
from faastube_sidecar.pool import PoolLimits

ALICE = Identity("ns", "wf-a", "producer")
ALICE_READER = Identity("ns", "wf-a", "consumer")
MALLORY = Identity("ns", "wf-b", "thief")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dp():
    clock = Clock()
    plane = DataPlane(HostBackend(), DataPlaneConfig(default_ttl_s=60.0,
                                                     host_limits=PoolLimits(slab_bytes=1 << 20, max_bytes=8 << 20)),
                      clock=clock)
    plane.clock = clock  # type: ignore[attr-defined]
    yield plane
    plane.close()


def session(dp: DataPlane, identity: Identity):
    s = dp.open_session()
    dp.hello(s, identity, {"version": 1})
    return s


def put(dp: DataPlane, s, nbytes: int = 4096, **seal) -> str:
    reply, _ = dp.alloc(s, {"nbytes": nbytes, "dtype": "|u1", "shape": [nbytes], "location": "host"})
    dp.seal(s, {"ref": reply["ref"], **seal})
    return reply["ref"]


async def get(dp: DataPlane, s, ref: str):
    return (await dp.get(s, {"ref": ref, "location": "host"}))[0]


def used(dp: DataPlane) -> int:
    return dp.pools["host"].used_bytes


async def test_an_object_dies_after_its_declared_consumers_have_read_it(dp) -> None:
    p, r1, r2 = session(dp, ALICE), session(dp, ALICE_READER), session(dp, ALICE_READER)
    ref = put(dp, p, consumers=2)
    for reader in (r1, r2):
        await get(dp, reader, ref)
        dp.release(reader, {"refs": [ref]})
    with pytest.raises(errors.RefNotFound, match=ref):
        dp.stat(p, {"ref": ref})
    assert used(dp) == 0


async def test_memory_stays_until_the_last_reader_lets_go_even_after_free(dp) -> None:
    p, r = session(dp, ALICE), session(dp, ALICE_READER)
    ref = put(dp, p)
    await get(dp, r, ref)
    dp.free(p, {"ref": ref})
    with pytest.raises(errors.RefNotFound):
        await get(dp, r, ref)
    assert used(dp) > 0, "a reader still holds a view"
    dp.release(r, {"refs": [ref]})
    assert used(dp) == 0


async def test_objects_expire_at_their_ttl(dp) -> None:
    p = session(dp, ALICE)
    short, default = put(dp, p, ttl_s=5.0), put(dp, p)
    dp.clock.now += 6
    assert dp.sweep() == 1
    with pytest.raises(errors.RefNotFound):
        dp.stat(p, {"ref": short})
    dp.stat(p, {"ref": default})
    dp.clock.now += 60
    dp.sweep()
    assert used(dp) == 0 and len(dp.table) == 0


async def test_a_writer_that_disconnects_loses_its_unsealed_allocations_but_not_sealed_objects(dp) -> None:
    p = session(dp, ALICE)
    sealed = put(dp, p)
    dp.alloc(p, {"nbytes": 1000, "dtype": "|u1", "shape": [1000], "location": "host"})
    dp.close_session(p)
    q = session(dp, ALICE_READER)
    assert dp.stat(q, {"ref": sealed})[0]["state"] == "sealed"
    assert len(dp.table) == 1


async def test_a_reader_that_crashes_gives_back_its_lease_without_counting_as_a_consumer(dp) -> None:
    p, r = session(dp, ALICE), session(dp, ALICE_READER)
    ref = put(dp, p, consumers=1)
    await get(dp, r, ref)
    dp.close_session(r)
    info = dp.stat(p, {"ref": ref})[0]
    assert info["readers"] == 0 and info["consumers_left"] == 1


async def test_another_workflow_cannot_read_stat_or_free_the_object(dp) -> None:
    p, m = session(dp, ALICE), session(dp, MALLORY)
    ref = put(dp, p)
    with pytest.raises(errors.PermissionDenied, match="wf-b"):
        await get(dp, m, ref)
    with pytest.raises(errors.PermissionDenied):
        dp.stat(m, {"ref": ref})
    with pytest.raises(errors.PermissionDenied):
        dp.free(m, {"ref": ref})


async def test_an_unsealed_object_cannot_be_read_and_only_its_writer_seals_it(dp) -> None:
    p, r = session(dp, ALICE), session(dp, ALICE_READER)
    reply, _ = dp.alloc(p, {"nbytes": 8, "dtype": "|u1", "shape": [8], "location": "host"})
    with pytest.raises(errors.ObjectNotReady):
        await get(dp, r, reply["ref"])
    with pytest.raises(errors.InvalidRequest, match="only its writer"):
        dp.seal(r, {"ref": reply["ref"]})
    dp.seal(p, {"ref": reply["ref"]})
    with pytest.raises(errors.InvalidRequest, match="once"):
        dp.seal(p, {"ref": reply["ref"]})


@pytest.mark.parametrize("body, match", [
    ({"nbytes": 12, "dtype": "<f4", "shape": [2], "location": "host"}, "nbytes 12"),
    ({"nbytes": 8, "dtype": "O", "shape": [1], "location": "host"}, "plain numeric"),
    ({"nbytes": 8, "dtype": "not-a-dtype", "shape": [1], "location": "host"}, "bad dtype"),
    ({"nbytes": 8, "dtype": "<f8", "shape": [1], "location": "gpu:0"}, "no pool"),
])
async def test_bad_allocations_are_refused_with_the_reason(dp, body, match) -> None:
    p = session(dp, ALICE)
    with pytest.raises(errors.InvalidRequest, match=match):
        dp.alloc(p, body)


async def test_requests_before_hello_are_refused(dp) -> None:
    s = dp.open_session()
    with pytest.raises(errors.InvalidRequest, match="hello"):
        dp.alloc(s, {"nbytes": 8, "dtype": "|u1", "shape": [8], "location": "host"})


async def test_unknown_and_malformed_refs_are_told_apart(dp) -> None:
    p = session(dp, ALICE)
    with pytest.raises(errors.RefNotFound, match="ft-aaaaaaaaaaaaaaaaaaaaaaaaaa"):
        dp.stat(p, {"ref": "ft-aaaaaaaaaaaaaaaaaaaaaaaaaa"})
    with pytest.raises(errors.InvalidRequest, match="malformed ref"):
        dp.stat(p, {"ref": "bogus"})


async def test_seal_validates_consumers_and_ttl(dp) -> None:
    p = session(dp, ALICE)
    for extra, match in (({"consumers": 0}, "consumers"), ({"ttl_s": 0}, "ttl_s"), ({"ttl_s": 1e9}, "ttl_s")):
        reply, _ = dp.alloc(p, {"nbytes": 8, "dtype": "|u1", "shape": [8], "location": "host"})
        with pytest.raises(errors.InvalidRequest, match=match):
            dp.seal(p, {"ref": reply["ref"], **extra})


async def test_retired_slabs_are_announced_to_the_sessions_that_map_them(dp) -> None:
    p = session(dp, ALICE)
    ref = put(dp, p)
    dp.free(p, {"ref": ref})
    dp.clock.now += 3600
    dp.sweep()
    reply, _ = dp.ping(p, {})
    assert reply.get("retired"), "the client is told to unmap"
    dp.unmap(p, {"slabs": reply["retired"]})
    assert dp.pools["host"].reserved_bytes == 0
