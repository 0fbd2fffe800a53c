"""The wire protocol between function processes and the node's sidecar.

A frame is a fixed 12-byte header followed by a UTF-8 JSON object:

    magic "FT" | version u8 | kind u8 | request id u32 | body length u32 | body

Data never travels in frames: bodies carry metadata, and memory handles travel as
file descriptors (SCM_RIGHTS) beside the reply that names them. JSON keeps the light
client dependency-free; every body is validated against the schema of its op before
anything acts on it, so a malformed message is an error reply, never a crash.

This module is pure (no sockets, no asyncio): both the client and the sidecar's
framing layer use it.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from faastube import errors

MAGIC = b"FT"
VERSION = 1
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


# --- request schemas ---------------------------------------------------------------------------

class Op(str, enum.Enum):
    HELLO = "hello"
    ALLOC = "alloc"
    SEAL = "seal"
    GET = "get"
    RELEASE = "release"
    FREE = "free"
    STAT = "stat"
    UNMAP = "unmap"
    PING = "ping"
    STATS = "stats"


# Field type tags: "str", "int" (non-negative), "num" (non-negative), "bool", "shape", "strlist", "intlist", "devices".
_SCHEMAS: dict[Op, dict[str, tuple[str, bool]]] = {
    Op.HELLO: {"version": ("int", True), "namespace": ("str", False), "workflow": ("str", False),
               "function": ("str", False), "devices": ("devices", False)},
    Op.ALLOC: {"nbytes": ("int", True), "dtype": ("str", True), "shape": ("shape", True),
               "location": ("str", True)},
    # copied: the path of the put's client-side copy ("local" or "host"), for transfer metrics.
    Op.SEAL: {"ref": ("str", True), "consumers": ("int", False), "ttl_s": ("num", False),
              "copied": ("str", False)},
    Op.GET: {"ref": ("str", True), "location": ("str", True)},
    # consumed=false ends the reads without counting them (a failed call that will be retried).
    Op.RELEASE: {"refs": ("strlist", True), "consumed": ("bool", False)},
    Op.FREE: {"ref": ("str", True)},
    Op.STAT: {"ref": ("str", True)},
    Op.UNMAP: {"slabs": ("intlist", True)},
    Op.PING: {},
    Op.STATS: {},
}

MAX_LIST_ITEMS = 4096
MAX_STRING = 256
MAX_DIMS = 32


def _check_field(op: Op, name: str, tag: str, value: Any) -> None:
    def bad(expected: str) -> errors.InvalidRequest:
        return errors.InvalidRequest(f"{op.value}: field {name!r} must be {expected}, got {value!r:.80}")

    if tag == "str":
        if not isinstance(value, str) or not value or len(value) > MAX_STRING:
            raise bad(f"a non-empty string of at most {MAX_STRING} characters")
    elif tag == "int":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad("a non-negative integer")
    elif tag == "num":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or value == float("inf"):
            raise bad("a finite non-negative number")
    elif tag == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif tag == "shape":
        if (not isinstance(value, list) or len(value) > MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)):
            raise bad(f"a list of at most {MAX_DIMS} non-negative integers")
    elif tag in ("strlist", "intlist"):
        item_tag = tag[:3]
        if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS:
            raise bad(f"a list of at most {MAX_LIST_ITEMS} items")
        for item in value:
            _check_field(op, name + "[]", item_tag, item)
    elif tag == "devices":
        if not isinstance(value, list) or len(value) > 64:
            raise bad("a list of at most 64 {ordinal, pci_bus_id} objects")
        for item in value:
            if (not isinstance(item, dict) or set(item) != {"ordinal", "pci_bus_id"}
                    or not isinstance(item["ordinal"], int) or not isinstance(item["pci_bus_id"], str)
                    or len(item["pci_bus_id"]) > 32):
                raise bad("a list of {ordinal: int, pci_bus_id: str} objects")
    else:  # pragma: no cover - a schema typo, caught by tests
        raise AssertionError(tag)


def validate_request(body: Mapping[str, Any]) -> Op:
    """Check a request body against its op's schema; return the op."""
    raw_op = body.get("op")
    try:
        op = Op(raw_op)
    except ValueError:
        raise errors.InvalidRequest(f"unknown op {raw_op!r:.40}; known: {', '.join(o.value for o in Op)}") from None
    schema = _SCHEMAS[op]
    unknown = set(body) - set(schema) - {"op"}
    if unknown:
        raise errors.InvalidRequest(f"{op.value}: unknown field(s) {', '.join(sorted(unknown))[:120]}")
    for name, (tag, required) in schema.items():
        if name not in body:
            if required:
                raise errors.InvalidRequest(f"{op.value}: missing field {name!r}")
            continue
        value = body[name]
        if value is None and not required:
            continue
        _check_field(op, name, tag, value)
    return op


# --- locations ---------------------------------------------------------------------------------

HOST = "host"


def gpu_location(index: int) -> str:
    return f"gpu:{index}"


def parse_location(text: str) -> int | None:
    """None for the host, the GPU index for "gpu:N"; InvalidRequest otherwise."""
    if text == HOST:
        return None
    prefix, _, rest = text.partition(":")
    if prefix == "gpu" and rest.isdigit() and len(rest) <= 4:
        return int(rest)
    raise errors.InvalidRequest(f"bad location {text!r:.40}: expected 'host' or 'gpu:N'")
