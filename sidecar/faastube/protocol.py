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
from collections.abc import Callable, Mapping
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


# One encoder and decoder, built once: json.dumps/loads build (or look up) theirs on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder()
_KINDS = {int(k): k for k in Kind}


def encode(kind: Kind, request_id: int, body: Mapping[str, Any]) -> bytes:
    payload = _ENCODER.encode(body).encode()
    return HEADER.pack(MAGIC, VERSION, kind, request_id & 0xFFFFFFFF, len(payload)) + payload


def decode_header(data: bytes | bytearray | memoryview, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Header:
    magic, version, kind, request_id, body_bytes = HEADER.unpack(data[:HEADER_SIZE])
    if magic != MAGIC:
        raise errors.ProtocolError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise errors.ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    frame_kind = _KINDS.get(kind)
    if frame_kind is None:
        raise errors.ProtocolError(f"unknown frame kind {kind}")
    if body_bytes > max_body_bytes:
        raise errors.ProtocolError(f"frame body of {body_bytes} bytes exceeds the limit of {max_body_bytes}")
    return Header(frame_kind, request_id, body_bytes)


def decode_body(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        body = _DECODER.decode(bytes(data).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise errors.ProtocolError(f"frame body is not valid JSON: {e}") from e
    except RecursionError:
        raise errors.ProtocolError("frame body nests too deeply (bodies are a few levels of JSON)") from None
    except ValueError as e:      # e.g. an integer past Python's int-string digit limit
        raise errors.ProtocolError(f"frame body has a value out of range: {str(e)[:120]}") from None
    if not isinstance(body, dict):
        raise errors.ProtocolError(f"frame body must be a JSON object, got {type(body).__name__}")
    return body


# --- refs ----------------------------------------------------------------------------------------

REF_PREFIX = "ft-"
_REF_CHARS = 32          # 128 random bits, lower-case hex
# A ref may name the node whose sidecar holds it ("ft-<hex>@<node>", node as Kubernetes names
# nodes: a lower-case DNS subdomain): a sidecar that serves cross-node reads hands its clients
# its node name, so a ref passed to a function on another node says where to fetch it from.
_NODE = r"[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?"
_REF_PATTERN = re.compile(rf"{REF_PREFIX}[0-9a-f]{{{_REF_CHARS}}}(?:@({_NODE}))?")
_NODE_PATTERN = re.compile(_NODE)
_REF_SHAPE = f"'{REF_PREFIX}' and {_REF_CHARS} hex digits, optionally '@' and a node name"


def new_ref(node: str | None = None) -> str:
    """A fresh ref (naming `node` when given). Clients name the objects they publish; the
    sidecar refuses duplicates, and refs naming a node other than its own."""
    ref = REF_PREFIX + secrets.token_hex(16)
    return ref if node is None else f"{ref}@{check_node(node)}"


def check_ref(ref: object) -> str:
    if not isinstance(ref, str) or _REF_PATTERN.fullmatch(ref) is None:
        raise errors.InvalidRequest(f"malformed ref {ref!r:.60}: expected {_REF_SHAPE}")
    return ref


def check_node(node: object) -> str:
    if not isinstance(node, str) or _NODE_PATTERN.fullmatch(node) is None:
        raise errors.InvalidRequest(f"malformed node name {node!r:.60}: expected a lower-case DNS subdomain "
                                    f"(letters, digits, '-' and '.'; at most 253 characters)")
    return node


def ref_node(ref: str) -> str | None:
    """The node a (well-formed) ref names, or None for a node-local ref."""
    at = ref.find("@")
    return None if at < 0 else ref[at + 1:]


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
    HINT = "hint"


# Field type tags: "str", "int" (non-negative), "num" (non-negative), "bool", "shape", "refs",
# "ints", "devices", "location" (parsed to a Location), "ref", "fence", "hints".
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
    # ended / ended_uncounted: reads this client finished since its last request (as in release),
    # carried here so that a reader's next get costs the sidecar one frame, not two.
    Op.GET: {"ref": ("ref", True), "location": ("location", True), "ended": ("refs", False),
             "ended_uncounted": ("refs", False)},
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
    # Where the readers of this workflow's objects stand in its queue: [{ref, position, due_in_s?}];
    # larger positions are read later. The memory policy moves those read last out of the GPU first.
    Op.HINT: {"hints": ("hints", True)},
}

MAX_LIST_ITEMS = 4096
MAX_STRING = 256
MAX_DIMS = 32
MAX_FENCES = 4


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


# Checkers: return the field's value as the services use it, or the description of what it must be
# (as an _Expected) so the caller builds the error message. No closures, no exceptions on success:
# this runs for every field of every request.
class _Expected(str):
    pass


def _int(value: Any) -> Any:
    return value if type(value) is int and value >= 0 else _Expected("a non-negative integer")


def _ref(value: Any) -> Any:
    if type(value) is str and _REF_PATTERN.fullmatch(value) is not None:
        return value
    return _Expected(f"a ref ({_REF_SHAPE})")


def _location(value: Any) -> Any:
    try:
        return Location.parse(value)
    except errors.InvalidRequest:
        return _Expected("'host' or 'gpu:N'")


def _str(value: Any) -> Any:
    if type(value) is str and 0 < len(value) <= MAX_STRING:
        return value
    return _Expected(f"a non-empty string of at most {MAX_STRING} characters")


def _num(value: Any) -> Any:
    if type(value) in (int, float) and value >= 0 and value != float("inf"):
        return value
    return _Expected("a finite non-negative number")


def _bool(value: Any) -> Any:
    return value if type(value) is bool else _Expected("true or false")


def _shape(value: Any) -> Any:
    if type(value) is list and len(value) <= MAX_DIMS and all(type(d) is int and d >= 0 for d in value):
        return value
    return _Expected(f"a list of at most {MAX_DIMS} non-negative integers")


def _refs(value: Any) -> Any:
    if type(value) is list and len(value) <= MAX_LIST_ITEMS and \
            all(type(r) is str and _REF_PATTERN.fullmatch(r) is not None for r in value):
        return value
    return _Expected(f"a list of at most {MAX_LIST_ITEMS} refs")


def _ints(value: Any) -> Any:
    if type(value) is list and len(value) <= MAX_LIST_ITEMS and all(_is_count(v) for v in value):
        return value
    return _Expected(f"a list of at most {MAX_LIST_ITEMS} non-negative integers")


def _fence(value: Any) -> Any:
    if (type(value) is not list or not 1 <= len(value) <= MAX_FENCES
            or not all(type(p) is list and len(p) == 2 and _is_count(p[0]) and _is_count(p[1]) for p in value)):
        return _Expected(f"a list of 1 to {MAX_FENCES} [event id, end offset] pairs")
    ends = [p[1] for p in value]
    if ends != sorted(ends) or len(set(ends)) != len(ends):
        return _Expected("fences in increasing order of their end offsets")
    return value


_HINT_KEYS = frozenset({"ref", "position", "due_in_s"})


def _hints(value: Any) -> Any:
    if type(value) is not list or len(value) > MAX_LIST_ITEMS:
        return _Expected(f"a list of at most {MAX_LIST_ITEMS} {{ref, position, due_in_s?}} objects")
    for item in value:
        if (type(item) is not dict or not {"ref", "position"} <= item.keys() <= _HINT_KEYS
                or type(item["ref"]) is not str or _REF_PATTERN.fullmatch(item["ref"]) is None
                or not _is_count(item["position"])
                or ("due_in_s" in item and type(_num(item["due_in_s"])) is _Expected)):
            return _Expected("a list of {ref, position: non-negative integer, due_in_s?: seconds} objects")
    return value


def _devices(value: Any) -> Any:
    if not isinstance(value, list) or len(value) > 64:
        return _Expected("a list of at most 64 {ordinal, pci_bus_id} objects")
    for item in value:
        if (not isinstance(item, dict) or set(item) != {"ordinal", "pci_bus_id"}
                or not _is_count(item["ordinal"]) or not isinstance(item["pci_bus_id"], str)
                or len(item["pci_bus_id"]) > 32):
            return _Expected("a list of {ordinal: int, pci_bus_id: str} objects")
    return value


_CHECKERS: dict[str, Callable[[Any], Any]] = {
    "int": _int, "ref": _ref, "location": _location, "str": _str, "num": _num, "bool": _bool, "shape": _shape,
    "refs": _refs, "ints": _ints, "fence": _fence, "devices": _devices, "hints": _hints,
}
# op -> field -> (checker, required); op -> its required fields
_COMPILED = {op: {name: (_CHECKERS[tag], required) for name, (tag, required) in schema.items()}
             for op, schema in _SCHEMAS.items()}
_REQUIRED = {op: tuple(name for name, (_, required) in schema.items() if required) for op, schema in _SCHEMAS.items()}
_OPS = {op.value: op for op in Op}


def parse_request(body: Mapping[str, Any]) -> tuple[Op, dict[str, Any]]:
    """Check a request body against its op's schema.

    Returns the op and the fields as the services use them: absent optional fields are
    missing (or None), locations are :class:`Location` values.
    """
    raw_op = body.get("op")
    op = _OPS.get(raw_op) if type(raw_op) is str else None
    if op is None:
        raise errors.InvalidRequest(f"unknown op {raw_op!r:.40}; known: {', '.join(o.value for o in Op)}")
    schema = _COMPILED[op]
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
        checked = spec[0](value)
        if type(checked) is _Expected:
            raise errors.InvalidRequest(f"{op.value}: field {name!r} must be {checked}, got {value!r:.80}")
        fields[name] = checked
    for name in _REQUIRED[op]:
        if name not in fields:
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
