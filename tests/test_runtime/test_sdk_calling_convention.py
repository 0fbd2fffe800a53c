"""The handler calling convention and one invocation against a store (NumPy, torch CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from faastube import errors, sdk
from runtime_doubles import MemoryStore


def test_decorator_marks_a_handler_and_keeps_it_callable() -> None:
    @sdk.function
    def double(x: np.ndarray) -> np.ndarray:
        return x * 2

    @sdk.function(framework="numpy")
    def triple(x: np.ndarray) -> np.ndarray:
        return x * 3

    assert sdk.options_of(double).framework == "auto"
    assert sdk.options_of(triple).framework == "numpy"
    assert double(np.ones(2)).tolist() == [2.0, 2.0]


def test_an_unknown_framework_is_rejected_with_the_accepted_ones() -> None:
    with pytest.raises(errors.InvalidRequest, match="framework must be one of auto, numpy"):
        sdk.function(framework="jax")  # type: ignore[arg-type]


def test_undecorated_functions_get_default_options() -> None:
    assert sdk.options_of(lambda x: x) == sdk.FunctionOptions()


def test_fan_in_passes_keyword_arguments_named_by_predecessor() -> None:
    seen = {}

    def aggregate(classify_a: np.ndarray, classify_b: np.ndarray) -> np.ndarray:
        seen.update(a=classify_a, b=classify_b)
        return classify_a + classify_b

    out = sdk.call_handler(aggregate, {"classify-a": np.array([1]), "classify-b": np.array([2])})
    assert out.tolist() == [3]
    assert seen["a"].tolist() == [1]


def test_a_single_input_is_passed_positionally() -> None:
    assert sdk.call_handler(lambda x: x + 1, {sdk.REQUEST_INPUT: np.array([1])}).tolist() == [2]


def test_one_array_is_shared_by_every_reader() -> None:
    groups = sdk.route_outputs(np.zeros(3), ["b", "c"])
    assert len(groups) == 1 and groups[0][1] == ("b", "c")


def test_a_dict_routes_each_array_to_its_successor() -> None:
    groups = sdk.route_outputs({"c": np.ones(1), "b": np.zeros(1)}, ["b", "c"])
    assert [(g[0].tolist(), g[1]) for g in groups] == [([0.0], ("b",)), ([1.0], ("c",))]


def test_a_dict_with_wrong_keys_names_the_missing_and_unexpected_ones() -> None:
    with pytest.raises(sdk.HandlerContractError, match=r"missing \['c'\], unexpected \['x'\]"):
        sdk.route_outputs({"b": np.zeros(1), "x": np.zeros(1)}, ["b", "c"])


def test_a_tuple_goes_to_readers_in_order_and_must_match_their_count() -> None:
    groups = sdk.route_outputs((np.zeros(1), np.ones(1)), ["b", "c"])
    assert [g[1] for g in groups] == [("b",), ("c",)]
    with pytest.raises(sdk.HandlerContractError, match="one array per reader"):
        sdk.route_outputs((np.zeros(1),), ["b", "c"])


def test_a_non_array_output_is_a_contract_error() -> None:
    with pytest.raises(sdk.HandlerContractError, match="must be an array"):
        sdk.route_outputs("hello", ["b"])


def test_execute_gets_calls_puts_with_consumers_and_releases_inputs() -> None:
    store = MemoryStore()
    ref_in = store.put(np.arange(4, dtype=np.float32), consumers=1)
    inv = sdk.execute(store, lambda x: x * 10, inputs={sdk.REQUEST_INPUT: ref_in}, readers=["b", "c"])
    assert set(inv.outputs) == {"b", "c"} and inv.outputs["b"] == inv.outputs["c"]
    out_ref = inv.outputs["b"]
    assert store.get(out_ref).tolist() == [0, 10, 20, 30]
    assert ref_in not in store.objects  # its one consumer released it
    assert inv.output_bytes == 16 and inv.refs == (out_ref,)
    assert min(inv.timings.get_s, inv.timings.compute_s, inv.timings.put_s) >= 0
    store.release(out_ref)
    assert out_ref in store.objects  # two readers: still there after one release
    store.release(out_ref)
    assert out_ref not in store.objects


def test_a_failing_handler_keeps_inputs_for_a_retry_and_stores_nothing() -> None:
    store = MemoryStore()
    ref_in = store.put(np.ones(2), consumers=1)

    def broken(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom")

    with pytest.raises(sdk.HandlerFailed, match=r"RuntimeError at .*test_sdk_calling_convention.py:\d+: boom"):
        sdk.execute(store, broken, inputs={"a": ref_in}, readers=["b"])
    assert list(store.objects) == [ref_in]


def test_outputs_are_freed_when_a_later_output_is_invalid() -> None:
    store = MemoryStore()
    ref_in = store.put(np.ones(2), consumers=1)
    with pytest.raises(sdk.HandlerContractError):
        sdk.execute(store, lambda x: (x, "not an array"), inputs={"a": ref_in}, readers=["b", "c"])
    assert list(store.objects) == [ref_in]


def test_a_call_past_its_deadline_drops_its_outputs_and_keeps_its_inputs() -> None:
    store = MemoryStore()
    ref_in = store.put(np.ones(2), consumers=1)
    with pytest.raises(sdk.CallExpired):
        sdk.execute(store, lambda x: x, inputs={"a": ref_in}, readers=["b"], deadline=0.0)
    assert list(store.objects) == [ref_in]


def test_a_sink_that_is_not_the_exit_stores_nothing() -> None:
    store = MemoryStore()
    ref_in = store.put(np.ones(2), consumers=1)
    inv = sdk.execute(store, lambda x: x, inputs={"a": ref_in}, readers=[])
    assert inv.outputs == {} and store.objects == {}


def test_numpy_framework_hands_host_arrays() -> None:
    store = MemoryStore()
    ref_in = store.put(np.arange(3), consumers=1)
    seen = []

    @sdk.function(framework="numpy")
    def f(x: np.ndarray) -> np.ndarray:
        seen.append(type(x))
        return x

    sdk.execute(store, f, inputs={"a": ref_in}, readers=["b"])
    assert seen == [np.ndarray]


def test_torch_handlers_get_tensors_and_may_return_them() -> None:
    torch = pytest.importorskip("torch")
    store = MemoryStore()
    ref_in = store.put(np.arange(3, dtype=np.float32), consumers=1)

    @sdk.function(framework="torch")
    def f(x: torch.Tensor) -> torch.Tensor:
        assert isinstance(x, torch.Tensor)
        return x * 2

    inv = sdk.execute(store, f, inputs={"a": ref_in}, readers=["b"])
    assert store.get(inv.outputs["b"]).tolist() == [0.0, 2.0, 4.0]


def test_unknown_passing_mode_is_rejected() -> None:
    with pytest.raises(errors.InvalidRequest, match="passing must be one of tube, host-centric"):
        sdk.execute(MemoryStore(), lambda x: x, inputs={}, readers=[], passing="carrier-pigeon")  # type: ignore[arg-type]


def test_a_retry_reuses_the_views_a_failed_call_kept_open() -> None:
    store = MemoryStore()
    ref_in = store.put(np.arange(3), consumers=1)
    held: dict[str, object] = {}
    attempts = iter([RuntimeError("first"), None])

    def flaky(x: np.ndarray) -> np.ndarray:
        error = next(attempts)
        if error is not None:
            raise error
        return x + 1

    with pytest.raises(sdk.HandlerFailed):
        sdk.execute(store, flaky, inputs={"a": ref_in}, readers=["b"], held=held)
    assert list(held) == [ref_in]
    inv = sdk.execute(store, flaky, inputs={"a": ref_in}, readers=["b"], held=held)
    assert held == {} and store.get(inv.outputs["b"]).tolist() == [1, 2, 3]
    assert ref_in not in store.objects
