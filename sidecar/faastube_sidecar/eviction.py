"""Moving objects out of a GPU when memory is short, and back before they are read.

`elastic` decides (which object, where, when); this module does it on the data
plane's tables, on the event loop:

- ``make_room``: a put (an ``arena`` request) or a copy the sidecar must make needs
  memory its pool can't grow into. Either a hole is made in memory the requester can
  use at once (its own arena, or the domain's shared slabs) by moving the objects in
  it out, or whole slabs are emptied and retired so the budget can grow again (their
  mappers unmap on their next reply; the request waits up to ``evict_wait_s``).
- ``evict``: one object's replica leaves its GPU: dropped if the object has another
  replica, else copied (the backend's copy: a peer copy over NVLink, or through the
  transfer engine to pinned host memory) into its own workflow's pool on an idle peer
  GPU or on the host, then its memory is freed. An object a reader holds, one being
  copied, or one whose writer is still writing never moves; a read that starts while
  the copy runs cancels the move (the copy is thrown away).
- ``rebalance`` (after each sweep, and whenever memory frees): shrink to the cap when
  the GPU's free memory fell, and bring evicted objects home, those needed soonest
  first (proactively, for ``elastic+eviction``). A restore is a copy like any other
  replica's: a reader that arrives while it runs orders itself after it.

Objects keep their domain: an evicted copy lives in a pool of the object's own
workflow. One workflow's shortage frees another's slabs only down to that workflow's
own target (what its traffic reserves).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from faastube import errors
from faastube.locations import HOST, Location, gpu

from faastube_sidecar import elastic
from faastube_sidecar.identity import Domain
from faastube_sidecar.lifetimes import ObjectRecord, Replica
from faastube_sidecar.pool import ALIGN_BYTES, LARGE_ROUND_BYTES, Slab, align_up

if TYPE_CHECKING:
    from faastube_sidecar.dataplane import DataPlane

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Room:
    """Room was made: in slab `hole_slab` (a hole of the size asked), or else by the budget admitting
    growth, past the cap by `loan_bytes` (memory in retired slabs, back once their mappers unmap:
    allocate within ``Budget.lend(loan_bytes)``)."""

    hole_slab: int | None = None
    loan_bytes: int = 0


@dataclass(frozen=True, slots=True)
class _SlabPlan:
    slabs: tuple[tuple[Slab[Any], tuple[elastic.Candidate, ...]], ...]
    worst: elastic.EvictionKey


class Evictor:
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane
        self.policy = dataplane.config.memory
        self.evicted: dict[str, ObjectRecord] = {}          # refs whose home is elsewhere
        self.evictions: Counter[tuple[Location, Location, str]] = Counter()   # (from, to, order)
        self.evicted_bytes_total: Counter[Location] = Counter()              # by home
        self.restores: Counter[tuple[Location, str]] = Counter()             # (to, proactive | read)
        self.aborted = 0
        self.failed_room = 0
        self.borrowed = 0           # requests that grew a pool past its cap (nothing could move)
        self._hinted: set[Domain] = set()
        self._said_lru: set[Domain] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._restores_running = 0

    @property
    def active(self) -> bool:
        return self.policy.evicts and any(not loc.is_host for loc in self.dp.locations)

    # --- notifications from the data plane ------------------------------------------------------

    def memory_freed(self) -> None:
        """A slab was destroyed or an object's memory went back: waiters may try again, restores too."""
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def hinted(self, domain: Domain) -> None:
        self._hinted.add(domain)

    def forget(self, record: ObjectRecord) -> None:
        self.evicted.pop(record.ref, None)

    def landed(self, record: ObjectRecord, location: Location) -> None:
        """A copy of `record` landed at `location`: back on a GPU means back home."""
        if record.home is None or location.is_host:
            return
        replica = record.replicas.get(location)
        if replica is None or replica.evicted:
            return
        record.home = None
        self.evicted.pop(record.ref, None)

    def kick(self) -> None:
        """Run `rebalance` soon (once at a time; again after, if asked meanwhile)."""
        if not self.active:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = loop.create_task(self._rebalance_loop(), name="faastube-rebalance")

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.memory_freed()

    async def settle(self) -> None:
        """Wait for the rebalancing started so far (tests)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def _rebalance_loop(self) -> None:
        while True:
            self._again = False
            try:
                await self.rebalance()
            except Exception:
                logger.exception("rebalancing pool memory failed")
            if not self._again:
                return

    # --- candidates ----------------------------------------------------------------------------

    def _fronts(self) -> dict[Domain, int]:
        fronts: dict[Domain, int] = {}
        for record in self.dp.lifetimes:
            if record.hint is not None:
                d = record.domain
                p = record.hint.position
                if d not in fronts or p < fronts[d]:
                    fronts[d] = p
        return fronts

    def candidate(self, record: ObjectRecord, location: Location, fronts: dict[Domain, int]) -> elastic.Candidate | None:
        """`record`'s replica at `location` as an eviction candidate, or None if it must not move."""
        replica = record.replicas.get(location)
        if (replica is None or record.released or record.busy() or record.moving or replica.landing is not None
                or (replica.fence is not None and not self.dp.backend.fence_done(replica.fence))):
            return None
        return elastic.Candidate(record.ref, record.nbytes, replica.alloc.offset, replica.alloc.reserved,
                                 record.last_used_s, record.hint, fronts.get(record.domain, 0))

    def _queue_aware(self, domain: Domain) -> bool:
        if not self.policy.queue_aware:
            return False
        if domain in self._hinted:
            return True
        if domain not in self._said_lru:
            self._said_lru.add(domain)
            logger.info("workflow %s sends no queue hints: its least recently used objects leave the GPU first",
                        domain)
        return False

    def _live(self, slab: Slab[Any], location: Location, fronts: dict[Domain, int],
              protect_above: elastic.EvictionKey | None, queue_aware: bool
              ) -> list[tuple[int, int, elastic.Candidate | None]]:
        out: list[tuple[int, int, elastic.Candidate | None]] = []
        for offset, reserved in slab.live.items():
            record = self.dp.record_at(slab.id, offset)
            cand = None if record is None else self.candidate(record, location, fronts)
            if (cand is not None and protect_above is not None
                    and elastic.eviction_key(cand, queue_aware=queue_aware) <= protect_above):
                cand = None
            out.append((offset, reserved, cand))
        return out

    # --- making room ---------------------------------------------------------------------------

    async def make_room(self, domain: Domain, location: Location, *, grow_bytes: int, hole_bytes: int,
                        writer: int | None = None, protect_above: elastic.EvictionKey | None = None,
                        borrow: bool = True) -> Room | None:
        """Make `grow_bytes` of budget, or a hole of `hole_bytes` the requester can use; None if impossible
        within `evict_wait_s`. `writer`: an arena request's session (holes in its own arenas count).

        When nothing (more) can move (what is left is being read, copied or written) or what is
        missing is in retired slabs waiting for their mappers, a request that may `borrow` grows
        the pool past its cap, never past the limit or a quota, by what the device really has
        free, rather than fail: the cap bounds what the store keeps, and `rebalance` moves out
        what goes above it as soon as objects can move."""
        dp = self.dp
        loop = asyncio.get_running_loop()
        end = loop.time() + self.policy.evict_wait_s
        budget = dp.budgets[location]
        if grow_bytes > min(budget.quota_bytes, budget.max_bytes):
            self.failed_room += 1
            return None         # more than the workflow may ever hold here: nothing to wait for
        while True:
            dp.reclaim(location)
            if budget.check(domain, grow_bytes) is None:
                return Room()
            window, slabs, need = self._plan(domain, location, grow_bytes=grow_bytes, hole_bytes=hole_bytes,
                                             writer=writer, protect_above=protect_above)
            moved_any = False
            if window is None and slabs is None and borrow:
                loan = self._loan(domain, location, grow_bytes)
                if loan is not None:
                    return Room(loan_bytes=loan)
            if window is not None and (slabs is None or window.worst >= slabs.worst):
                order = self._order_label(domain)
                moved = await self._move_all(window.victims, location, order)
                moved_any = any(moved)
                if all(moved):
                    return Room(window.slab_id)
            elif slabs is not None:
                for slab, victims in slabs.slabs:
                    moved = await self._move_all(victims, location, self._order_label(slab.domain))
                    moved_any = moved_any or any(moved) or not victims
                    if all(moved) and not slab.live and not slab.retired:
                        dp.pool_of_slab(slab.id).retire(slab, "evicted")
                dp.announce_retired()
                dp.reclaim(location)
                if budget.check(domain, grow_bytes) is None:
                    return Room()
            if loop.time() >= end:
                self.failed_room += 1
                return None
            if not moved_any:
                # Nothing could move now: wait for memory to free (unmaps, reads ending, restores).
                await self._wait_for_memory(end - loop.time())

    def _loan(self, domain: Domain, location: Location, nbytes: int) -> int | None:
        """How far past the cap `nbytes` more would go, if the limit, the quota and the device allow it."""
        budget = self.dp.budgets[location]
        if budget.quota_binds(domain, nbytes) or budget.total + nbytes > budget.max_bytes:
            return None
        if location.gpu is not None and self.dp.device_memory is not None:
            info = self.dp.device_memory.info(location.gpu)
            if info is not None and info.free_bytes < nbytes:
                return None
        self.borrowed += 1
        return max(0, budget.total + nbytes - budget.cap_bytes)

    async def _wait_for_memory(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, min(timeout_s, 0.05))
        except TimeoutError:
            pass
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _order_label(self, domain: Domain) -> str:
        return "queue" if self._queue_aware(domain) else "lru"

    def _plan(self, domain: Domain, location: Location, *, grow_bytes: int, hole_bytes: int, writer: int | None,
              protect_above: elastic.EvictionKey | None
              ) -> tuple[elastic.Window | None, _SlabPlan | None, int]:
        """The cheapest hole, the cheapest slabs to free, and how many bytes are missing beyond
        those already on their way back."""
        dp = self.dp
        fronts = self._fronts()
        queue_aware = self._queue_aware(domain)
        pool = dp.pools.get((domain, location))
        window: elastic.Window | None = None
        if pool is not None:
            for slab in pool:
                # Holes only where the requester can use them: its own arenas, or our shared slabs.
                if slab.retired or slab.arena != (writer is not None) or (writer is not None and slab.writer != writer):
                    continue
                live = self._live(slab, location, fronts, protect_above, queue_aware)
                w = elastic.best_window(slab.id, slab.size, live, hole_bytes, queue_aware=queue_aware)
                if w is not None and (window is None or elastic._cheaper(w, window)):
                    window = w
        budget = dp.budgets[location]
        own = budget.quota_binds(domain, grow_bytes)
        domains = [domain] if own else sorted({d for d, loc in dp.pools if loc == location}, key=lambda d: d != domain)
        # Slabs already retired come back once their mappers unmap: count them as on their way.
        need = grow_bytes - budget.headroom(domain) - self._retiring_bytes(location, domains)
        return window, self._slab_plan(location, need, domains, owner=domain, writer=writer, fronts=fronts,
                                       protect_above=protect_above), need

    def _retiring_bytes(self, location: Location, domains: Iterable[Domain]) -> int:
        pools = (self.dp.pools.get((d, location)) for d in domains)
        return sum(s.size for p in pools if p is not None for s in p if s.retired)

    def _slab_plan(self, location: Location, need: int, domains: Iterable[Domain], *, owner: Domain | None,
                   writer: int | None, fronts: dict[Domain, int],
                   protect_above: elastic.EvictionKey | None) -> _SlabPlan | None:
        """Whole slabs to empty for `need` bytes: `owner`'s own, other domains' only beyond their target."""
        if need <= 0:
            return None
        dp = self.dp
        options: list[tuple[elastic.EvictionKey, Slab[Any], tuple[elastic.Candidate, ...]]] = []
        for domain in domains:
            pool = dp.pools.get((domain, location))
            if pool is None:
                continue
            queue_aware = self._queue_aware(domain)
            for slab in pool:
                if slab.retired or (writer is not None and slab.writer == writer):
                    continue   # the requester can't unmap its own arena while it waits for us
                live = self._live(slab, location, fronts, protect_above, queue_aware)
                if any(c is None for _, _, c in live):
                    continue
                victims = tuple(c for _, _, c in live if c is not None)
                worst = min((elastic.eviction_key(v, queue_aware=queue_aware) for v in victims),
                            default=(float("inf"),) * 3)
                options.append((worst, slab, victims))
        options.sort(key=lambda o: (o[0], o[1].size), reverse=True)
        excess = {d: dp.excess_bytes(d, location) for d in {o[1].domain for o in options}}
        picked: list[tuple[Slab[Any], tuple[elastic.Candidate, ...]]] = []
        freed = 0
        worst_picked: elastic.EvictionKey = (float("inf"),) * 3
        for worst, slab, victims in options:
            if freed >= need:
                break
            if owner is not None and slab.domain != owner:
                if excess[slab.domain] < slab.size:
                    continue       # another workflow keeps what its own traffic reserves
                excess[slab.domain] -= slab.size
            picked.append((slab, victims))
            freed += slab.size
            worst_picked = min(worst_picked, worst)
        if freed < need:
            return None
        return _SlabPlan(tuple(picked), worst_picked)

    async def _move_all(self, victims: Iterable[elastic.Candidate], location: Location, order: str) -> list[bool]:
        records = [self.dp.lifetimes.find(v.ref) for v in victims]
        return list(await asyncio.gather(*(self.evict(r, location, order=order) for r in records if r is not None)))

    # --- moving one object ---------------------------------------------------------------------

    def _destination(self, record: ObjectRecord, source: Location) -> tuple[Location, Any] | None:
        """An allocation for `record` on an idle peer GPU of its domain, else in its host pool."""
        dp = self.dp
        domain = record.domain
        peers = [elastic.PeerRoom(loc.gpu, dp.budgets[loc].headroom(domain), dp.budgets[loc].limit_bytes)
                 for loc in dp.locations if loc.gpu is not None and loc != source]
        chosen = elastic.choose_peer(peers, align_up(record.nbytes, LARGE_ROUND_BYTES))
        tried = ([gpu(chosen)] if chosen is not None else []) + [HOST]
        for loc in tried:
            if loc == source or loc in record.replicas:
                continue
            try:
                return loc, dp.pool(domain, loc).allocate(record.nbytes)
            except errors.OutOfPoolMemory as e:
                logger.debug("evicting %s: no room at %s (%s)", record.ref, loc, e)
        return None

    async def evict(self, record: ObjectRecord, location: Location, *, order: str = "lru") -> bool:
        """Move `record`'s replica out of `location`; True once it is gone from there."""
        dp = self.dp
        if self.candidate(record, location, {}) is None:
            return False
        source = record.replicas[location]
        elsewhere = [loc for loc, r in record.replicas.items() if loc != location and r.landing is None]
        if elsewhere:
            # The bytes are somewhere else already: this replica just goes.
            dp.drop_replica(record, location)
            self._count(record, location, elsewhere[0], order)
            return True
        target = self._destination(record, location)
        if target is None:
            logger.debug("evicting %s from %s: no room on a peer GPU or the host", record.ref, location)
            return False
        dest, alloc = target
        record.moving = True
        dp.lifetimes.copy_started(record, dest)
        moved = False
        try:
            ticket = dp.backend.submit_copy(dp.span(alloc), dp.span(source.alloc), after=None, domain=record.domain,
                                            requester=(str(record.domain), "sidecar-evict"))
            await asyncio.shield(ticket.done)
            # A reader that started meanwhile (or another copy from us) keeps the object where it is.
            if (not record.released and not record.leases and record.copies_in_flight == 1
                    and record.replicas.get(location) is source):
                dp.add_replica(record, dest, Replica(alloc, evicted=True))
                dp.drop_replica(record, location)
                moved = True
                dp.observer.transfer(ticket.path, record.nbytes, 0.0, route=f"evict-{ticket.path}")
        except Exception as e:  # noqa: BLE001 - a failed move leaves the object where it was
            logger.warning("evicting %s from %s to %s failed: %s", record.ref, location, dest, e)
        finally:
            record.moving = False
            if not moved:
                self.aborted += 1
                dp.pool_of_slab(alloc.slab_id).free(alloc)
            dp.lifetimes.copy_finished(record, dest)
        if moved:
            self._count(record, location, dest, order)
        return moved

    def _count(self, record: ObjectRecord, source: Location, dest: Location, order: str) -> None:
        self.evictions[(source, dest, order)] += 1
        self.evicted_bytes_total[source] += record.nbytes
        if record.home is None and not record.released and not any(
                not loc.is_host and not r.evicted for loc, r in record.replicas.items()):
            record.home = source
            self.evicted[record.ref] = record
        logger.debug("evicted %s (%d bytes) from %s to %s (%s order)", record.ref, record.nbytes, source, dest, order)

    # --- rebalancing: the cap, and restores --------------------------------------------------------

    async def rebalance(self) -> None:
        await self._shrink_to_caps()
        self._drop_stale_copies()
        if self.policy.restores_proactively:
            await self._restore_some()

    async def _shrink_to_caps(self) -> None:
        dp = self.dp
        for location in dp.locations:
            budget = dp.budgets[location]
            domains = sorted({d for d, loc in dp.pools if loc == location}, key=str)
            over = budget.total - budget.limit_bytes - self._retiring_bytes(location, domains)
            if location.is_host or over <= 0:
                continue
            fronts = self._fronts()
            # Workflows above their own target give first; then everyone, if the cap is lower still.
            plan = (self._slab_plan(location, over, domains, owner=None, writer=None, fronts=fronts,
                                    protect_above=None))
            if plan is None:
                continue
            for slab, victims in plan.slabs:
                moved = await self._move_all(victims, location, self._order_label(slab.domain))
                if all(moved) and not slab.live and not slab.retired:
                    dp.pool_of_slab(slab.id).retire(slab, "cap")
            dp.announce_retired()
            dp.reclaim(location)

    def _drop_stale_copies(self) -> None:
        """Evicted copies of objects back home go, once nobody reads the object."""
        dp = self.dp
        for record in list(dp.lifetimes):
            if record.home is not None or record.busy() or record.moving:
                continue
            stale = [loc for loc, r in record.replicas.items() if r.evicted]
            for loc in stale:
                if len(record.replicas) > 1:
                    dp.drop_replica(record, loc)

    async def _restore_some(self) -> None:
        dp = self.dp
        now = dp.now()
        fronts = self._fronts()
        pending: list[tuple[elastic.EvictionKey, ObjectRecord, elastic.Candidate]] = []
        for record in list(self.evicted.values()):
            if record.released or record.home is None or record.moving or record.home in record.replicas:
                continue
            qa = self._queue_aware(record.domain)
            cand = elastic.Candidate(record.ref, record.nbytes, 0, 0, record.last_used_s, record.hint,
                                     fronts.get(record.domain, 0))
            pending.append((elastic.restore_key(cand, queue_aware=qa), record, cand))
        pending.sort(key=lambda p: p[0], reverse=True)
        tasks: list[Coroutine[Any, Any, bool]] = []
        for _, record, cand in pending:
            if len(tasks) + self._restores_running >= self.policy.restores_in_flight:
                break
            home = record.home
            if home is None:
                continue
            urgent = elastic.due_soon(cand, now_s=now, policy=self.policy)
            budget = dp.budgets[home]
            grow = align_up(record.nbytes, LARGE_ROUND_BYTES)
            spare = budget.headroom(record.domain) - grow >= elastic.PEER_HEADROOM_SHARE * budget.limit_bytes
            if not (urgent or spare or dp.fits_without_growth(record.domain, home, record.nbytes)):
                continue
            qa = self._queue_aware(record.domain)
            tasks.append(self.restore(record, trigger="proactive", urgent=urgent,
                                      key=elastic.eviction_key(cand, queue_aware=qa)))
        if tasks:
            await asyncio.gather(*tasks)

    async def restore(self, record: ObjectRecord, *, trigger: str, urgent: bool,
                      key: elastic.EvictionKey | None = None) -> bool:
        """Copy an evicted object back to its home GPU; True once it landed."""
        dp = self.dp
        home = record.home
        if home is None or record.released or record.moving or home in record.replicas:
            return False
        self._restores_running += 1
        try:
            try:
                replica, _path = dp.replicate(None, record, home)
            except errors.OutOfPoolMemory:
                if not urgent:
                    return False
                room = await self.make_room(record.domain, home, grow_bytes=align_up(record.nbytes, LARGE_ROUND_BYTES),
                                            hole_bytes=align_up(record.nbytes, ALIGN_BYTES), protect_above=key,
                                            borrow=False)
                if room is None or record.released or record.home != home or home in record.replicas:
                    return False
                try:
                    with dp.budgets[home].lend(room.loan_bytes):
                        replica, _path = dp.replicate(None, record, home)
                except errors.OutOfPoolMemory:
                    return False
            if replica.landing is not None:
                try:
                    await asyncio.shield(replica.landing)
                except Exception:  # noqa: BLE001 - logged by the copy's own callback
                    return False
            if record.replicas.get(home) is replica:
                self.restores[(home, trigger)] += 1
                return True
            return False
        finally:
            self._restores_running -= 1
