"""A call whose input died with its node makes the request start over (cross-node passing).

Retrying the same call can't help (the object is gone with the node that held it), so
the worker says ``InputLost``, the DAG stops retrying that call, and the gateway runs
the whole request again, once by default, producers included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from faastube import errors, protocol, sdk
from faastube_runtime import dag
from faastube_runtime import errors as rt_errors
from faastube_runtime.gateway import ClientStore, Gateway, GatewayConfig
from runtime_doubles import InProcessInvoker, MemoryStore
from test_gateway_dag import diamond, handlers


class LosesOneInput:
    """Invoker whose first call of `function` finds an input gone with its node; counts calls."""

    def __init__(self, inner: InProcessInvoker, function: str, *, times: int = 1) -> None:
        self.inner = inner
        self.function = function
        self.left = times
        self.calls: list[str] = []

    async def invoke(self, function: str, inputs: Mapping[str, str], **kw: Any) -> dag.CallOutcome:
        self.calls.append(function)
        if function == self.function and self.left:
            self.left -= 1
            raise rt_errors.CallFailed(f"{function}[0]: InputLost: input held by node node-1, which can't be "
                                       "read from", retryable=True, input_lost=True)
        return await self.inner.invoke(function, inputs, **kw)


async def test_a_lost_input_starts_the_request_over_and_it_succeeds() -> None:
    store, plan = MemoryStore(), dag.plan_workflow(diamond())
    invoker = LosesOneInput(InProcessInvoker(store, handlers(), plan), "d")
    gateway = Gateway("diamond", plan, invoker, ClientStore(store))
    with gateway.admit() as admission:
        result = await gateway.run(admission, array=np.array([1.0]))
    assert result.output is not None and result.output.tolist() == [10.0]
    # d failed once, not retried as such; then a, b, c and d all ran again
    assert invoker.calls.count("d") == 2 and invoker.calls.count("a") == 2
    assert sorted(invoker.calls[:4]) == ["a", "b", "c", "d"]
    assert set(store.objects) == set()          # both attempts' objects freed with the request


async def test_a_request_that_keeps_losing_its_input_fails_retryably() -> None:
    store, plan = MemoryStore(), dag.plan_workflow(diamond())
    invoker = LosesOneInput(InProcessInvoker(store, handlers(), plan), "d", times=5)
    gateway = Gateway("diamond", plan, invoker, ClientStore(store),
                      config=GatewayConfig(policy=dag.DagPolicy(request_retries=1)))
    with gateway.admit() as admission, pytest.raises(rt_errors.InputLost) as raised:
        await gateway.run(admission, array=np.array([1.0]))
    assert raised.value.http_status == 503 and isinstance(raised.value, errors.RetryableError)
    assert invoker.calls.count("d") == 2 and "node-1" in str(raised.value)
    assert set(store.objects) == set()


class _NodeClient:
    """A data client on node-0 whose reads of other nodes' refs find that node gone."""

    node = "node-0"

    def get(self, ref: str, **_: Any) -> Any:
        raise errors.Unavailable(f"get {ref}: nothing came from node node-1 for 10s; retry")


def test_the_sdk_names_a_remote_input_that_cannot_be_read_an_input_lost() -> None:
    remote = protocol.new_ref("node-1")
    with pytest.raises(sdk.InputLost, match=r"input 'x' \(ft-[0-9a-f]+@node-1\) is held by node node-1"):
        sdk.execute(_NodeClient(), lambda x: x, inputs={"x": remote}, readers=["y"])  # type: ignore[arg-type]
    local = protocol.new_ref("node-0")          # our own node's sidecar unavailable: an ordinary retry
    with pytest.raises(errors.Unavailable) as raised:
        sdk.execute(_NodeClient(), lambda x: x, inputs={"x": local}, readers=["y"])  # type: ignore[arg-type]
    assert not isinstance(raised.value, sdk.InputLost)
