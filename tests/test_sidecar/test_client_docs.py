"""The client examples in README.md and docs/client.md run as written against a real sidecar on
the host backend, and the backend table's claims hold there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faastube import client as ft_client
from faastube import errors

ROOT = Path(__file__).resolve().parents[2]


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file that are programs (they import faastube)."""
    blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)
    return [b for b in blocks if b.startswith("import faastube")]


def run_example(code: str, sidecar: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAASTUBE_")}
    env["FAASTUBE_SOCKET"] = str(sidecar.socket_path)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


def test_the_readmes_client_example_runs_as_written_on_the_host_backend(sidecar: Any) -> None:
    (code,) = python_blocks(ROOT / "README.md")
    done = run_example(code, sidecar)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "(8, 3, 224, 224) 1204224.0"
    assert "ObjectInfo(" in lines[1] and "consumers_left=2" in lines[1] and "shape=(8, 1000)" in lines[1]
    with ft_client.connect(str(sidecar.socket_path)) as client:
        assert client.stats()["objects"] == 0  # the example freed what it made


def test_the_client_pages_example_runs_as_written(sidecar: Any) -> None:
    blocks = python_blocks(ROOT / "docs" / "client.md")
    assert blocks
    for code in blocks:
        done = run_example(code, sidecar)
        assert done.returncode == 0, done.stderr


def test_the_host_backend_refuses_a_cuda_device_and_says_to_use_cpu(sidecar: Any) -> None:
    with ft_client.connect(str(sidecar.socket_path)) as client:
        assert client.backend == "host"
        with pytest.raises(errors.InvalidRequest, match="use device='cpu'"):
            client.empty((2,), "float32", device=0)
        w = client.empty((2,), "float32", device="cpu")
        w.array[:] = 3
        ref = client.seal(w, consumers=1)
        assert client.get(ref, copy=True).tolist() == [3.0, 3.0]


def test_a_consumed_object_is_ref_not_found_and_another_workflow_is_permission_denied(sidecar: Any) -> None:
    with ft_client.connect(str(sidecar.socket_path), workflow="a", function="f") as a, \
            ft_client.connect(str(sidecar.socket_path), workflow="b", function="g") as b:
        ref = a.put(np.arange(3), consumers=1)
        with pytest.raises(errors.PermissionDenied):
            b.get(ref)
        a.get(ref, copy=True)
        with pytest.raises(errors.RefNotFound):
            a.stat(ref)
