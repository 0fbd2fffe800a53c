"""The real sidecar as a subprocess, for the fixtures in ``conftest.py`` and for tests that
start one themselves. A module of its own because ``from conftest import ...`` gets whichever
conftest.py pytest loaded last once more than one directory has one.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


class SidecarProcess:
    """`faastube sidecar` as a subprocess; stopped (SIGTERM) at teardown."""

    def __init__(self, socket_path: Path, *extra: str, backend: str = "host",
                 env: dict[str, str] | None = None) -> None:
        self.socket_path = socket_path
        self.log_path = socket_path.parent.parent / f"sidecar-{socket_path.parent.name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "faastube.cli", "--log-level", "INFO", "sidecar",
             "--socket", str(socket_path), "--backend", backend, *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
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
