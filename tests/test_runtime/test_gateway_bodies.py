"""The gateway's body parsing and admission, without sockets: what is accepted, and that
nothing but a named ``BadInput`` comes out of hostile bytes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from faastube_runtime import bodies, dag, errors
from faastube_runtime.gateway import Gateway, GatewayConfig
from hypothesis import given, settings
from hypothesis import strategies as st


def header_text(array: np.ndarray, version: tuple[int, int]) -> bytes:
    """The header text numpy writes for ``array`` in format ``version`` (no magic or length)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    raw = buffer.getvalue()
    size_bytes = 2 if version == (1, 0) else 4
    length = int.from_bytes(raw[8:8 + size_bytes], "little")
    return raw[8 + size_bytes:8 + size_bytes + length]


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize("array", [np.zeros((2, 3), dtype=np.float32), np.zeros((), dtype=np.int8),
                                   np.asfortranarray(np.zeros((4, 5), dtype=">c16")),
                                   np.zeros((0, 7), dtype=np.bool_)])
def test_headers_numpy_writes_are_read_back(array: np.ndarray, version: tuple[int, int]) -> None:
    dtype, shape, fortran = bodies.parse_npy_header(header_text(array, version), utf8=version == (3, 0))
    assert (dtype, shape, fortran) == (array.dtype, array.shape, array.ndim > 1 and array.flags.f_contiguous
                                       and not array.flags.c_contiguous)


def npy_header(descr: object = "<f8", shape: object = (3,), fortran: object = False) -> bytes:
    return repr({"descr": descr, "fortran_order": fortran, "shape": shape}).encode()


@pytest.mark.parametrize(("text", "message"), [
    (npy_header(descr="|O"), "dtype '|O' is not accepted: only plain numeric dtypes"),
    (npy_header(descr="<U4"), "dtype '<U4' is not accepted"),
    (npy_header(descr=[("a", "<i4")]), "dtype [('a', '<i4')] is not accepted"),
    (npy_header(descr="(2,)i4"), "is not accepted"),
    (npy_header(descr="<q7"), "dtype '<q7'"),
    (npy_header(shape=(-1,)), "has dimension -1"),
    (npy_header(shape=(2**63,)), "has dimension 9223372036854775808"),
    (npy_header(shape=(1,) * 33), "33 dimensions; at most 32"),
    (npy_header(shape=[3]), "shape must be a tuple of integers"),
    (npy_header(shape=(3.0,)), "shape must be a tuple of integers"),
    (npy_header(fortran=1), "fortran_order must be True or False"),
    (b"{'descr': '<f8', 'shape': (3,)}", "must be a dict of 'descr', 'fortran_order' and 'shape'"),
    (b"[1, 2]", "must be a dict"),
    (b"{'descr': '<f8', 'fortran_order': False, 'shape': (" + b"9" * 5000 + b",)}",
     "a number of 5000 digits"),
    (b"(" * 300 + b")" * 300, "not a literal dict"),
    (b"__import__('os')", "not a literal dict"),
    (b"\xff\xfe", "not a literal dict"),
])
def test_bad_headers_are_refused_naming_the_problem(text: bytes, message: str) -> None:
    with pytest.raises(errors.BadInput, match="^body: ") as caught:
        bodies.parse_npy_header(text, utf8=False)
    assert message in str(caught.value)


def test_a_v3_header_must_be_utf8() -> None:
    with pytest.raises(errors.BadInput, match="not valid UTF-8"):
        bodies.parse_npy_header(b"{'descr': '\xff'}", utf8=True)


def test_the_declared_size_is_checked_against_the_limit_and_the_body_before_allocating() -> None:
    absurd = bodies.NpyHeader(np.dtype("<f8"), (10**12,), False, header_bytes=128)
    with pytest.raises(errors.BodyTooLarge, match=r"declares shape \(1000000000000,\) of <f8 \(8000000000000 "
                                                  r"bytes\), over the limit of 1024 bytes"):
        bodies.check_npy_size(absurd, body_bytes=200, max_body_bytes=1024)
    small = bodies.NpyHeader(np.dtype("<f8"), (10,), False, header_bytes=128)
    with pytest.raises(errors.BadInput, match="the body is truncated: 16 bytes follow the header"):
        bodies.check_npy_size(small, body_bytes=144, max_body_bytes=1024)
    with pytest.raises(errors.BadInput, match="has bytes after the array: 100 bytes follow"):
        bodies.check_npy_size(small, body_bytes=228, max_body_bytes=1024)
    bodies.check_npy_size(small, body_bytes=208, max_body_bytes=1024)
    bodies.check_npy_size(small, body_bytes=None, max_body_bytes=1024)  # chunked: checked while reading


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.builds(npy_header, descr=st.text(max_size=8),
                                           shape=st.tuples(st.integers(-5, 2**70)),
                                           fortran=st.booleans()))
def test_any_header_text_is_read_or_refused_as_bad_input(text: bytes) -> None:
    try:
        dtype, shape, _ = bodies.parse_npy_header(text, utf8=False)
    except errors.BadInput:
        return
    assert dtype.kind in "biufc" and all(0 <= d < 2**63 for d in shape)


def test_a_ref_body_gives_its_ref() -> None:
    assert bodies.parse_ref(b'{"ref": "ft-0123"}') == "ft-0123"


@pytest.mark.parametrize(("body", "message"), [
    (b"", "empty"),
    (b"\xff", "JSON must be UTF-8"),
    (b"{", "not valid JSON"),
    (b'{"ref": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper than 4 levels"),
    (b"[" * 100_000, "nested deeper than 4 levels"),
    (b'{"ref": ' + b"1" * 5000 + b"}", "a number in the JSON has more than 4300 digits"),
    (b'{"ref": 5}', "ref: must be a non-empty string"),
    (b'{"ref": "' + b"a" * 300 + b'"}', "at most 256 characters"),
    (b'{"ref": "x", "more": 1}', 'expected a JSON object {"ref": "<ref>"}'),
    (b"[]", 'expected a JSON object {"ref": "<ref>"}'),
])
def test_bad_ref_bodies_are_refused_naming_the_problem(body: bytes, message: str) -> None:
    with pytest.raises(errors.BadInput) as caught:
        bodies.parse_ref(body)
    assert message in str(caught.value)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"ref": "[[[[[[{{{{{\\\"[[[["})
    assert not bodies._nested_deeper_than(text, 1)
    assert bodies._nested_deeper_than('{"a": [[{"b": "]]]]"}]]}', 3)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.recursive(st.none() | st.integers() | st.text(max_size=5),
                                              lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                                              max_leaves=30).map(lambda v: json.dumps({"ref": v}).encode()))
def test_any_ref_body_is_read_or_refused_as_bad_input(body: bytes) -> None:
    try:
        assert isinstance(bodies.parse_ref(body), str)
    except errors.BadInput:
        pass


def gateway(**config: object) -> Gateway:
    plan = dag.RequestPlan(functions=(), exit="")  # admission needs no plan
    return Gateway("w", plan, invoker=None, store=None, config=GatewayConfig(**config))  # type: ignore[arg-type]


def test_admission_counts_slots_and_input_bytes_and_gives_both_back() -> None:
    gw = gateway(max_in_flight=2, max_input_bytes_in_flight=100,
                 limits=bodies.ReadLimits(max_body_bytes=60))
    first, second = gw.admit(), gw.admit()
    with pytest.raises(errors.Overloaded, match=r"2 requests in flight \(limit 2\)"):
        gw.admit()
    first.reserve(60)
    with pytest.raises(errors.Overloaded, match="inputs of the requests in flight hold 60 bytes; 50 more "
                                                "would pass the limit of 100"):
        second.reserve(50)
    second.reserve(40)
    assert (gw.in_flight, gw.input_bytes_in_flight) == (2, 100)
    first.close()
    first.close()  # once only
    assert (gw.in_flight, gw.input_bytes_in_flight) == (1, 40)
    with second:
        pass
    assert (gw.in_flight, gw.input_bytes_in_flight) == (0, 0)
    with pytest.raises(errors.RuntimeFailure, match="closed admission"):
        second.reserve(1)


def test_a_configuration_that_could_never_serve_its_largest_body_is_refused() -> None:
    with pytest.raises(errors.BadInput, match=r"max_input_bytes_in_flight \(10\) must be at least max_body_bytes"):
        gateway(max_input_bytes_in_flight=10, limits=bodies.ReadLimits(max_body_bytes=20))
    with pytest.raises(errors.BadInput, match="body_idle_timeout_s: must be a positive number"):
        gateway(limits=bodies.ReadLimits(body_idle_timeout_s=0))
