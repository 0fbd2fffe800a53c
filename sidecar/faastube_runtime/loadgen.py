"""Sending requests to a gateway on an arrival schedule and recording what came back."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from faastube_runtime.gateway import BREAKDOWN_HEADER, NPY_CONTENT_TYPE

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RequestResult:
    index: int
    status: int  # HTTP status; 0 when no answer came (connection failed)
    latency_s: float  # as the client saw it, from its scheduled send time
    breakdown: dict[str, float] | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


async def drive(url: str, body: bytes, offsets_s: Sequence[float], *, concurrency: int,
                on_result: Callable[[RequestResult], None] | None = None,
                timeout_s: float = 120.0) -> list[RequestResult]:
    """POST ``body`` to ``url``/invoke at each offset (seconds from now), at most ``concurrency`` at once.

    Latency counts from the scheduled send time, so time spent waiting for a free
    client slot is part of it (an open-loop client would see the same delay).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    slots = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    start = loop.time()
    results: list[RequestResult] = []

    async def one(session: aiohttp.ClientSession, index: int, offset_s: float) -> None:
        delay_s = start + offset_s - loop.time()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        scheduled = start + offset_s
        async with slots:
            try:
                async with session.post(f"{url}/invoke", data=body,
                                        headers={"Content-Type": NPY_CONTENT_TYPE}) as response:
                    payload = await response.read()
                    raw = response.headers.get(BREAKDOWN_HEADER)
                    status = response.status
            except (TimeoutError, aiohttp.ClientError) as e:
                result = RequestResult(index, 0, loop.time() - scheduled, None, f"{type(e).__name__}: {e}")
            else:
                breakdown = json.loads(raw) if raw else None
                error = None if status == 200 else payload[:500].decode(errors="replace")
                result = RequestResult(index, status, loop.time() - scheduled, breakdown, error)
        results.append(result)
        if on_result is not None:
            on_result(result)

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(one(session, i, o) for i, o in enumerate(offsets_s)))
    return sorted(results, key=lambda r: r.index)

