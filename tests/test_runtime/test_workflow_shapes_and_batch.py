"""Workflow fields for warm-up and batching: edge shape/dtype, spec.input, function batch policy."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from faastube_spec.workflow import (
    MAX_BATCH_SIZE,
    BatchSpec,
    EdgeSpec,
    WorkflowInvalid,
    dump_workflow,
    parse_workflow,
)

BASE: dict[str, Any] = {
    "apiVersion": "faastube.io/v1alpha1",
    "kind": "Workflow",
    "metadata": {"name": "w"},
    "spec": {
        "slo": "800ms",
        "functions": [
            {"name": "decode", "handler": "functions:decode"},
            {"name": "detect", "handler": "functions:detect", "slo": "300ms", "computeTime": "40ms"},
            {"name": "post", "handler": "functions:post"},
        ],
        "edges": [
            {"from": "decode", "to": "detect", "size": "130MB"},
            {"from": "detect", "to": "post", "size": 4096},
        ],
    },
}


def doc() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def errors_of(document: Any) -> list[str]:
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(document)
    return [str(e) for e in info.value.errors]


def edge(d: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return d["spec"]["edges"][i]  # type: ignore[no-any-return]


def fn(d: dict[str, Any], i: int = 1) -> dict[str, Any]:
    return d["spec"]["functions"][i]  # type: ignore[no-any-return]


# --- edges: shape and dtype ----------------------------------------------------------------------

def test_an_edge_with_shape_and_dtype_keeps_them_and_a_size_that_agrees() -> None:
    d = doc()
    edge(d).update(size=130_636_800, shape=[21, 1080, 1920, 3], dtype="uint8")
    w = parse_workflow(d)
    assert w.edges[0] == EdgeSpec("decode", "detect", 130_636_800, shape=(21, 1080, 1920, 3), dtype="uint8")


def test_a_shape_and_dtype_stand_in_for_the_size() -> None:
    d = doc()
    del edge(d)["size"]
    edge(d).update(shape=[2, 3], dtype="float64")
    assert parse_workflow(d).edges[0].size_bytes == 48


def test_an_edge_without_shape_has_none_and_still_needs_its_size() -> None:
    w = parse_workflow(doc())
    assert (w.edges[1].shape, w.edges[1].dtype) == (None, None)
    d = doc()
    del edge(d)["size"]
    assert errors_of(d) == ["spec.edges[0].size: required: the bytes passed on this edge, e.g. '130MB' "
                            "(or give its shape and dtype)"]


@pytest.mark.parametrize("size, shape, dtype", [(99, [5, 5], "float32"), ("1KB", [10, 10], "float64"),
                                                (8, [2], "complex64")])
def test_sizes_that_disagree_with_their_shape_name_both(size: Any, shape: list[int], dtype: str) -> None:
    d = doc()
    edge(d).update(size=size, shape=shape, dtype=dtype)
    (err,) = errors_of(d)
    assert err.startswith("spec.edges[0].size: ") and "but shape [" in err and "fix one, or leave size out" in err


@pytest.mark.parametrize("shape, message", [
    ("21x3", "spec.edges[0].shape: must be a list of dimensions like [21, 3, 736, 736], got str"),
    (21, "spec.edges[0].shape: must be a list of dimensions like [21, 3, 736, 736], got int"),
    ([2, 0], "spec.edges[0].shape[1]: must be at least 1, got 0"),
    ([2, -3], "spec.edges[0].shape[1]: must be at least 1, got -3"),
    ([2, "3"], "spec.edges[0].shape[1]: must be an integer, got str"),
    ([True, 3], "spec.edges[0].shape[0]: must be an integer, got boolean"),
    ([2.5], "spec.edges[0].shape[0]: must be an integer, got float"),
    ([1] * 33, "spec.edges[0].shape: has 33 dimensions; at most 32"),
    ([2**62, 2**62], "spec.edges[0].shape: [4611686018427387904, 4611686018427387904] of uint8 is"),
])
def test_bad_shapes_are_reported_with_their_path(shape: Any, message: str) -> None:
    d = doc()
    edge(d).update(shape=shape, dtype="uint8")
    del edge(d)["size"]
    errs = errors_of(d)
    assert any(e.startswith(message) for e in errs), errs


@pytest.mark.parametrize("dtype, message", [
    ("float", "spec.edges[0].dtype: unknown dtype 'float'; use one of bool, int8"),
    ("bfloat16", "spec.edges[0].dtype: unknown dtype 'bfloat16'"),
    ("object", "spec.edges[0].dtype: unknown dtype 'object'"),
    (4, "spec.edges[0].dtype: must be a string, got int"),
    ("", "spec.edges[0].dtype: must not be empty"),
])
def test_bad_dtypes_are_reported_with_their_path(dtype: Any, message: str) -> None:
    d = doc()
    edge(d).update(shape=[2], dtype=dtype)
    errs = errors_of(d)
    assert any(e.startswith(message) for e in errs), errs


def test_an_unknown_dtype_suggests_the_closest() -> None:
    d = doc()
    edge(d).update(shape=[2], dtype="flaot32")
    (err,) = errors_of(d)
    assert err.endswith("(did you mean 'float32'?)")


def test_shape_and_dtype_come_together() -> None:
    d = doc()
    edge(d, 0)["shape"] = [2, 3]
    edge(d, 1)["dtype"] = "float32"
    assert errors_of(d) == ["spec.edges[0].dtype: required with shape: the element type, e.g. 'float32'",
                            "spec.edges[1].shape: required with dtype: the dimensions, e.g. [21, 3, 736, 736]"]


# --- spec.input ----------------------------------------------------------------------------------

def test_the_request_input_shape_and_dtype_are_kept() -> None:
    d = doc()
    d["spec"]["input"] = {"shape": [21, 270, 480, 3], "dtype": "uint8"}
    w = parse_workflow(d)
    assert (w.input_shape, w.input_dtype) == ((21, 270, 480, 3), "uint8")
    assert parse_workflow(doc()).input_shape is None


@pytest.mark.parametrize("value, messages", [
    ([1, 2], ["spec.input: must be a mapping like {shape: [21, 270, 480, 3], dtype: uint8}, got list"]),
    ({"shape": [1]}, ["spec.input.dtype: required"]),
    ({"dtype": "uint8"}, ["spec.input.shape: required"]),
    ({"shape": [0], "dtype": "uint8"}, ["spec.input.shape[0]: must be at least 1, got 0"]),
    ({"shape": [1], "dtype": "u8"}, ["spec.input.dtype: unknown dtype 'u8'"]),
    ({"shape": [1], "dtype": "uint8", "size": 1}, ["spec.input.size: unknown field"]),
])
def test_a_bad_request_input_is_reported(value: Any, messages: list[str]) -> None:
    d = doc()
    d["spec"]["input"] = value
    errs = errors_of(d)
    assert len(errs) == len(messages) and all(e.startswith(m) for e, m in zip(errs, messages)), errs


# --- function batch policies ---------------------------------------------------------------------

def test_a_batch_policy_is_kept_with_its_delay() -> None:
    d = doc()
    fn(d)["batch"] = {"maxSize": 8, "maxDelay": "5ms"}
    assert parse_workflow(d).function("detect").batch == BatchSpec(max_size=8, max_delay_s=0.005)
    assert parse_workflow(doc()).function("detect").batch is None


def test_a_zero_delay_never_waits_for_more_calls() -> None:
    d = doc()
    fn(d)["batch"] = {"maxSize": 4, "maxDelay": "0s"}
    assert parse_workflow(d).function("detect").batch == BatchSpec(max_size=4, max_delay_s=0.0)


def test_without_max_delay_a_batch_never_waits() -> None:
    d = doc()
    fn(d)["batch"] = {"maxSize": 8}
    assert parse_workflow(d).function("detect").batch == BatchSpec(max_size=8, max_delay_s=0.0)


def test_an_auto_delay_is_a_tenth_of_what_the_functions_slo_leaves_after_compute() -> None:
    d = doc()
    fn(d)["batch"] = {"maxSize": 8, "maxDelay": "auto"}  # slo 300ms, computeTime 40ms
    assert parse_workflow(d).function("detect").batch == BatchSpec(max_size=8, max_delay_s=pytest.approx(0.026))


def test_without_its_own_slo_an_auto_delay_comes_from_the_workflows() -> None:
    d = doc()
    fn(d, 2)["batch"] = {"maxSize": 2, "maxDelay": "auto"}  # no slo, no computeTime: spec.slo 800ms
    assert parse_workflow(d).function("post").batch == BatchSpec(max_size=2, max_delay_s=pytest.approx(0.08))
    fn(d, 2)["computeTime"] = "200ms"
    assert parse_workflow(d).function("post").batch == BatchSpec(max_size=2, max_delay_s=pytest.approx(0.06))
    fn(d, 2)["computeTime"] = "799999us"  # what is left is 1us: a tenth of it rounds to 0 (never wait)
    assert parse_workflow(d).function("post").batch == BatchSpec(max_size=2, max_delay_s=0.0)


@pytest.mark.parametrize("batch, messages", [
    (8, ["spec.functions[1].batch: must be a mapping like {maxSize: 8, maxDelay: 5ms}, got int"]),
    ({}, ["spec.functions[1].batch.maxSize: required: the most queued requests one handler call gathers"]),
    ({"maxSize": 0}, ["spec.functions[1].batch.maxSize: must be at least 1, got 0"]),
    ({"maxSize": MAX_BATCH_SIZE + 1}, ["spec.functions[1].batch.maxSize: must be at most 1,024, got 1,025"]),
    ({"maxSize": "8"}, ["spec.functions[1].batch.maxSize: must be an integer, got str"]),
    ({"maxSize": True}, ["spec.functions[1].batch.maxSize: must be an integer, got boolean"]),
    ({"maxSize": 8, "maxDelay": "5"}, ["spec.functions[1].batch.maxDelay: duration '5' has no unit"]),
    ({"maxSize": 8, "maxDelay": "-5ms"}, ["spec.functions[1].batch.maxDelay: duration must not be negative"]),
    ({"maxSize": 8, "maxDelay": 5}, ["spec.functions[1].batch.maxDelay: duration must be a string with a unit"]),
    ({"maxSize": 8, "maxDelay": "260ms"},
     ["spec.functions[1].batch.maxDelay: 260ms of waiting does not fit in what the function's slo 300ms "
      "leaves after its computeTime 40ms (260ms)"]),
    ({"maxSize": 8, "maxDeley": "5ms"}, ["spec.functions[1].batch.maxDeley: unknown field (did you mean 'maxDelay'?)"]),
])
def test_bad_batch_policies_are_reported_with_their_path(batch: Any, messages: list[str]) -> None:
    d = doc()
    fn(d)["batch"] = batch
    errs = errors_of(d)
    assert len(errs) == len(messages) and all(e.startswith(m) for e, m in zip(errs, messages)), errs


def test_a_delay_must_fit_in_the_workflows_slo_when_the_function_has_none() -> None:
    d = doc()
    fn(d, 2)["batch"] = {"maxSize": 2, "maxDelay": "800ms"}
    assert errors_of(d) == ["spec.functions[2].batch.maxDelay: 800ms of waiting does not fit in what the "
                            "workflow's spec.slo 800ms leaves (800ms)"]


def test_every_new_field_round_trips_through_dump() -> None:
    d = doc()
    d["spec"]["input"] = {"shape": [4, 8], "dtype": "int16"}
    edge(d, 0).update(shape=[21, 3, 736, 736], dtype="float32")
    del edge(d, 0)["size"]
    fn(d, 1)["batch"] = {"maxSize": 8, "maxDelay": "auto"}
    fn(d, 2)["batch"] = {"maxSize": 3, "maxDelay": "1.5ms"}
    w = parse_workflow(d)
    assert parse_workflow(dump_workflow(w)) == w
    dumped = dump_workflow(w)
    assert dumped["spec"]["edges"][0]["shape"] == [21, 3, 736, 736]
    assert dumped["spec"]["functions"][1]["batch"] == {"maxSize": 8, "maxDelay": "26ms"}
