"""`faastube sidecar` as a subprocess for the runtime tests, serving on a socket until the
block ends: the worker tests run it on the host backend, the GPU tests on the CUDA one."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator


@contextlib.contextmanager
def running_sidecar(socket_path: str, *, backend: str, start_timeout_s: float) -> Iterator[str]:
    """The sidecar on ``socket_path``; yields once the socket file exists, SIGTERM at exit."""
    proc = subprocess.Popen([sys.executable, "-m", "faastube.cli", "--log-level", "WARNING", "sidecar",
                             "--socket", socket_path, "--backend", backend])
    try:
        deadline = time.monotonic() + start_timeout_s
        while not os.path.exists(socket_path):
            assert proc.poll() is None, "sidecar exited"
            assert time.monotonic() < deadline, "sidecar did not start"
            time.sleep(0.02)
        yield socket_path
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@contextlib.contextmanager
def cuda_sidecar(*, prefix: str) -> Iterator[str]:
    """The sidecar on the CUDA backend, its socket in a new folder under /tmp (a short path:
    Unix socket paths are limited to ~107 bytes). The CUDA backend can take long to start."""
    folder = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    with running_sidecar(os.path.join(folder, "s.sock"), backend="cuda", start_timeout_s=60) as path:
        yield path
