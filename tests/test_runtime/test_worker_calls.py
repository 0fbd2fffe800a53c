"""A function worker over its Unix socket: request validation, calls, retries, /forget."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from faastube_runtime import handlers, wire
from faastube_spec.workflow import load_workflow
from sidecar_subprocess import running_sidecar
from worker_harness import Served, serve

FIXTURE = Path(__file__).parent / "gateway_fixture" / "workflow.yaml"


@pytest.fixture(scope="module")
def sidecar_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("wsock") / "sidecar.sock")
    with running_sidecar(path, backend="host", start_timeout_s=30):
        yield path


@pytest_asyncio.fixture
async def served(sidecar_socket: str, tmp_path: Path) -> AsyncIterator[Served]:
    workflow = load_workflow(FIXTURE)
    handler = handlers.load_handler(workflow, workflow.function("left-arm"))
    async with serve(sidecar_socket, tmp_path, workflow, "left-arm", handler, tester_function="tester") as s:
        yield s


def call(ref: str, **overrides: object) -> dict[str, object]:
    body: dict[str, object] = {"request_id": "r1", "attempt": 1, "final": False,
                               "inputs": {"split": ref}, "timeout_s": 5.0}
    body.update(overrides)
    return body


@pytest.mark.parametrize("override, message", [
    ({"inputs": {"other": "ft-x"}}, "inputs: expected entries for ['split']"),
    ({"attempt": 0}, "attempt: must be an integer from 1 to 100"),
    ({"timeout_s": -1}, "timeout_s: must be positive"),
    ({"final": "yes"}, "final: must be true or false"),
    ({"request_id": ""}, "request_id: must be a non-empty string"),
    ({"extra": 1}, "unknown field(s) ['extra']"),
])
async def test_malformed_calls_are_rejected_naming_the_field(served: Served, override: dict, message: str) -> None:
    status, body = await served.post(wire.CALL_PATH, call("ft-x", **override))
    assert status == 400 and message in body["message"] and body["retryable"] is False


async def test_a_call_reads_its_input_and_stores_its_output_for_each_reader(served: Served) -> None:
    tester = served.tester
    ref = tester.put(np.arange(3, dtype=np.float32), consumers=1)
    status, body = await served.post(wire.CALL_PATH, call(ref))
    assert status == 200, body
    reply = wire.parse_reply(body, expected_readers={"join"})
    assert tester.get(reply["outputs"]["join"], copy=True).tolist() == [0.0, 2.0, 4.0]
    with pytest.raises(Exception, match="not found"):
        tester.stat(ref)  # its one consumer read it


async def test_a_missing_input_is_not_retryable(served: Served) -> None:
    status, body = await served.post(wire.CALL_PATH, call("ft-" + "a" * 32))
    assert status == 410 and body["retryable"] is False


async def test_a_failed_call_keeps_its_input_until_the_request_is_forgotten(served: Served) -> None:
    tester = served.tester
    ref = tester.put(np.array([100.0]), consumers=1)
    status, body = await served.post(wire.CALL_PATH, call(ref, request_id="r7"))
    assert status == 500 and body["retryable"] is True and "always fails" in body["message"]
    assert tester.stat(ref).readers == 1  # the worker still holds its read for a retry
    status, body = await served.post(wire.FORGET_PATH, {"request_id": "r7"})
    assert status == 200 and body == {"dropped": 1}
    await asyncio.sleep(0)
    with pytest.raises(Exception, match="not found"):
        tester.stat(ref)  # that read ended and was the one declared consumer


async def test_a_call_finishing_after_its_deadline_drops_its_outputs(served: Served,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tester = served.tester
    monkeypatch.setenv("GWTEST_SLEEP_S", "0.3")
    ref = tester.put(np.array([200.0]), consumers=1)
    status, body = await served.post(wire.CALL_PATH, call(ref, timeout_s=0.05, final=True))
    assert status == 504 and body["error"] == "CallExpired" and body["retryable"] is True
    tester.flush()
    assert tester.stats()["objects"] == 0  # no output kept; the final attempt's read ended
