"""Shared fixtures: a real sidecar process on a temporary socket (host backend)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest


class SidecarProcess:
    """`faastube sidecar` as a subprocess; stopped (SIGTERM) at teardown."""

    def __init__(self, socket_path: Path, *extra: str, backend: str = "host") -> None:
        self.socket_path = socket_path
        self.log_path = socket_path.parent.parent / f"sidecar-{socket_path.parent.name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "faastube.cli", "--log-level", "INFO", "sidecar",
             "--socket", str(socket_path), "--backend", backend, *extra],
            stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}: {self.log()}")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.socket_path))
                return
            except OSError:
                time.sleep(0.05)
            finally:
                probe.close()
        raise RuntimeError(f"sidecar did not start: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _socket_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Unix socket paths are limited to ~107 bytes: keep them short.
    base = Path(os.environ.get("FAASTUBE_TEST_TMP", "/tmp"))
    d = Path(__import__("tempfile").mkdtemp(prefix="ft-", dir=base))
    return d


@pytest.fixture
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    d = _socket_dir(tmp_path_factory)
    proc = SidecarProcess(d / "run" / "faastube.sock")
    yield proc
    proc.stop()


@pytest.fixture
def make_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Start sidecars with extra flags: make_sidecar("--host-pool-max", "8Mi")."""
    started: list[SidecarProcess] = []

    def make(*extra: str, backend: str = "host") -> SidecarProcess:
        d = _socket_dir(tmp_path_factory)
        proc = SidecarProcess(d / "run" / "faastube.sock", *extra, backend=backend)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()
