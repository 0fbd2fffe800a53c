"""The examples' torch path on a CUDA GPU: same shapes as the NumPy stand-ins, at full scale."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from faastube import sdk
from faastube_spec.workflow import Workflow, load_workflow

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("cupy")
if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

pytestmark = pytest.mark.gpu
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> tuple[Workflow, ModuleType]:
    workflow = load_workflow(EXAMPLES / name / "workflow.yaml")
    spec = importlib.util.spec_from_file_location(f"faastube_gpu_example_{name}", EXAMPLES / name / "functions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return workflow, module


@pytest.mark.parametrize("name", ["traffic", "driving", "video", "image"])
def test_torch_handlers_pass_the_yaml_sizes_at_full_scale(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAASTUBE_EXAMPLE_BACKEND", "torch")
    workflow, module = load_example(name)
    request = module.make_input(scale=1.0)
    expected = module.edge_shapes(request.shape)
    routed: dict[tuple[str, str], object] = {}
    for fname in workflow.topological_order():
        spec = workflow.function(fname)
        handler = getattr(module, spec.handler_function)
        preds = workflow.predecessors(fname)
        inputs = {sdk.REQUEST_INPUT: request} if not preds else {p: routed[p, fname] for p in preds}
        readers = list(workflow.successors(fname)) or [sdk.GATEWAY_READER]
        for array, group in sdk.route_outputs(sdk.call_handler(handler, inputs), readers):
            # GPU functions return device arrays (CuPy via DLPack), CPU functions NumPy.
            assert sdk.is_gpu_array(array) == spec.gpu, fname
            assert (tuple(array.shape), str(array.dtype)) == expected[fname], fname
            for reader in group:
                routed[fname, reader] = array
    for edge in workflow.edges:
        assert int(routed[edge.source, edge.target].nbytes) == edge.size_bytes  # type: ignore[attr-defined]
    assert np.isfinite(float(torch.as_tensor(routed[workflow.exit, sdk.GATEWAY_READER]).float().sum()))
