"""The wire protocol: frames, schemas and error codes."""

from __future__ import annotations

import pytest
from faastube import errors, protocol
from faastube.locations import Location
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


REF = "ft-" + "a" * 32


@pytest.mark.parametrize("body, match", [
    ({"op": "nope"}, "unknown op"),
    ({}, "unknown op"),
    ({"op": "get", "ref": REF}, "missing field 'location'"),
    ({"op": "get", "ref": REF, "location": "host", "extra": 1}, "unknown field"),
    ({"op": "get", "ref": REF, "location": "gpu:x"}, "location.*gpu:N"),
    ({"op": "get", "ref": "x" * 1000, "location": "host"}, "ref"),
    ({"op": "arena", "nbytes": -1, "location": "host"}, "nbytes"),
    ({"op": "arena", "nbytes": True, "location": "host"}, "nbytes"),
    ({"op": "publish", "ref": REF, "slab": 1, "offset": 0, "nbytes": 4, "dtype": "<f4", "shape": [1.5]}, "shape"),
    ({"op": "publish", "ref": REF, "slab": 1, "offset": 0, "nbytes": 4, "dtype": "", "shape": [1]}, "dtype"),
    ({"op": "publish", "ref": REF, "slab": 1, "offset": 0, "nbytes": 4, "dtype": "<f4", "shape": [1] * 40}, "shape"),
    ({"op": "publish", "ref": REF, "slab": 1, "offset": 0, "nbytes": 4, "dtype": "<f4", "shape": [1],
      "ttl_s": float("nan")}, "ttl_s"),
    ({"op": "publish", "ref": REF, "slab": 1, "offset": 0, "nbytes": 4, "dtype": "<f4", "shape": [1],
      "ttl_s": float("inf")}, "ttl_s"),
    ({"op": "publish", "ref": REF, "slab": 1, "offset": 0, "nbytes": 4, "dtype": "<f4", "shape": [1],
      "fence": [[1, 4], [2, 2]]}, "increasing order"),
    ({"op": "publish", "ref": REF, "slab": 1, "offset": 0, "nbytes": 4, "dtype": "<f4", "shape": [1],
      "fence": [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]]}, "1 to 4"),
    ({"op": "publish", "ref": REF, "slab": 1, "offset": 0, "nbytes": 4, "dtype": "<f4", "shape": [1],
      "fence": [[1]]}, "pairs"),
    ({"op": "publish", "ref": "ft-UPPERCASE", "slab": 1, "offset": 0, "nbytes": 4, "dtype": "<f4",
      "shape": [1]}, "ref"),
    ({"op": "release", "refs": REF}, "refs"),
    ({"op": "release", "refs": [1, 2]}, "refs"),
    ({"op": "unmap", "slabs": ["a"]}, "slabs"),
    ({"op": "hint", "hints": [{"ref": REF}]}, "hints"),
    ({"op": "hint", "hints": [{"ref": REF, "position": -1}]}, "hints"),
    ({"op": "hint", "hints": [{"ref": REF, "position": 1, "due_in_s": float("inf")}]}, "hints"),
    ({"op": "hint", "hints": [{"ref": REF, "position": 1, "reader": "x"}]}, "hints"),
    ({"op": "hint", "hints": [{"ref": "ft-x", "position": 1}]}, "hints"),
    ({"op": "hello", "version": 1, "devices": [{"ordinal": 0}]}, "devices"),
])
def test_each_schema_violation_names_the_field(body, match) -> None:
    with pytest.raises(errors.InvalidRequest, match=match):
        protocol.parse_request(body)


def test_every_op_accepts_its_minimal_valid_body() -> None:
    minimal = {
        Op.HELLO: {"version": 2}, Op.ARENA: {"nbytes": 4, "location": "host"},
        Op.PUBLISH: {"ref": REF, "slab": 1, "offset": 0, "nbytes": 4, "dtype": "<f4", "shape": [1]},
        Op.GET: {"ref": REF, "location": "gpu:0"}, Op.RELEASE: {"refs": []},
        Op.FREE: {"ref": REF}, Op.STAT: {"ref": REF}, Op.UNMAP: {"slabs": [1]}, Op.PING: {}, Op.STATS: {},
        Op.BYE: {}, Op.HINT: {"hints": []},
    }
    assert set(minimal) == set(Op)
    for op, body in minimal.items():
        assert protocol.parse_request({"op": op.value, **body})[0] is op


def test_locations_are_parsed_once_at_the_edge() -> None:
    _, fields = protocol.parse_request({"op": "get", "ref": REF, "location": "gpu:3"})
    assert fields["location"] == Location(3) and str(fields["location"]) == "gpu:3"


def test_new_refs_are_well_formed_and_distinct() -> None:
    refs = {protocol.new_ref() for _ in range(1000)}
    assert len(refs) == 1000
    for ref in refs:
        assert protocol.check_ref(ref) == ref


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
    location = Location.parse(text)
    assert location.gpu == gpu and str(location) == text


@pytest.mark.parametrize("text", ["gpu", "gpu:", "gpu:-1", "cpu", "gpu:1x", "gpu:99999", 3, None])
def test_bad_locations_are_refused(text) -> None:
    with pytest.raises(errors.InvalidRequest, match="location"):
        Location.parse(text)
