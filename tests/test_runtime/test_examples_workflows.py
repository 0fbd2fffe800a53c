"""The example workflows: their YAML validates, their handlers produce the shapes the YAML promises."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from faastube import sdk
from faastube_spec.workflow import Workflow, load_workflow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NAMES = ("traffic", "driving", "video", "image")


def load_example(name: str) -> tuple[Workflow, ModuleType]:
    workflow = load_workflow(EXAMPLES / name / "workflow.yaml")
    spec = importlib.util.spec_from_file_location(f"faastube_example_{name}", EXAMPLES / name / "functions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return workflow, module


@pytest.fixture(autouse=True)
def numpy_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAASTUBE_EXAMPLE_BACKEND", "numpy")
    monkeypatch.delenv("FAASTUBE_EXAMPLE_SCALE", raising=False)


def run_workflow(workflow: Workflow, module: ModuleType, request: np.ndarray) -> dict[str, object]:
    """Call the handlers in topological order with the SDK's calling convention, in process."""
    outputs: dict[str, object] = {}
    routed: dict[tuple[str, str], object] = {}
    for name in workflow.topological_order():
        handler = getattr(module, workflow.function(name).handler_function)
        preds = workflow.predecessors(name)
        inputs = {sdk.REQUEST_INPUT: request} if not preds else {p: routed[p, name] for p in preds}
        result = sdk.call_handler(handler, inputs)
        readers = list(workflow.successors(name)) or [sdk.GATEWAY_READER]
        for array, group in sdk.route_outputs(result, readers):
            outputs[name] = array
            for reader in group:
                routed[name, reader] = array
    return outputs


def test_the_paper_traffic_sizes_are_kept_within_ten_percent() -> None:
    workflow, _ = load_example("traffic")
    sizes_mb = [e.size_bytes / 1e6 for e in workflow.edges]
    for size, paper in zip(sizes_mb, (130, 150, 180, 140), strict=True):
        assert size == pytest.approx(paper, rel=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_every_example_validates_and_names_existing_handlers(name: str) -> None:
    workflow, module = load_example(name)
    assert workflow.name == name
    for function in workflow.functions:
        assert function.handler_module == "functions"
        assert callable(getattr(module, function.handler_function))
        assert sdk.options_of(getattr(module, function.handler_function)).framework == "auto"
    assert any(f.gpu for f in workflow.functions)


@pytest.mark.parametrize("name", NAMES)
def test_edge_sizes_shapes_and_dtypes_in_the_yaml_are_the_full_scale_outputs(name: str) -> None:
    workflow, module = load_example(name)
    shapes = module.edge_shapes(module.input_shape(1.0))
    assert set(shapes) == {f.name for f in workflow.functions}
    for edge in workflow.edges:
        shape, dtype = shapes[edge.source]
        assert int(np.prod(shape)) * np.dtype(dtype).itemsize == edge.size_bytes, edge
        assert (edge.shape, edge.dtype) == (tuple(shape), dtype), edge  # what warm-up calls are built from
    request = module.make_input(scale=1.0)
    assert (workflow.input_shape, workflow.input_dtype) == (request.shape, str(request.dtype))


@pytest.mark.parametrize("name", NAMES)
def test_handlers_run_on_cpu_with_the_promised_shapes(name: str) -> None:
    workflow, module = load_example(name)
    request = module.make_input(scale=0.1, seed=0)
    assert request.shape == module.input_shape(0.1)
    expected = module.edge_shapes(request.shape)
    outputs = run_workflow(workflow, module, request)
    for function, array in outputs.items():
        assert isinstance(array, np.ndarray)
        assert (array.shape, str(array.dtype)) == expected[function], function
        assert np.all(np.isfinite(array)), function


@pytest.mark.parametrize("name", NAMES)
def test_handlers_are_deterministic(name: str) -> None:
    workflow, module = load_example(name)
    request = module.make_input(scale=0.05, seed=3)
    first = run_workflow(workflow, module, request)[workflow.exit]
    second = run_workflow(workflow, module, module.make_input(scale=0.05, seed=3))[workflow.exit]
    np.testing.assert_array_equal(first, second)


def test_the_scale_knob_sets_the_request_size(monkeypatch: pytest.MonkeyPatch) -> None:
    _, module = load_example("traffic")
    monkeypatch.setenv("FAASTUBE_EXAMPLE_SCALE", "0.5")
    assert module.make_input().shape == module.input_shape(0.5) == (21, 135, 240, 3)
    monkeypatch.setenv("FAASTUBE_EXAMPLE_SCALE", "3")
    with pytest.raises(ValueError, match="FAASTUBE_EXAMPLE_SCALE must be in"):
        module.make_input()
    monkeypatch.delenv("FAASTUBE_EXAMPLE_SCALE")
    assert module.make_input().shape == module.input_shape(0.1)  # CPU default


def test_video_split_fans_out_one_chunk_per_face_function() -> None:
    workflow, module = load_example("video")
    chunks = module.split(module.make_input(scale=0.05))
    assert set(chunks) == set(workflow.successors("split"))
    with pytest.raises(TypeError, match="recognition expects the keyword arguments"):
        module.recognition(face_0=np.zeros((1, 3, 8, 8), np.float32))


def test_image_aggregate_returns_probabilities() -> None:
    workflow, module = load_example("image")
    out = run_workflow(workflow, module, module.make_input(scale=0.1))["aggregate"]
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
