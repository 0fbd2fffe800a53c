"""``faastube run --requests 0`` tells a client of one's own where the data is and who to be:
the printed ``faastube.connect(...)`` line, used as printed, reads a ref the gateway handed out
(real processes, host backend)."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from faastube import client as ft_client
from faastube import errors as ft_errors

FIXTURE = Path(__file__).parent / "gateway_fixture" / "workflow.yaml"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "faastube.cli", "run", str(FIXTURE), "--requests", "0", "--port", "0",
         "--backend", "host"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "GWTEST_STATE_DIR": str(tmp_path)})
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if "FAASTUBE_SOCKET=" in line:
                break
        assert any("FAASTUBE_SOCKET=" in line for line in lines), "\n".join(lines)
        yield proc, lines
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _connect_call(lines: list[str]) -> tuple[str, dict[str, str]]:
    """The socket and keywords of the printed ``faastube.connect(...)`` line."""
    line = next(line.strip() for line in lines if line.strip().startswith("faastube.connect("))
    call = ast.parse(line, mode="eval").body
    assert isinstance(call, ast.Call)
    return ast.literal_eval(call.args[0]), {k.arg or "": ast.literal_eval(k.value) for k in call.keywords}


def test_serving_prints_a_connect_line_that_reads_the_gateways_output(
        served: tuple[subprocess.Popen[str], list[str]]) -> None:
    _, lines = served
    socket, identity = _connect_call(lines)
    assert os.path.exists(socket)
    assert any(line.startswith(f"sidecar socket: {socket}") for line in lines)
    assert identity["workflow"] == "gwtest"
    url = re.search(r"(http://\S+)/invoke", "\n".join(lines))
    assert url is not None
    body = io.BytesIO()
    np.save(body, np.arange(4, dtype=np.float32))
    request = urllib.request.Request(f"{url.group(1)}/invoke?output=ref", data=body.getvalue(),
                                     headers={"Content-Type": "application/x-npy"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        ref = json.loads(answer.read())["ref"]

    # the default identity belongs to another workflow: refused, as the issue reported
    with ft_client.connect(socket) as stranger, pytest.raises(ft_errors.PermissionDenied):
        stranger.get(ref, copy=True)
    with ft_client.connect(socket, **identity) as client:
        out = client.get(ref, copy=True)  # its one declared read: the object goes with it
    x = np.arange(4, dtype=np.float32) + 1  # split; then left-arm x*2 and right-arm x*3, joined
    np.testing.assert_array_equal(np.asarray(out), x * 2 + x * 3)


def test_the_printed_environment_variables_work_with_a_bare_connect(
        served: tuple[subprocess.Popen[str], list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    _, lines = served
    env_line = next(line for line in lines if "FAASTUBE_SOCKET=" in line)
    for name, value in re.findall(r"(FAASTUBE_\w+)=(\S+)", env_line):
        monkeypatch.setenv(name, value)
    with ft_client.connect() as client:
        ref = client.put(np.ones(3, dtype=np.int64))
        assert client.identity["workflow"] == "gwtest"
        np.testing.assert_array_equal(np.asarray(client.get(ref, copy=True)), np.ones(3, dtype=np.int64))
        client.free(ref)
