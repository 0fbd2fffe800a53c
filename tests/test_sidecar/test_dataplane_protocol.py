"""The wire protocol: frames, schemas and error codes."""

from __future__ import annotations

import pytest
from faastube import errors, protocol
from faastube.protocol import Kind, Op


def test_a_frame_round_trips_through_encode_and_decode() -> None:
    data = protocol.encode(Kind.REQUEST, 7, {"op": "ping"})
    header = protocol.decode_header(data)
    assert (header.kind, header.request_id, header.body_bytes) == (Kind.REQUEST, 7, len(data) - protocol.HEADER_SIZE)
    assert protocol.decode_body(data[protocol.HEADER_SIZE:]) == {"op": "ping"}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: b"XX" + d[2:], "magic"),
    (lambda d: d[:2] + bytes([99]) + d[3:], "version"),
    (lambda d: d[:3] + bytes([42]) + d[4:], "kind"),
])
def test_untrustworthy_headers_are_refused_with_the_reason(mutate, message) -> None:
    data = mutate(protocol.encode(Kind.REQUEST, 1, {"op": "ping"}))
    with pytest.raises(errors.ProtocolError, match=message):
        protocol.decode_header(data)


def test_an_oversized_body_is_refused_before_it_is_read() -> None:
    header = protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, 1, 1, 10 << 20)
    with pytest.raises(errors.ProtocolError, match="exceeds the limit"):
        protocol.decode_header(header)


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"\xff\xfe", b'"str"'])
def test_bodies_must_be_json_objects(raw: bytes) -> None:
    with pytest.raises(errors.ProtocolError):
        protocol.decode_body(raw)


@pytest.mark.parametrize("body, match", [
    ({"op": "nope"}, "unknown op"),
    ({}, "unknown op"),
    ({"op": "get", "ref": "ft-x"}, "missing field 'location'"),
    ({"op": "get", "ref": "ft-x", "location": "host", "extra": 1}, "unknown field"),
    ({"op": "alloc", "nbytes": -1, "dtype": "<f4", "shape": [1], "location": "host"}, "nbytes"),
    ({"op": "alloc", "nbytes": True, "dtype": "<f4", "shape": [1], "location": "host"}, "nbytes"),
    ({"op": "alloc", "nbytes": 4, "dtype": "<f4", "shape": [1.5], "location": "host"}, "shape"),
    ({"op": "alloc", "nbytes": 4, "dtype": "", "shape": [1], "location": "host"}, "dtype"),
    ({"op": "alloc", "nbytes": 4, "dtype": "<f4", "shape": [1] * 40, "location": "host"}, "shape"),
    ({"op": "seal", "ref": "ft-x", "ttl_s": float("nan")}, "ttl_s"),
    ({"op": "seal", "ref": "ft-x", "ttl_s": float("inf")}, "ttl_s"),
    ({"op": "release", "refs": "ft-x"}, "refs"),
    ({"op": "release", "refs": [1, 2]}, "refs"),
    ({"op": "unmap", "slabs": ["a"]}, "slabs"),
    ({"op": "hello", "version": 1, "devices": [{"ordinal": 0}]}, "devices"),
    ({"op": "get", "ref": "x" * 1000, "location": "host"}, "ref"),
])
def test_each_schema_violation_names_the_field(body, match) -> None:
    with pytest.raises(errors.InvalidRequest, match=match):
        protocol.validate_request(body)


def test_every_op_accepts_its_minimal_valid_body() -> None:
    minimal = {
        Op.HELLO: {"version": 1}, Op.ALLOC: {"nbytes": 4, "dtype": "<f4", "shape": [1], "location": "host"},
        Op.SEAL: {"ref": "r"}, Op.GET: {"ref": "r", "location": "gpu:0"}, Op.RELEASE: {"refs": []},
        Op.FREE: {"ref": "r"}, Op.STAT: {"ref": "r"}, Op.UNMAP: {"slabs": [1]}, Op.PING: {}, Op.STATS: {},
    }
    assert set(minimal) == set(Op)
    for op, body in minimal.items():
        assert protocol.validate_request({"op": op.value, **body}) is op


@pytest.mark.parametrize("exc", [
    errors.InvalidRequest("x"), errors.ProtocolError("x"), errors.PermissionDenied("x"),
    errors.OutOfPoolMemory("x"), errors.ObjectNotReady("x"), errors.Unavailable("x"), errors.InternalError("x"),
])
def test_errors_cross_the_wire_as_the_same_class(exc) -> None:
    body = {"code": int(protocol.code_for(exc)), "message": str(exc)}
    assert type(protocol.exception_for(body)) is type(exc)


def test_ref_not_found_keeps_the_ref() -> None:
    exc = protocol.exception_for({"code": int(protocol.ErrorCode.NOT_FOUND), "ref": "ft-abc", "detail": "expired"})
    assert isinstance(exc, errors.RefNotFound) and exc.ref == "ft-abc" and "expired" in str(exc)


@pytest.mark.parametrize("text, gpu", [("host", None), ("gpu:0", 0), ("gpu:12", 12)])
def test_locations_parse(text, gpu) -> None:
    assert protocol.parse_location(text) == gpu


@pytest.mark.parametrize("text", ["gpu", "gpu:", "gpu:-1", "cpu", "gpu:1x", "gpu:99999"])
def test_bad_locations_are_refused(text) -> None:
    with pytest.raises(errors.InvalidRequest, match="location"):
        protocol.parse_location(text)
