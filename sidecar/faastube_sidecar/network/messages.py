"""The calls sidecars make to each other, as typed values with strict JSON decoding.

A peer is authenticated but still validated: a bug or a version skew on one node must
give a clear error on the other, not a KeyError deep in the data plane.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from faastube import protocol
from faastube.errors import InvalidRequest

MemType = Literal["DRAM", "VRAM"]
MAX_BODY_BYTES = 64 << 10


def _decode(method: str, body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequest(f"{method}: body of {len(body)} bytes (at most {MAX_BODY_BYTES})")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"{method}: body is not JSON ({e})") from None
    if type(value) is not dict:
        raise InvalidRequest(f"{method}: body must be a JSON object")
    return value


def _field(method: str, body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if type(value) not in (kind if isinstance(kind, tuple) else (kind,)):
        raise InvalidRequest(f"{method}: field {key!r} must be {kind}, got {type(value).__name__}")
    return value


def _count(method: str, body: dict[str, Any], key: str) -> int:
    value = _field(method, body, key, int)
    if value < 0:
        raise InvalidRequest(f"{method}: field {key!r} must be >= 0, got {value}")
    return int(value)


def _text(method: str, body: dict[str, Any], key: str, *, limit: int = 253) -> str:
    value = _field(method, body, key, str)
    if not value or len(value) > limit:
        raise InvalidRequest(f"{method}: field {key!r} must be 1 to {limit} characters")
    return str(value)


def _check_layout(method: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
    """A plain numeric dtype whose shape covers exactly `nbytes`: the reader's clients build
    arrays from these over the bytes read, so a wrong shape would read past them."""
    import numpy as np

    try:
        parsed = np.dtype(dtype)
    except Exception:  # noqa: BLE001 - numpy's dtype parser raises all sorts
        raise InvalidRequest(f"{method}: field 'dtype' {dtype!r:.40} is not a dtype") from None
    if parsed.hasobject or parsed.kind not in "biufc":
        raise InvalidRequest(f"{method}: field 'dtype' {parsed.str} is not a plain numeric type")
    if math.prod(shape) * parsed.itemsize != nbytes:
        raise InvalidRequest(f"{method}: shape {list(shape)} of {parsed.str} is not {nbytes} bytes")


def encode(message: Any) -> bytes:
    return json.dumps(asdict(message), separators=(",", ":")).encode()


@dataclass(frozen=True)
class Reader:
    """Who reads, as the reading node's sidecar attested it: the tenancy check runs on it."""

    namespace: str
    workflow: str
    function: str

    @classmethod
    def parse(cls, method: str, body: dict[str, Any]) -> Reader:
        raw = body.get("reader")
        if type(raw) is not dict:
            raise InvalidRequest(f"{method}: field 'reader' must be an object")
        return cls(*(_text(method, raw, k) for k in ("namespace", "workflow", "function")))


@dataclass(frozen=True)
class OpenRead:
    """Lend the bytes of `ref` to the caller for one NIXL read (and count it as one read).
    `agent` is the caller's NIXL agent: a new one (its sidecar restarted) needs our connection
    metadata again, not only the new span's."""

    ref: str
    reader: Reader
    agent: str

    @classmethod
    def decode(cls, body: bytes) -> OpenRead:
        raw = _decode("open", body)
        return cls(protocol.check_ref(_field("open", raw, "ref", str)), Reader.parse("open", raw),
                   _text("open", raw, "agent"))


@dataclass(frozen=True)
class Lent:
    """Where the lent bytes are: a span registered with the owner's NIXL agent until closed."""

    lease: str
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    agent: str
    agent_metadata_b64: str
    address: int
    device: int
    mem: MemType
    expires_in_s: float

    @property
    def agent_metadata(self) -> bytes:
        return base64.b64decode(self.agent_metadata_b64)

    @classmethod
    def decode(cls, body: bytes) -> Lent:
        m = "open reply"
        raw = _decode(m, body)
        shape = _field(m, raw, "shape", list)
        if len(shape) > protocol.MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
            raise InvalidRequest(f"{m}: field 'shape' must be at most {protocol.MAX_DIMS} non-negative integers")
        mem = _field(m, raw, "mem", str)
        if mem not in ("DRAM", "VRAM"):
            raise InvalidRequest(f"{m}: field 'mem' must be DRAM or VRAM, got {mem!r:.20}")
        expires = _field(m, raw, "expires_in_s", (int, float))
        try:
            base64.b64decode(_field(m, raw, "agent_metadata_b64", str), validate=True)
        except ValueError:
            raise InvalidRequest(f"{m}: field 'agent_metadata_b64' is not base64") from None
        nbytes, dtype = _count(m, raw, "nbytes"), _text(m, raw, "dtype", limit=32)
        _check_layout(m, dtype, tuple(shape), nbytes)
        return cls(_text(m, raw, "lease", limit=64), nbytes, dtype,
                   tuple(shape), _text(m, raw, "agent"), raw["agent_metadata_b64"], _count(m, raw, "address"),
                   _count(m, raw, "device"), mem, float(expires))  # type: ignore[arg-type]


MAX_READS = 1 << 16


@dataclass(frozen=True)
class CloseRead:
    """The read of a lent span is over: it counts as `reads` of the object's declared reads
    (0: not at all, the read failed; more than 1: several readers on that node share it)."""

    lease: str
    reads: int

    @classmethod
    def decode(cls, body: bytes) -> CloseRead:
        raw = _decode("close", body)
        reads = _count("close", raw, "reads")
        if reads > MAX_READS:
            raise InvalidRequest(f"close: field 'reads' must be at most {MAX_READS}, got {reads}")
        return cls(_text("close", raw, "lease", limit=64), reads)


@dataclass(frozen=True)
class Done:
    @classmethod
    def decode(cls, body: bytes) -> Done:
        _decode("reply", body)
        return cls()
