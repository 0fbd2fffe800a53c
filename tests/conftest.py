"""Shared fixtures: a real sidecar process on a temporary socket (host backend)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
from sidecar_process import SidecarProcess


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
