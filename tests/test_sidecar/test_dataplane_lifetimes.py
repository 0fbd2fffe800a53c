"""Object lifetimes in the data-plane service: consumers, free, expiry, leases, goodbyes, access."""

from __future__ import annotations

import asyncio

import pytest
from dataplane_doubles import (
    ALICE,
    ALICE_READER,
    MALLORY,
    MiB,
    Writer,
    close_fds,
    get,
    make_dataplane,
    reserved,
    session,
    used,
)
from faastube import errors, protocol
from faastube.locations import HOST
from faastube_sidecar.elastic import MemoryPolicy


@pytest.fixture
def dp():
    # No floor: an idle pool gives everything back once its traffic's reservations ran out.
    plane, clock = make_dataplane(memory=MemoryPolicy(name="elastic+eviction", floor_bytes=0))
    plane.clock = clock  # type: ignore[attr-defined]
    yield plane
    plane.close()


async def test_an_object_dies_after_its_declared_consumers_have_read_it(dp) -> None:
    p, r1, r2 = session(dp, ALICE), session(dp, ALICE_READER), session(dp, ALICE_READER)
    ref = Writer(dp, p).put(consumers=2)
    for reader in (r1, r2):
        await get(dp, reader, ref)
        dp.release(reader, {"refs": [ref]})
    with pytest.raises(errors.RefNotFound, match="consumed"):
        dp.stat(p, {"ref": ref})
    assert used(dp) == 0


async def test_memory_stays_until_the_last_reader_lets_go_even_after_free(dp) -> None:
    p, r = session(dp, ALICE), session(dp, ALICE_READER)
    ref = Writer(dp, p).put()
    await get(dp, r, ref)
    dp.free(p, {"ref": ref})
    with pytest.raises(errors.RefNotFound, match="freed by function 'producer'"):
        await get(dp, r, ref)
    assert used(dp) > 0, "a reader still holds a view"
    dp.release(r, {"refs": [ref]})
    assert used(dp) == 0


async def test_a_writer_learns_that_its_range_is_free_only_after_the_last_reader(dp) -> None:
    p, r = session(dp, ALICE), session(dp, ALICE_READER)
    w = Writer(dp, p)
    ref = w.put(consumers=1)
    await get(dp, r, ref)
    assert "freed" not in dp.ping(p, {})[0]
    dp.release(r, {"refs": [ref]})
    assert dp.ping(p, {})[0]["freed"] == [[w.slab, 0]]
    assert "freed" not in dp.ping(p, {})[0], "told once"


async def test_objects_expire_at_their_ttl(dp) -> None:
    p = session(dp, ALICE)
    w = Writer(dp, p)
    short, default = w.put(ttl_s=5.0), w.put()
    dp.clock.now += 6
    assert dp.sweep() == 1
    with pytest.raises(errors.RefNotFound, match="expired"):
        dp.stat(p, {"ref": short})
    dp.stat(p, {"ref": default})
    dp.clock.now += 60
    dp.sweep()
    assert used(dp) == 0 and len(dp.lifetimes) == 0


async def test_a_writer_that_disconnects_keeps_its_published_objects(dp) -> None:
    p = session(dp, ALICE)
    published = Writer(dp, p).put()
    dp.close_session(p)
    q = session(dp, ALICE_READER)
    assert dp.stat(q, {"ref": published})[0]["state"] == "sealed"
    await get(dp, q, published)


async def test_a_reader_that_crashes_gives_back_its_lease_without_counting_as_a_consumer(dp) -> None:
    p, r = session(dp, ALICE), session(dp, ALICE_READER)
    ref = Writer(dp, p).put(consumers=1)
    await get(dp, r, ref)
    dp.close_session(r)                      # no bye: a crash
    info = dp.stat(p, {"ref": ref})[0]
    assert info["readers"] == 0 and info["consumers_left"] == 1


async def test_a_reader_that_says_goodbye_with_a_read_open_counts_it(dp) -> None:
    p, r = session(dp, ALICE), session(dp, ALICE_READER)
    ref = Writer(dp, p).put(consumers=1)
    await get(dp, r, ref)
    dp.bye(r, {})
    dp.close_session(r)
    with pytest.raises(errors.RefNotFound, match="consumed"):
        dp.stat(p, {"ref": ref})
    assert used(dp) == 0


async def test_reads_ended_as_not_consumed_do_not_count(dp) -> None:
    p, r = session(dp, ALICE), session(dp, ALICE_READER)
    ref = Writer(dp, p).put(consumers=1)
    await get(dp, r, ref)
    dp.release(r, {"refs": [ref], "consumed": False})
    assert dp.stat(p, {"ref": ref})[0]["consumers_left"] == 1


async def test_a_late_or_repeated_release_changes_nothing(dp) -> None:
    p, r = session(dp, ALICE), session(dp, ALICE_READER)
    ref = Writer(dp, p).put(consumers=2)
    await get(dp, r, ref)
    dp.release(r, {"refs": [ref, ref, ref]})
    assert dp.stat(p, {"ref": ref})[0]["consumers_left"] == 1


async def test_another_workflow_cannot_read_stat_or_free_the_object(dp) -> None:
    p, m = session(dp, ALICE), session(dp, MALLORY)
    ref = Writer(dp, p).put()
    with pytest.raises(errors.PermissionDenied, match="wf-b"):
        await get(dp, m, ref)
    with pytest.raises(errors.PermissionDenied):
        dp.stat(m, {"ref": ref})
    with pytest.raises(errors.PermissionDenied):
        dp.free(m, {"ref": ref})


async def test_a_get_waits_briefly_for_a_publish_still_on_its_way(dp) -> None:
    p, r = session(dp, ALICE), session(dp, ALICE_READER)
    w = Writer(dp, p)
    slab, offset = w.place(64)
    ref = protocol.new_ref()
    pending = asyncio.ensure_future(get(dp, r, ref))
    await asyncio.sleep(0.01)
    assert not pending.done()
    dp.publish(p, {"ref": ref, "slab": slab, "offset": offset, "nbytes": 64, "dtype": "|u1", "shape": [64]})
    assert (await pending)["ref"] == ref


async def test_a_ref_never_published_is_not_found_after_the_grace(dp) -> None:
    r = session(dp, ALICE_READER)
    ref = protocol.new_ref()
    with pytest.raises(errors.RefNotFound, match="not published within"):
        await get(dp, r, ref)


async def test_a_ref_cannot_be_published_twice_even_after_it_died(dp) -> None:
    p = session(dp, ALICE)
    w = Writer(dp, p)
    ref = w.put()
    dp.free(p, {"ref": ref})
    slab, offset = w.place(8)
    with pytest.raises(errors.InvalidRequest, match="already in use"):
        dp.publish(p, {"ref": ref, "slab": slab, "offset": offset, "nbytes": 8, "dtype": "|u1", "shape": [8]})


@pytest.mark.parametrize("fields, match", [
    ({"nbytes": 12, "dtype": "<f4", "shape": [2]}, "nbytes 12"),
    ({"nbytes": 8, "dtype": "O", "shape": [1]}, "plain numeric"),
    ({"nbytes": 8, "dtype": "not-a-dtype", "shape": [1]}, "bad dtype"),
    ({"nbytes": 8, "dtype": "(,", "shape": [1]}, "bad dtype"),
    ({"nbytes": 8, "dtype": "|u1", "shape": [8], "consumers": 0}, "consumers"),
    ({"nbytes": 8, "dtype": "|u1", "shape": [8], "ttl_s": 0}, "ttl_s"),
    ({"nbytes": 8, "dtype": "|u1", "shape": [8], "ttl_s": 1e9}, "ttl_s"),
    ({"nbytes": 8, "dtype": "|u1", "shape": [8], "fence": [[1, 8]]}, "fence event 1"),
    ({"nbytes": 8, "dtype": "|u1", "shape": [8], "offset": 100}, "aligned"),
    ({"nbytes": 8, "dtype": "|u1", "shape": [8], "offset": 64 * MiB}, "inside slab"),
    ({"nbytes": 8, "dtype": "|u1", "shape": [8], "slab": 999999}, "not an arena of this client"),
])
async def test_bad_publishes_are_refused_with_the_reason(dp, fields, match) -> None:
    p = session(dp, ALICE)
    slab, offset = Writer(dp, p).place(8)
    with pytest.raises(errors.InvalidRequest, match=match):
        dp.publish(p, {"ref": protocol.new_ref(), "slab": slab, "offset": offset, **fields})


async def test_a_publish_may_not_overlap_a_live_object(dp) -> None:
    p = session(dp, ALICE)
    w = Writer(dp, p)
    w.put(4096)
    with pytest.raises(errors.InvalidRequest, match="overlaps a live object"):
        dp.publish(p, {"ref": protocol.new_ref(), "slab": w.slab, "offset": 512, "nbytes": 8, "dtype": "|u1",
                       "shape": [8]})


async def test_only_the_arena_holder_publishes_into_it(dp) -> None:
    p, q = session(dp, ALICE), session(dp, ALICE_READER)
    slab, offset = Writer(dp, p).place(8)
    with pytest.raises(errors.InvalidRequest, match="not an arena of this client"):
        dp.publish(q, {"ref": protocol.new_ref(), "slab": slab, "offset": offset, "nbytes": 8, "dtype": "|u1",
                       "shape": [8]})


async def test_requests_before_hello_are_refused(dp) -> None:
    s = dp.open_session()
    with pytest.raises(errors.InvalidRequest, match="hello"):
        dp.arena(s, {"nbytes": 8, "location": HOST})


async def test_unknown_refs_say_so(dp) -> None:
    p = session(dp, ALICE)
    with pytest.raises(errors.RefNotFound, match="ft-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.*unknown"):
        dp.stat(p, {"ref": "ft-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"})


async def test_retired_slabs_are_announced_to_the_sessions_that_map_them(dp) -> None:
    p, r = session(dp, ALICE), session(dp, ALICE_READER)
    w = Writer(dp, p)
    ref = w.put(consumers=1)
    await get(dp, r, ref)
    dp.release(r, {"refs": [ref]})
    dp.unmap(p, {"slabs": [w.slab]})          # the writer gives its arena back
    dp.clock.now += 3600
    dp.sweep()
    reply, _ = dp.ping(r, {})
    assert reply.get("retired") == [w.slab], "the reader is told to unmap"
    dp.unmap(r, {"slabs": reply["retired"]})
    assert reserved(dp) == 0


async def test_an_empty_arena_given_back_is_granted_to_the_next_writer_of_the_domain(dp) -> None:
    p, q = session(dp, ALICE), session(dp, ALICE_READER)
    first = Writer(dp, p)
    first.place(8)
    dp.unmap(p, {"slabs": [first.slab]})
    reply, fds = dp.arena(q, {"location": HOST, "nbytes": 8})
    close_fds(fds)
    assert reply["arena"]["slab"] == first.slab
    m = session(dp, MALLORY)
    reply, fds = dp.arena(m, {"location": HOST, "nbytes": 8})
    close_fds(fds)
    assert reply["arena"]["slab"] != first.slab, "never another domain's slab"


async def test_a_writer_that_ends_its_own_reads_with_notifies_still_learns_its_ranges_are_free(dp) -> None:
    from faastube_sidecar.dispatch import Dispatcher
    from faastube_sidecar.identity import ClaimAttestor
    from faastube_sidecar.metrics import SidecarMetrics
    from prometheus_client import CollectorRegistry

    dispatcher = Dispatcher(dp, ClaimAttestor(), SidecarMetrics(CollectorRegistry()))
    p, r = session(dp, ALICE), session(dp, ALICE_READER)
    w = Writer(dp, p)
    mine = w.put(consumers=1)
    theirs = Writer(dp, r).put(consumers=1)
    await get(dp, r, mine)
    await get(dp, p, theirs)
    dp.release(r, {"refs": [mine]})              # consumed: the writer's range is free again
    # The writer ends its own read with a notify: that reply is never sent, so its notices wait.
    kind, _, _ = dispatcher.dispatch(p, None, {"op": "release", "refs": [theirs]}, notify=True)
    assert kind is protocol.Kind.REPLY
    reply, _ = dp.ping(p, {})
    assert reply.get("freed") == [[w.slab, 0]], "the freed notice reaches the writer on its next reply"
