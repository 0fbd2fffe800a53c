"""The gateway tells the data plane where each request's objects' reader stands in the queue.

Queue-aware eviction (docs/sidecar.md) moves out first the objects read furthest back:
every ref a request creates is hinted with the request's arrival number, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np
from faastube_runtime import dag
from faastube_runtime.gateway import ClientStore, Gateway
from runtime_doubles import InProcessInvoker, MemoryStore
from test_gateway_dag import diamond, handlers


class HintingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.hints: list[dict[str, int]] = []

    def hint(self, positions: Mapping[str, int], *, due_in_s: Any = None) -> None:
        self.hints.append(dict(positions))


async def test_every_ref_of_a_request_is_hinted_once_with_its_arrival_number() -> None:
    store, plan = HintingStore(), dag.plan_workflow(diamond())
    gateway = Gateway("diamond", plan, InProcessInvoker(store, handlers(), plan), ClientStore(store))
    for _ in range(2):
        with gateway.admit() as admission:
            result = await gateway.run(admission, array=np.array([1.0]))
        assert result.output is not None and result.output.tolist() == [10.0]
    await asyncio.sleep(0.05)  # hints are sent in the background, in order, on the store's thread
    by_position: dict[int, list[str]] = {}
    for positions in store.hints:
        for ref, position in positions.items():
            by_position.setdefault(position, []).append(ref)
    # request 1 and request 2: the input, a, b, c and d's outputs, each hinted exactly once
    assert sorted(by_position) == [1, 2]
    for refs in by_position.values():
        assert len(refs) == len(set(refs)) == 5


async def test_a_store_without_hints_still_serves() -> None:
    store, plan = MemoryStore(), dag.plan_workflow(diamond())
    gateway = Gateway("diamond", plan, InProcessInvoker(store, handlers(), plan), ClientStore(store))
    with gateway.admit() as admission:
        result = await gateway.run(admission, array=np.array([1.0]))
    assert result.output is not None and result.output.tolist() == [10.0]
