"""GPU data paths of the SDK against a real sidecar with the CUDA backend (skipped without a GPU)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from faastube import sdk
from sidecar_subprocess import cuda_sidecar

cupy = pytest.importorskip("cupy")
try:
    GPUS = cupy.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no driver means no GPU
    GPUS = 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    from faastube import client as ft_client

    with cuda_sidecar(prefix="ftgpu") as path:
        c = ft_client.connect(path, workflow="gputest", function="f")
        yield c
        c.close()


def test_a_gpu_function_gets_gpu_arrays_and_its_gpu_output_stays_on_the_gpu(client: object) -> None:
    ref = client.put(cupy.arange(1 << 20, dtype=cupy.float32), consumers=1)  # type: ignore[attr-defined]
    seen = []

    def handler(x: object) -> object:
        seen.append(type(x).__module__.split(".")[0])
        return x * 2  # type: ignore[operator]

    inv = sdk.execute(client, handler, inputs={"a": ref}, readers=["b"], device=0)  # type: ignore[arg-type]
    assert seen == ["cupy"]
    info = client.stat(inv.outputs["b"])  # type: ignore[attr-defined]
    assert "host" not in info.locations
    out = client.get(inv.outputs["b"], device=0, copy=True)  # type: ignore[attr-defined]
    assert float(out[3]) == 6.0


def test_host_centric_passing_moves_gpu_outputs_through_host_memory(client: object) -> None:
    ref = client.put(np.arange(1024, dtype=np.float32), consumers=1)  # type: ignore[attr-defined]
    seen = []

    def handler(x: object) -> object:
        seen.append(type(x).__module__.split(".")[0])
        return x + 1  # type: ignore[operator]

    inv = sdk.execute(client, handler, inputs={"a": ref}, readers=["b"], device=0,  # type: ignore[arg-type]
                      passing="host-centric")
    assert seen == ["cupy"]  # the function still computes on its GPU
    info = client.stat(inv.outputs["b"])  # type: ignore[attr-defined]
    assert info.locations == ("host",)
    assert client.get(inv.outputs["b"], device="cpu", copy=True)[0] == 1.0  # type: ignore[attr-defined]


def test_torch_handlers_get_cuda_tensors_without_a_host_copy(client: object) -> None:
    torch = pytest.importorskip("torch")
    ref = client.put(cupy.ones(16, dtype=cupy.float32), consumers=1)  # type: ignore[attr-defined]

    @sdk.function(framework="torch")
    def handler(x: object) -> object:
        assert isinstance(x, torch.Tensor) and x.is_cuda
        return x * 3

    inv = sdk.execute(client, handler, inputs={"a": ref}, readers=["b"], device=0)  # type: ignore[arg-type]
    out = client.get(inv.outputs["b"], device=0, copy=True)  # type: ignore[attr-defined]
    assert float(out.sum()) == 48.0


@pytest.mark.slow
def test_faastube_run_on_the_cuda_backend(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "faastube.cli", "run", str(REPO / "examples" / "traffic" / "workflow.yaml"),
         "--requests", "5", "--backend", "cuda", "--json", str(tmp_path / "s.json")],
        capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5/5 ok" in proc.stdout and "cuda backend" in proc.stderr
