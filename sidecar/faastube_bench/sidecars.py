"""Sidecar processes for the benchmarks: start one, wait until its socket answers, stop it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO


class SidecarFailed(RuntimeError):
    """A benchmark's sidecar exited or did not start in time; the message has its log's end."""


def start(socket_path: Path | str, flags: Sequence[str], *, backend: str, log: IO[bytes] | None = None,
          env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`faastube sidecar` on `socket_path` (not waited for: see ``wait_ready``)."""
    return subprocess.Popen([sys.executable, "-m", "faastube.cli", "--log-level", "WARNING", "sidecar",
                             "--socket", str(socket_path), "--backend", backend, *flags],
                            stdout=log, stderr=subprocess.STDOUT if log is not None else None,
                            env=dict(env) if env is not None else None)


def wait_ready(proc: subprocess.Popen[bytes], socket_path: Path | str, *, log_path: Path | None = None,
               timeout_s: float = 60.0) -> None:
    """Until the sidecar accepts a connection (its readiness); SidecarFailed if it exits or is late."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:] if log_path is not None else ""
            raise SidecarFailed(f"a sidecar exited with {proc.returncode}" + (f": {tail}" if tail else ""))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(socket_path))
                return
            except OSError:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise SidecarFailed(f"a sidecar did not start within {timeout_s:g}s") from None
                time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], *, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
