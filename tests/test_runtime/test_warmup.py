"""Warm starts: a worker is ready only once warm, its hook runs once, a failed warm-up ends it,
and ``faastube run`` sends nothing before every worker is warm (real processes, host backend)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from faastube import client as ft_client
from faastube_runtime import wire

FIXTURE = Path(__file__).parent / "warm_fixture" / "workflow.yaml"


class Worker:
    """``python -m faastube_runtime.worker`` (or ``faastube worker``) serving one fixture function."""

    def __init__(self, sidecar: Any, folder: Path, function: str, env: dict[str, str], *,
                 cli: bool = False) -> None:
        self.socket = str(folder / f"{function}.sock")
        self.log_path = folder / f"{function}.log"
        if cli:
            command = ["-m", "faastube.cli", "worker", "--workflow", str(FIXTURE), "--function", function,
                       "--listen", self.socket, "--sidecar", str(sidecar.socket_path)]
        else:
            command = ["-m", "faastube_runtime.worker", "--log-level", "INFO", "--workflow", str(FIXTURE),
                       "--function", function, "--listen", self.socket, "--sidecar", str(sidecar.socket_path)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **env})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def health(self) -> tuple[int, dict[str, Any]] | None:
        """(status, body), or None while nothing answers."""
        if not os.path.exists(self.socket):
            return None
        try:
            async with (aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.socket)) as s,
                        s.get(f"http://w{wire.HEALTH_PATH}") as r):
                return r.status, await r.json()
        except aiohttp.ClientError:
            return None

    async def until(self, predicate: Any, *, timeout_s: float = 60.0) -> tuple[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}: {self.log()}"
            answer = await self.health()
            if answer is not None and predicate(*answer):
                return answer
            assert time.monotonic() < deadline, f"timed out; last answer {answer}; log: {self.log()}"
            await asyncio.sleep(0.02)

    async def call(self, ref: str) -> tuple[int, dict[str, Any]]:
        body = {"request_id": "r1", "attempt": 1, "final": True, "inputs": {"first": ref}, "timeout_s": 10.0}
        async with (aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.socket)) as s,
                    s.post(f"http://w{wire.CALL_PATH}", json=body) as r):
            return r.status, await r.json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=20)

    def exited(self, timeout_s: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout_s)


@pytest.fixture
def folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    import tempfile

    yield Path(tempfile.mkdtemp(prefix="ftw-", dir="/tmp"))  # short: Unix socket paths


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_a_worker_answers_503_until_its_hook_and_warm_up_calls_ran_then_200(sidecar: Any,
                                                                                  folder: Path) -> None:
    gate, trace = folder / "gate", folder / "trace"
    worker = Worker(sidecar, folder, "second", {"WARM_GATE": str(gate), "WARM_LOG": str(trace)})
    try:
        # listening, but its hook is waiting for the gate: not ready
        status, body = await worker.until(lambda status, body: body.get("phase") == "warming up")
        assert status == 503 and body == {"ready": False, "function": "second", "phase": "warming up"}
        with ft_client.connect(str(sidecar.socket_path), workflow="warmtest", function="first") as tester:
            ref = tester.put(np.ones((2, 3), np.float32), consumers=1)
            status, body = await worker.call(ref)
            assert status == 503 and body["error"] == "NotReady" and body["retryable"] is True
            tester.free(ref)  # refused: nobody read it
            assert log_lines(trace) == ["hook second None numpy"]  # no call reached the handler

            gate.touch()
            status, body = await worker.until(lambda status, body: status == 200)
            assert body["ready"] is True and body["function"] == "second"
            warmup = body["warmup"]
            assert warmup["hook_s"] is not None and warmup["call_s"] is not None
            assert warmup["batch_call_s"] is not None  # maxSize 4: a full batch was warmed too
            assert warmup["total_s"] >= warmup["hook_s"] and warmup["note"] == ""
            assert log_lines(trace) == ["hook second None numpy", "hook done second",
                                        "call second [2, 3] zeros",   # one request, as the edge says
                                        "call second [8, 3] zeros"]   # four of them, stacked

            for _ in range(3):
                ref = tester.put(np.ones((2, 3), np.float32), consumers=1)
                status, body = await worker.call(ref)
                assert status == 200, body
                assert tester.get(body["outputs"]["third"], copy=True).tolist() == [[2.0] * 3] * 2
            lines = log_lines(trace)
            assert lines.count("hook second None numpy") == 1  # the hook ran once
            assert lines[-3:] == ["call second [2, 3] data"] * 3
            tester.flush()
            assert tester.stats()["objects"] == 0  # the warm-up published nothing
    finally:
        assert worker.stop() == 0, worker.log()
    assert "ready on device None: warm in" in worker.log()


@pytest.mark.parametrize("cli", [False, True], ids=["python -m faastube_runtime.worker", "faastube worker"])
async def test_a_failing_warmup_hook_ends_the_worker_with_status_3_and_says_why(sidecar: Any, folder: Path,
                                                                                 cli: bool) -> None:
    worker = Worker(sidecar, folder, "second", {"WARM_FAIL": "hook"}, cli=cli)
    assert worker.exited() == 3
    assert "warm-up failed: the warmup hook 'load' of 'second' raised RuntimeError: no model here" in worker.log()


async def test_a_failing_warm_up_call_ends_the_worker_with_status_3_and_says_why(sidecar: Any,
                                                                                 folder: Path) -> None:
    worker = Worker(sidecar, folder, "second", {"WARM_FAIL": "call"})
    assert worker.exited() == 3
    handlers = FIXTURE.parent / "warmfunctions.py"
    line = next(i for i, text in enumerate(handlers.read_text().splitlines(), 1) if "bad weights" in text)
    assert ("worker second: warm-up failed: the warm-up call of 'second' on zeros (1 request(s) of "
            f"first float32[2, 3]) failed: handler 'second' raised ValueError at "
            f"{handlers}:{line}: bad weights") in worker.log()


async def test_the_entry_is_warmed_on_the_workflows_request_input(sidecar: Any, folder: Path) -> None:
    trace = folder / "trace"
    worker = Worker(sidecar, folder, "first", {"WARM_LOG": str(trace)})
    try:
        _, body = await worker.until(lambda status, body: status == 200)
        assert body["warmup"]["hook_s"] is None and body["warmup"]["call_s"] is not None
        assert body["warmup"]["batch_call_s"] is None  # not batched
        assert log_lines(trace) == ["call first [2, 3] zeros"]
    finally:
        worker.stop()


async def test_a_function_whose_input_has_no_shape_gets_no_warm_up_call_and_says_so(sidecar: Any,
                                                                                     folder: Path) -> None:
    trace = folder / "trace"
    worker = Worker(sidecar, folder, "third", {"WARM_LOG": str(trace)})
    try:
        _, body = await worker.until(lambda status, body: status == 200)
        assert body["warmup"]["call_s"] is None
        assert body["warmup"]["note"] == "no warm-up call: no shape and dtype for the edge second -> third"
        assert log_lines(trace) == []
    finally:
        worker.stop()
    assert ("function third gets no warm-up call: no shape and dtype for the edge second -> third; "
            "its first request pays") in worker.log()


def run_locally(folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    request = folder / "in.npy"
    np.save(request, np.full((2, 3), 5.0, np.float32))
    return subprocess.run([sys.executable, "-m", "faastube.cli", "run", str(FIXTURE), "--requests", "3",
                           "--backend", "host", "--input", str(request), "--concurrency", "1"],
                          capture_output=True, text=True, timeout=180, env={**os.environ, **env}, check=False)


def test_faastube_run_waits_for_every_worker_to_be_warm_and_says_how_long_each_took(folder: Path) -> None:
    trace = folder / "trace"
    done = run_locally(folder, {"WARM_LOG": str(trace), "WARM_HOOK_SLEEP_S": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    err = done.stderr
    assert "every worker warm" in err and "warm-up (slowest replica per function):" in err
    table = err[err.index("warm-up (slowest"):].splitlines()[1:4]
    assert [line.split()[0] for line in table] == ["first", "second", "third"]  # workflow order
    assert "(call " in table[0]
    assert "(hook " in table[1] and ", call " in table[1] and ", full batch " in table[1]
    assert "no warm-up call: no shape and dtype for the edge second -> third" in table[2]
    assert float(table[1].split()[1].rstrip("s")) >= 1.0  # the hook's second is in second's time
    lines = log_lines(trace)
    # 'first' was warm at once, but no request reached it before 'second' was warm too
    assert lines.index("hook done second") < lines.index("call first [2, 3] data")
    assert lines.count("call first [2, 3] data") == 3 and "3/3 ok" in done.stdout + err


def test_faastube_run_does_not_start_when_a_worker_cannot_warm_up(folder: Path) -> None:
    done = run_locally(folder, {"WARM_FAIL": "hook"})
    assert done.returncode == 2
    assert "fn-second-0 exited with status 3 during startup" in done.stderr
    assert "no model here" in done.stderr
