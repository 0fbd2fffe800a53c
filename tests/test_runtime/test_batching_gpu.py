"""Batching and warm-up on a GPU: CuPy and torch handlers against a real sidecar with the CUDA
backend (skipped without a GPU; torch tests also without torch)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

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


@pytest.fixture(scope="module")
def socket_path() -> Iterator[str]:
    with cuda_sidecar(prefix="ftbgpu") as path:
        yield path


@pytest.fixture
def client(socket_path: str) -> Iterator[Any]:
    from faastube import client as ft_client

    c = ft_client.connect(socket_path, workflow="gpubatch", function="f")
    yield c
    c.close()


def put_rows(client: Any, rows: tuple[int, ...], *, width: int = 5) -> list[str]:
    return [client.put(cupy.full((n, width), float(n), dtype=cupy.float32), consumers=1) for n in rows]


def test_a_cupy_handler_gets_the_requests_stacked_on_its_gpu_and_each_gets_its_rows(client: Any) -> None:
    seen: list[tuple[str, tuple[int, ...]]] = []

    @sdk.function(framework="cupy")
    def double(x: Any) -> Any:
        seen.append((type(x).__module__.split(".")[0], tuple(x.shape)))
        return x * 2

    refs = put_rows(client, (1, 3, 2))
    outcomes = sdk.execute_batch(client, double, [sdk.Call({"a": r}) for r in refs], readers=["b"], device=0)
    assert seen == [("cupy", (6, 5))]
    for n, inv in zip((1, 3, 2), outcomes):
        assert isinstance(inv, sdk.Invocation) and inv.batch_size == 3
        assert "host" not in client.stat(inv.outputs["b"]).locations  # stays on the GPU
        out = client.get(inv.outputs["b"], device=0, copy=True)
        assert isinstance(out, cupy.ndarray) and out.shape == (n, 5) and float(out[0, 0]) == 2.0 * n


def test_a_torch_handler_gets_one_cuda_tensor_of_all_rows_and_its_output_is_split(client: Any) -> None:
    torch = pytest.importorskip("torch")
    seen: list[tuple[bool, tuple[int, ...]]] = []

    @sdk.function(framework="torch")
    def model(x: Any) -> Any:
        seen.append((bool(x.is_cuda), tuple(x.shape)))
        return torch.nn.functional.relu(x) + 1

    refs = put_rows(client, (2, 2, 1))
    outcomes = sdk.execute_batch(client, model, [sdk.Call({"a": r}) for r in refs], readers=["b"], device=0)
    assert seen == [(True, (5, 5))]
    for n, inv in zip((2, 2, 1), outcomes):
        assert isinstance(inv, sdk.Invocation)
        out = client.get(inv.outputs["b"], device=0, copy=True)
        assert out.shape == (n, 5) and float(out[0, 0]) == n + 1.0


def test_a_torch_list_handler_gets_zero_copy_cuda_views_of_each_request(client: Any) -> None:
    pytest.importorskip("torch")
    seen: list[list[tuple[int, ...]]] = []

    @sdk.function(framework="torch", batch="list")
    def per_request(xs: list[Any]) -> list[Any]:
        assert all(x.is_cuda for x in xs)
        seen.append([tuple(x.shape) for x in xs])
        return [x * 3 for x in xs]

    refs = [client.put(cupy.ones((n, 2 + n), dtype=cupy.float32), consumers=1) for n in (1, 2)]
    outcomes = sdk.execute_batch(client, per_request, [sdk.Call({"a": r}) for r in refs], readers=["b"],
                                 device=0)
    assert seen == [[(1, 3), (2, 4)]]
    for n, inv in zip((1, 2), outcomes):
        assert isinstance(inv, sdk.Invocation) and inv.batch_size == 2
        assert client.get(inv.outputs["b"], device=0, copy=True).shape == (n, 2 + n)


def test_host_centric_batches_are_copied_to_the_gpu_and_stacked_there(client: Any) -> None:
    seen: list[str] = []

    def double(x: Any) -> Any:
        seen.append(type(x).__module__.split(".")[0])
        return x * 2

    refs = [client.put(np.full((n, 3), float(n), np.float32), consumers=1) for n in (1, 2)]
    outcomes = sdk.execute_batch(client, double, [sdk.Call({"a": r}) for r in refs], readers=["b"], device=0,
                                 passing="host-centric")
    assert seen == ["cupy"]
    for n, inv in zip((1, 2), outcomes):
        assert isinstance(inv, sdk.Invocation)
        assert client.stat(inv.outputs["b"]).locations == ("host",)
        assert client.get(inv.outputs["b"], device="cpu", copy=True).tolist() == [[2.0 * n] * 3] * n


def test_a_request_failing_in_a_gpu_batch_fails_alone(client: Any) -> None:
    @sdk.function(framework="cupy")
    def picky(x: Any) -> Any:
        if bool((x == 3).any()):
            raise ValueError("three")
        return x + 1

    refs = put_rows(client, (1, 3, 2))
    outcomes = sdk.execute_batch(client, picky, [sdk.Call({"a": r}) for r in refs], readers=["b"], device=0)
    assert isinstance(outcomes[1], sdk.HandlerFailedPermanently) and "three" in str(outcomes[1])
    assert all(isinstance(outcomes[i], sdk.Invocation) and outcomes[i].batch_size == 1 for i in (0, 2))


def test_the_warm_up_call_runs_on_zeros_on_the_functions_gpu(client: Any) -> None:
    torch = pytest.importorskip("torch")
    seen: list[tuple[bool, int, tuple[int, ...]]] = []

    @sdk.function(framework="torch")
    def model(x: Any) -> Any:
        seen.append((bool(x.is_cuda), int(x.device.index), tuple(x.shape)))
        return torch.zeros_like(x)

    before = client.stats()["objects"]  # the module's sidecar keeps earlier tests' objects
    sdk.warm_up_call(client, model, inputs={"a": ((3, 4), "float16")}, readers=["b"], device=0, requests=2)
    assert seen == [(True, 0, (6, 4))]
    client.flush()
    assert client.stats()["objects"] == before  # nothing published, nothing left behind


def test_a_gpu_worker_runs_its_hook_on_its_device_with_cupy(socket_path: str) -> None:
    from faastube import client as ft_client
    from faastube_runtime.worker import FunctionWorker
    from faastube_spec.workflow import parse_workflow

    hooked: list[tuple[int | None, str]] = []

    def hook(context: sdk.WarmupContext) -> None:
        hooked.append((context.device, context.framework))

    @sdk.function(warmup=hook)
    def model(x: Any) -> Any:
        assert isinstance(x, cupy.ndarray) and x.device.id == 0
        return x

    wf = parse_workflow({"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "gpubatch"},
                         "spec": {"slo": "10s", "input": {"shape": [2, 2], "dtype": "float32"},
                                  "functions": [{"name": "f", "handler": "m:f", "gpu": True,
                                                 "batch": {"maxSize": 4}}]}})
    with ft_client.connect(socket_path, workflow="gpubatch", function="f") as c:
        worker = FunctionWorker(wf, "f", model, c, device=0)
        try:
            report = asyncio.run(worker.warm_up())
        finally:
            worker.close()
    assert hooked == [(0, "cupy")]
    assert report.call_s is not None and report.batch_call_s is not None
