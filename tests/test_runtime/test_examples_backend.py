"""The examples' shared backend helpers (faastube_examples.backend), on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
from faastube_examples.backend import ExampleBackend, select_torch, to_host


def _no_models(torch, torchvision, name):
    raise KeyError(name)


def test_the_numpy_backend_is_chosen_on_request(monkeypatch) -> None:
    monkeypatch.setenv("FAASTUBE_EXAMPLE_BACKEND", "numpy")
    assert select_torch() is None
    assert ExampleBackend(seed=0, build_model=_no_models).torch() is None


def test_an_unknown_backend_is_refused_with_its_value(monkeypatch) -> None:
    monkeypatch.setenv("FAASTUBE_EXAMPLE_BACKEND", "tpu")
    with pytest.raises(ValueError, match="'tpu'"):
        select_torch()


@pytest.mark.parametrize("raw", ["0", "1.5", "-1"])
def test_the_scale_must_be_in_the_unit_interval(monkeypatch, raw) -> None:
    monkeypatch.setenv("FAASTUBE_EXAMPLE_SCALE", raw)
    with pytest.raises(ValueError, match="FAASTUBE_EXAMPLE_SCALE"):
        ExampleBackend(seed=0, build_model=_no_models).default_scale()


def test_the_cpu_default_scale_is_small(monkeypatch) -> None:
    monkeypatch.setenv("FAASTUBE_EXAMPLE_BACKEND", "numpy")
    monkeypatch.delenv("FAASTUBE_EXAMPLE_SCALE", raising=False)
    assert ExampleBackend(seed=0, build_model=_no_models).default_scale() == 0.1


def test_stand_in_weights_are_seeded_cached_and_differ_by_name() -> None:
    a, b = ExampleBackend(seed=0, build_model=_no_models), ExampleBackend(seed=0, build_model=_no_models)
    w = a.weights("denoise", (8, 4))
    assert w.dtype == np.float32 and w.shape == (8, 4)
    assert a.weights("denoise", (8, 4)) is w
    assert np.array_equal(b.weights("denoise", (8, 4)), w)
    assert not np.array_equal(a.weights("classify", (8, 4)), w)
    assert not np.array_equal(ExampleBackend(seed=1, build_model=_no_models).weights("denoise", (8, 4)), w)


def test_host_arrays_pass_through_untouched() -> None:
    x = np.arange(5)
    assert to_host(x) is x
