"""Gathering a worker's queued calls into batches (the shape of Triton's dynamic batcher).

Calls queue as they arrive. When the handler thread is free, the next batch takes the
oldest queued call and waits for more until it holds ``max_size`` calls or ``max_delay_s``
has passed since that oldest call *arrived*: a call that queued while the previous batch
ran has waited already, so it only takes what else is queued and goes. Waiting is on an
event set by arrivals (no polling); one batch runs at a time, since the worker has one
handler thread.

Without a batch policy a worker uses ``BatchPolicy()`` (one call, no wait): calls run one
at a time in arrival order, as they always did.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from faastube_spec.workflow import BatchSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_size: int = 1
    max_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {self.max_size}")
        if not self.max_delay_s >= 0:
            raise ValueError(f"max_delay_s must not be negative, got {self.max_delay_s}")

    @classmethod
    def of(cls, spec: BatchSpec | None) -> BatchPolicy:
        return cls() if spec is None else cls(max_size=spec.max_size, max_delay_s=spec.max_delay_s)


class Batcher(Generic[T]):
    """Queues items and hands them to ``run`` in batches, one batch at a time.

    ``run`` must handle its batch's failures itself (answering each item); an error
    escaping it is logged and the batcher goes on with the next batch.
    """

    def __init__(self, policy: BatchPolicy, run: Callable[[list[T]], Awaitable[None]]) -> None:
        self.policy = policy
        self._run = run
        self._queue: collections.deque[tuple[float, T]] = collections.deque()
        self._arrived = asyncio.Event()
        self.batches_run = 0

    def submit(self, item: T) -> None:
        self._queue.append((time.monotonic(), item))
        self._arrived.set()

    def __len__(self) -> int:
        return len(self._queue)

    async def next_batch(self) -> list[T]:
        """The next batch: the oldest item and what joins it within the policy."""
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        first_arrived = self._queue[0][0]
        while len(self._queue) < self.policy.max_size:
            remaining_s = first_arrived + self.policy.max_delay_s - time.monotonic()
            if remaining_s <= 0:
                break
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining_s):
                    await self._arrived.wait()
            except TimeoutError:
                break
        count = min(self.policy.max_size, len(self._queue))
        return [self._queue.popleft()[1] for _ in range(count)]

    async def run_forever(self) -> None:
        while True:
            batch = await self.next_batch()
            try:
                await self._run(batch)
            except Exception:  # noqa: BLE001 - one batch's failure must not stop the function
                logger.exception("a batch of %d call(s) failed outside its calls' handling", len(batch))
            self.batches_run += 1
