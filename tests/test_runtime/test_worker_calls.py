"""A function worker over its Unix socket: request validation, calls, retries, /forget."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from faastube import client as ft_client
from faastube_runtime import handlers, wire
from faastube_runtime.worker import FunctionWorker, build_app
from faastube_spec.workflow import load_workflow

FIXTURE = Path(__file__).parent / "gateway_fixture" / "workflow.yaml"


@pytest.fixture(scope="module")
def sidecar_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("wsock") / "sidecar.sock")
    proc = subprocess.Popen([sys.executable, "-m", "faastube.cli", "--log-level", "WARNING", "sidecar",
                             "--socket", path, "--backend", "host"])
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        assert proc.poll() is None, "sidecar exited"
        assert time.monotonic() < deadline, "sidecar did not start"
        time.sleep(0.02)
    yield path
    proc.terminate()
    proc.wait(timeout=10)


@pytest_asyncio.fixture
async def served(sidecar_socket: str, tmp_path: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, ft_client.Client]]:
    workflow = load_workflow(FIXTURE)
    client = ft_client.connect(sidecar_socket, workflow="gwtest", function="left-arm")
    worker = FunctionWorker(workflow, "left-arm", handlers.load_handler(workflow, workflow.function("left-arm")),
                            client)
    runner = aiohttp.web.AppRunner(build_app(worker))
    await runner.setup()
    sock = str(tmp_path / "w.sock")
    await aiohttp.web.UnixSite(runner, sock).start()
    tester = ft_client.connect(sidecar_socket, workflow="gwtest", function="tester")
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as session:
        yield session, tester
    await runner.cleanup()
    worker.close()
    tester.close()
    client.close()


def call(ref: str, **overrides: object) -> dict[str, object]:
    body: dict[str, object] = {"request_id": "r1", "attempt": 1, "final": False,
                               "inputs": {"split": ref}, "timeout_s": 5.0}
    body.update(overrides)
    return body


async def post(session: aiohttp.ClientSession, path: str, body: object) -> tuple[int, dict]:
    async with session.post(f"http://w{path}", json=body) as r:
        return r.status, await r.json()


@pytest.mark.parametrize("override, message", [
    ({"inputs": {"other": "ft-x"}}, "inputs: expected entries for ['split']"),
    ({"attempt": 0}, "attempt: must be an integer from 1 to 100"),
    ({"timeout_s": -1}, "timeout_s: must be positive"),
    ({"final": "yes"}, "final: must be true or false"),
    ({"request_id": ""}, "request_id: must be a non-empty string"),
    ({"extra": 1}, "unknown field(s) ['extra']"),
])
async def test_malformed_calls_are_rejected_naming_the_field(served: tuple, override: dict, message: str) -> None:
    session, _ = served
    status, body = await post(session, wire.CALL_PATH, call("ft-x", **override))
    assert status == 400 and message in body["message"] and body["retryable"] is False


async def test_a_call_reads_its_input_and_stores_its_output_for_each_reader(served: tuple) -> None:
    session, tester = served
    ref = tester.put(np.arange(3, dtype=np.float32), consumers=1)
    status, body = await post(session, wire.CALL_PATH, call(ref))
    assert status == 200, body
    reply = wire.parse_reply(body, expected_readers={"join"})
    assert tester.get(reply["outputs"]["join"], copy=True).tolist() == [0.0, 2.0, 4.0]
    with pytest.raises(Exception, match="not found"):
        tester.stat(ref)  # its one consumer read it


async def test_a_missing_input_is_not_retryable(served: tuple) -> None:
    session, _ = served
    status, body = await post(session, wire.CALL_PATH, call("ft-" + "a" * 32))
    assert status == 410 and body["retryable"] is False


async def test_a_failed_call_keeps_its_input_until_the_request_is_forgotten(served: tuple) -> None:
    session, tester = served
    ref = tester.put(np.array([100.0]), consumers=1)
    status, body = await post(session, wire.CALL_PATH, call(ref, request_id="r7"))
    assert status == 500 and body["retryable"] is True and "always fails" in body["message"]
    assert tester.stat(ref).readers == 1  # the worker still holds its read for a retry
    status, body = await post(session, wire.FORGET_PATH, {"request_id": "r7"})
    assert status == 200 and body == {"dropped": 1}
    await asyncio.sleep(0)
    with pytest.raises(Exception, match="not found"):
        tester.stat(ref)  # that read ended and was the one declared consumer


async def test_a_call_finishing_after_its_deadline_drops_its_outputs(served: tuple,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    session, tester = served
    monkeypatch.setenv("GWTEST_SLEEP_S", "0.3")
    ref = tester.put(np.array([200.0]), consumers=1)
    status, body = await post(session, wire.CALL_PATH, call(ref, timeout_s=0.05, final=True))
    assert status == 504 and body["error"] == "CallExpired" and body["retryable"] is True
    tester.flush()
    assert tester.stats()["objects"] == 0  # no output kept; the final attempt's read ended
