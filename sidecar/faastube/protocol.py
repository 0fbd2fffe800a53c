"""The wire protocol between function processes and the node's sidecar.

A frame is a fixed 12-byte header followed by a UTF-8 JSON object:

    magic "FT" | version u8 | kind u8 | request id u32 | body length u32 | body

Data never travels in frames: bodies carry metadata, and memory handles travel as
file descriptors (SCM_RIGHTS) beside the reply that names them. JSON keeps the light
client dependency-free; every body is validated against the schema of its op before
anything acts on it, so a malformed message is an error reply, never a crash.

A *notify* frame is a request that wants no reply: the sidecar answers it only when
it fails (an error frame with its id, in order with every other reply). Publishing an
object and ending reads are notifies, so a put costs no round trip at all.

This module is pure (no sockets, no asyncio): both the client and the sidecar's
framing layer use it.
"""

from __future__ import annotations

import base64
import enum
import json
import re
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from faastube import errors
from faastube.locations import Location

MAGIC = b"FT"
VERSION = 2
HEADER = struct.Struct("<2sBBII")
HEADER_SIZE = HEADER.size
# Bodies are metadata only; 1 MiB is orders of magnitude above any legal message.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# At most this many descriptors ride on one frame (a reply introduces a few slabs at most).
MAX_FDS_PER_FRAME = 16


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3
    NOTIFY = 4          # a request answered only if it fails


class ErrorCode(enum.IntEnum):
    """Wire codes for errors; each maps to one client exception class."""

    INVALID_REQUEST = 1
    PROTOCOL = 2
    NOT_FOUND = 3
    PERMISSION_DENIED = 4
    OUT_OF_MEMORY = 5
    NOT_READY = 6
    UNAVAILABLE = 7
    INTERNAL = 8


_ERROR_CLASSES: dict[ErrorCode, type[errors.FaastubeError]] = {
    ErrorCode.INVALID_REQUEST: errors.InvalidRequest,
    ErrorCode.PROTOCOL: errors.ProtocolError,
    ErrorCode.PERMISSION_DENIED: errors.PermissionDenied,
    ErrorCode.OUT_OF_MEMORY: errors.OutOfPoolMemory,
    ErrorCode.NOT_READY: errors.ObjectNotReady,
    ErrorCode.UNAVAILABLE: errors.Unavailable,
    ErrorCode.INTERNAL: errors.InternalError,
}


def code_for(exc: BaseException) -> ErrorCode:
    """The wire code for an exception raised while serving a request."""
    if isinstance(exc, errors.RefNotFound):
        return ErrorCode.NOT_FOUND
    for code, cls in sorted(_ERROR_CLASSES.items(), key=lambda kv: -len(kv[1].__mro__)):
        if isinstance(exc, cls):
            return code
    return ErrorCode.INTERNAL


def exception_for(body: Mapping[str, Any]) -> errors.FaastubeError:
    """Rebuild the client-side exception from an error reply body."""
    try:
        code = ErrorCode(int(body.get("code", ErrorCode.INTERNAL)))
    except (TypeError, ValueError):
        code = ErrorCode.INTERNAL
    message = str(body.get("message", "unknown error"))
    if code is ErrorCode.NOT_FOUND:
        return errors.RefNotFound(str(body.get("ref", "?")), str(body.get("detail", "")))
    return _ERROR_CLASSES[code](message)


@dataclass(frozen=True, slots=True)
class Header:
    kind: Kind
    request_id: int
    body_bytes: int


def encode(kind: Kind, request_id: int, body: Mapping[str, Any]) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, VERSION, int(kind), request_id & 0xFFFFFFFF, len(payload)) + payload


def decode_header(data: bytes | bytearray | memoryview, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Header:
    magic, version, kind, request_id, body_bytes = HEADER.unpack(data[:HEADER_SIZE])
    if magic != MAGIC:
        raise errors.ProtocolError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise errors.ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    try:
        frame_kind = Kind(kind)
    except ValueError:
        raise errors.ProtocolError(f"unknown frame kind {kind}") from None
    if body_bytes > max_body_bytes:
        raise errors.ProtocolError(f"frame body of {body_bytes} bytes exceeds the limit of {max_body_bytes}")
    return Header(frame_kind, request_id, body_bytes)


def decode_body(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        body = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise errors.ProtocolError(f"frame body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise errors.ProtocolError(f"frame body must be a JSON object, got {type(body).__name__}")
    return body


# --- refs ----------------------------------------------------------------------------------------

REF_PREFIX = "ft-"
_REF_CHARS = 26          # 130 random bits in base32, lower case
_REF_PATTERN = re.compile(rf"{REF_PREFIX}[a-z2-7]{{{_REF_CHARS}}}")


def new_ref() -> str:
    """A fresh ref. Clients name the objects they publish; the sidecar refuses duplicates."""
    return REF_PREFIX + base64.b32encode(secrets.token_bytes(17)).decode()[:_REF_CHARS].lower()


def check_ref(ref: object) -> str:
    if not isinstance(ref, str) or _REF_PATTERN.fullmatch(ref) is None:
        raise errors.InvalidRequest(
            f"malformed ref {ref!r:.60}: expected '{REF_PREFIX}' and {_REF_CHARS} base32 characters")
    return ref


# --- request schemas ---------------------------------------------------------------------------

class Op(str, enum.Enum):
    HELLO = "hello"
    ARENA = "arena"
    PUBLISH = "publish"
    GET = "get"
    RELEASE = "release"
    FREE = "free"
    STAT = "stat"
    UNMAP = "unmap"
    PING = "ping"
    STATS = "stats"
    BYE = "bye"


# Field type tags: "str", "int" (non-negative), "num" (non-negative), "bool", "shape", "refs",
# "ints", "devices", "location" (parsed to a Location), "ref", "fence".
_SCHEMAS: dict[Op, dict[str, tuple[str, bool]]] = {
    Op.HELLO: {"version": ("int", True), "namespace": ("str", False), "workflow": ("str", False),
               "function": ("str", False), "devices": ("devices", False)},
    # Writable memory for this client to sub-allocate its objects in: at least nbytes at location.
    Op.ARENA: {"location": ("location", True), "nbytes": ("int", True)},
    # An object written into this client's arena; fence: [[event id, end offset], ...] recorded after
    # the bytes up to each end were written (GPU). copied: the put's client-side copy, for metrics.
    Op.PUBLISH: {"ref": ("ref", True), "slab": ("int", True), "offset": ("int", True),
                 "nbytes": ("int", True), "dtype": ("str", True), "shape": ("shape", True),
                 "consumers": ("int", False), "ttl_s": ("num", False), "fence": ("fence", False),
                 "copied": ("str", False)},
    Op.GET: {"ref": ("ref", True), "location": ("location", True)},
    # consumed=false ends the reads without counting them (a failed call that will be retried).
    Op.RELEASE: {"refs": ("refs", True), "consumed": ("bool", False)},
    Op.FREE: {"ref": ("ref", True)},
    Op.STAT: {"ref": ("ref", True)},
    # Slabs this client no longer maps; its arenas among them are given back.
    Op.UNMAP: {"slabs": ("ints", True)},
    Op.PING: {},
    Op.STATS: {},
    # A clean goodbye: every read still open ends now and counts (a crash, no bye, counts none).
    Op.BYE: {},
}

MAX_LIST_ITEMS = 4096
MAX_STRING = 256
MAX_DIMS = 32
MAX_FENCES = 4


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _check_field(op: Op, name: str, tag: str, value: Any) -> Any:
    """The field's value as the services use it (a Location for a location), or InvalidRequest."""
    def bad(expected: str) -> errors.InvalidRequest:
        return errors.InvalidRequest(f"{op.value}: field {name!r} must be {expected}, got {value!r:.80}")

    if tag == "int":
        if not _is_count(value):
            raise bad("a non-negative integer")
    elif tag == "ref":
        if not isinstance(value, str) or _REF_PATTERN.fullmatch(value) is None:
            raise bad(f"a ref ('{REF_PREFIX}' and {_REF_CHARS} base32 characters)")
    elif tag == "location":
        return Location.parse(value)
    elif tag == "str":
        if not isinstance(value, str) or not value or len(value) > MAX_STRING:
            raise bad(f"a non-empty string of at most {MAX_STRING} characters")
    elif tag == "num":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or value == float("inf"):
            raise bad("a finite non-negative number")
    elif tag == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif tag == "shape":
        if type(value) is not list or len(value) > MAX_DIMS or not all(_is_count(d) for d in value):
            raise bad(f"a list of at most {MAX_DIMS} non-negative integers")
    elif tag == "refs":
        if type(value) is not list or len(value) > MAX_LIST_ITEMS:
            raise bad(f"a list of at most {MAX_LIST_ITEMS} refs")
        for item in value:
            _check_field(op, name + "[]", "ref", item)
    elif tag == "ints":
        if type(value) is not list or len(value) > MAX_LIST_ITEMS or not all(_is_count(v) for v in value):
            raise bad(f"a list of at most {MAX_LIST_ITEMS} non-negative integers")
    elif tag == "fence":
        if (type(value) is not list or not 1 <= len(value) <= MAX_FENCES
                or not all(type(p) is list and len(p) == 2 and _is_count(p[0]) and _is_count(p[1])
                           for p in value)):
            raise bad(f"a list of 1 to {MAX_FENCES} [event id, end offset] pairs")
        ends = [p[1] for p in value]
        if ends != sorted(ends) or len(set(ends)) != len(ends):
            raise bad("fences in increasing order of their end offsets")
    elif tag == "devices":
        if not isinstance(value, list) or len(value) > 64:
            raise bad("a list of at most 64 {ordinal, pci_bus_id} objects")
        for item in value:
            if (not isinstance(item, dict) or set(item) != {"ordinal", "pci_bus_id"}
                    or not _is_count(item["ordinal"]) or not isinstance(item["pci_bus_id"], str)
                    or len(item["pci_bus_id"]) > 32):
                raise bad("a list of {ordinal: int, pci_bus_id: str} objects")
    else:  # pragma: no cover - a schema typo, caught by tests
        raise AssertionError(tag)
    return value


def parse_request(body: Mapping[str, Any]) -> tuple[Op, dict[str, Any]]:
    """Check a request body against its op's schema.

    Returns the op and the fields as the services use them: absent optional fields are
    missing (or None), locations are :class:`Location` values.
    """
    raw_op = body.get("op")
    try:
        op = Op(raw_op)
    except (ValueError, TypeError):
        raise errors.InvalidRequest(f"unknown op {raw_op!r:.40}; known: {', '.join(o.value for o in Op)}") from None
    schema = _SCHEMAS[op]
    fields: dict[str, Any] = {}
    for name, value in body.items():
        if name == "op":
            continue
        spec = schema.get(name)
        if spec is None:
            unknown = sorted(set(body) - set(schema) - {"op"})
            raise errors.InvalidRequest(f"{op.value}: unknown field(s) {', '.join(unknown)[:120]}")
        if value is None and not spec[1]:
            continue
        fields[name] = _check_field(op, name, spec[0], value)
    for name, (_tag, required) in schema.items():
        if required and name not in fields:
            raise errors.InvalidRequest(f"{op.value}: missing field {name!r}")
    return op, fields


def validate_request(body: Mapping[str, Any]) -> Op:
    """Check a request body against its op's schema; return the op."""
    return parse_request(body)[0]


# --- values inside replies ----------------------------------------------------------------------

def encode_handle(handle: bytes) -> str:
    return base64.b64encode(handle).decode()


def decode_handle(text: object, *, size: int, what: str) -> bytes:
    """An opaque CUDA handle from a reply; ProtocolError unless it is `size` bytes of base64."""
    try:
        raw = base64.b64decode(str(text), validate=True)
    except (ValueError, TypeError) as e:
        raise errors.ProtocolError(f"{what}: not base64: {e}") from None
    if len(raw) != size:
        raise errors.ProtocolError(f"{what}: {len(raw)} bytes, expected {size}")
    return raw
