"""Request bodies of ``POST /invoke``: bytes off the socket to an array or a ref, within limits.

The gateway must know what a body will cost before it reads it, because any client
can send one. So the order is: the head first (``Content-Type``, ``Content-Encoding``,
``Content-Length`` against ``max_body_bytes``), then, for an ``.npy`` body, only its
header (at most ``MAX_NPY_HEADER_BYTES``), whose declared dtype and shape are checked
against the body's length and the limits *before* anything is allocated. The data then
goes straight from the socket into the array, piece by piece: no copy of the whole body
in between, so an upload costs its array and nothing more. A body that stops arriving is
given up on (``body_idle_timeout_s`` between pieces, ``body_timeout_s`` in all).

Only plain numeric arrays are accepted (bool, int, uint, float, complex; at most
``protocol.MAX_DIMS`` dimensions): that is what the data plane stores, and the
sidecar refuses anything else only *after* the put (its publish has no reply), where the
refusal would surface in some later request.

Every problem is a ``BadInput`` (400) or one of its kinds: ``BodyTooLarge`` (413),
``UnsupportedBody`` (415), or ``BodyTimedOut`` (408); each message names what was wrong.
"""

from __future__ import annotations

import ast
import asyncio
import enum
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
from aiohttp import StreamReader, web
from faastube import protocol

_PLAIN_DESCR = re.compile(r"[<>|=]?(?:[biufc][0-9]{1,2}|\?)")

from faastube_runtime import errors, wire

NPY_CONTENT_TYPE = "application/x-npy"
JSON_CONTENT_TYPE = "application/json"
# What an array may come as: ours, and the generic type (what most clients send for bytes).
ARRAY_CONTENT_TYPES = (NPY_CONTENT_TYPE, "application/octet-stream")

DEFAULT_MAX_BODY_BYTES = 1 << 30
MAX_REF_BODY_BYTES = 16 << 10           # {"ref": "..."} is under 300 bytes
MAX_JSON_DEPTH = 4                      # {"ref": ...} is depth 1
NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER_BYTES = 10_000           # numpy's own limit for safe loading; real headers are ~120
NPY_VERSIONS = ((1, 0), (2, 0), (3, 0))
PLAIN_DTYPE_KINDS = "biufc"
MAX_DIMENSION = 2**63 - 1               # no array dimension can be larger
_LONG_NUMBER = re.compile(rb"[0-9]{%d,}" % (len(str(MAX_DIMENSION)) + 1))
READ_PIECE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ReadLimits:
    """What reading one request may cost the gateway."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # The longest a connection may go without a complete request head: from when it opens,
    # and between keep-alive requests (it is aiohttp's keep-alive timeout).
    header_timeout_s: float = 30.0
    body_idle_timeout_s: float = 30.0    # the longest pause between two pieces of a body
    body_timeout_s: float = 300.0        # the whole body, from when its head was read

    def problems(self) -> list[str]:
        """What is wrong with these limits (empty when they can be used)."""
        out = []
        if self.max_body_bytes < 1:
            out.append(f"max_body_bytes: must be at least 1, got {self.max_body_bytes}")
        for name in ("header_timeout_s", "body_idle_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                out.append(f"{name}: must be a positive number of seconds, got {value}")
        return out


class BodyKind(enum.Enum):
    ARRAY = "array"     # an .npy array
    REF = "ref"         # JSON {"ref": ...}: an object already in the pool


def check_head(request: web.BaseRequest, limits: ReadLimits) -> BodyKind:
    """What the body is, from the request's head alone; refuse what the head already rules out."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise errors.UnsupportedBody(f"Content-Encoding {encoding!r:.40}: the gateway takes uncompressed "
                                     "bodies only")
    content_type = request.content_type  # aiohttp's default when absent: application/octet-stream
    if content_type == JSON_CONTENT_TYPE:
        kind, limit_bytes = BodyKind.REF, MAX_REF_BODY_BYTES
    elif content_type in ARRAY_CONTENT_TYPES:
        kind, limit_bytes = BodyKind.ARRAY, limits.max_body_bytes
    else:
        raise errors.UnsupportedBody(
            f"Content-Type {content_type!r:.80}: send an .npy array as {NPY_CONTENT_TYPE} (or "
            f"application/octet-stream), or {{\"ref\": ...}} as {JSON_CONTENT_TYPE}")
    length = request.content_length
    if length is not None and length > limit_bytes:
        raise errors.BodyTooLarge(f"body: Content-Length {length} is over the limit of {limit_bytes} bytes "
                                  f"for {'a JSON ref request' if kind is BodyKind.REF else 'an array'}")
    return kind


class BodyReader:
    """One request's body, read off the socket under the limits' deadlines."""

    def __init__(self, content: StreamReader, *, declared_bytes: int | None, limits: ReadLimits) -> None:
        self._content = content
        self._limits = limits
        self._deadline = asyncio.get_running_loop().time() + limits.body_timeout_s
        self.declared_bytes = declared_bytes  # Content-Length; None when chunked
        self.received_bytes = 0

    def _arrived(self) -> str:
        of = "" if self.declared_bytes is None else f" of {self.declared_bytes}"
        return f"{self.received_bytes}{of} bytes arrived"

    async def read_some(self, at_most: int) -> bytes:
        """Up to ``at_most`` bytes as soon as some are there; ``b""`` at the end of the body."""
        loop = asyncio.get_running_loop()
        deadline = min(loop.time() + self._limits.body_idle_timeout_s, self._deadline)
        try:
            async with asyncio.timeout_at(deadline):
                piece = await self._content.read(at_most)
        except TimeoutError:
            if deadline >= self._deadline:
                raise errors.BodyTimedOut(f"body: not complete within {self._limits.body_timeout_s:g} s "
                                          f"({self._arrived()})") from None
            raise errors.BodyTimedOut(f"body: nothing arrived for {self._limits.body_idle_timeout_s:g} s "
                                      f"({self._arrived()})") from None
        except (web.RequestPayloadError, ConnectionError) as e:
            raise errors.BadInput(f"body: broken off after {self.received_bytes} bytes: {e}") from None
        self.received_bytes += len(piece)
        return piece

    async def read_exactly(self, nbytes: int, *, what: str) -> bytes:
        """``nbytes`` bytes, or ``BadInput`` naming ``what`` was cut short."""
        pieces = []
        missing = nbytes
        while missing:
            piece = await self.read_some(missing)
            if not piece:
                raise errors.BadInput(f"body: ended after {self.received_bytes} bytes, {missing} bytes short of "
                                      f"{what}")
            pieces.append(piece)
            missing -= len(piece)
        return b"".join(pieces)

    async def read_into(self, view: memoryview, *, what: str) -> None:
        """Fill ``view`` from the body, or ``BadInput`` naming ``what`` was cut short."""
        filled = 0
        while filled < len(view):
            piece = await self.read_some(min(len(view) - filled, READ_PIECE_BYTES))
            if not piece:
                raise errors.BadInput(f"body: ended after {self.received_bytes} bytes, "
                                      f"{len(view) - filled} bytes short of {what}")
            view[filled:filled + len(piece)] = piece
            filled += len(piece)

    async def read_to_end(self, *, limit_bytes: int) -> bytes:
        """The whole (small) body; ``BodyTooLarge`` past ``limit_bytes``."""
        pieces = []
        while piece := await self.read_some(limit_bytes + 1 - self.received_bytes):
            pieces.append(piece)
            if self.received_bytes > limit_bytes:
                raise errors.BodyTooLarge(f"body: over the limit of {limit_bytes} bytes for a JSON ref request")
        return b"".join(pieces)

    async def expect_end(self, *, after: str) -> None:
        """``BadInput`` unless the body ends here."""
        if self.declared_bytes is not None and self.received_bytes >= self.declared_bytes:
            return  # aiohttp ends the body at its Content-Length
        if await self.read_some(READ_PIECE_BYTES):
            raise errors.BadInput(f"body: more bytes follow {after}")


# --- .npy -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NpyHeader:
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    header_bytes: int    # magic, version, header length and header text: where the data starts

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        return f"shape {self.shape!r:.120} of {self.dtype.str} ({self.data_bytes} bytes)"


async def read_npy_header(reader: BodyReader) -> NpyHeader:
    """The body's ``.npy`` header, read and checked; the reader is left at the first data byte."""
    preamble_bytes = len(NPY_MAGIC) + 2   # magic, major and minor version
    preamble = b""
    while len(preamble) < preamble_bytes and (piece := await reader.read_some(preamble_bytes - len(preamble))):
        preamble += piece
    if not preamble:
        raise errors.BadInput('body: empty; send an .npy array or JSON {"ref": ...}')
    magic = preamble[:len(NPY_MAGIC)]
    if magic != NPY_MAGIC[:len(magic)]:
        raise errors.BadInput(f"body: not a valid .npy array: it does not start with {NPY_MAGIC!r} "
                              "(send what numpy.save writes, or JSON {\"ref\": ...} as application/json)")
    if len(preamble) < preamble_bytes:
        raise errors.BadInput("body: not a valid .npy array: it ends inside the .npy preamble")
    version = (preamble[6], preamble[7])
    if version not in NPY_VERSIONS:
        raise errors.BadInput(f"body: .npy format version {version[0]}.{version[1]} is not supported "
                              f"(1.0, 2.0 and 3.0 are)")
    size_bytes = 2 if version == (1, 0) else 4
    text_bytes = int.from_bytes(await reader.read_exactly(size_bytes, what="the .npy header length"), "little")
    if text_bytes > MAX_NPY_HEADER_BYTES:
        raise errors.BadInput(f"body: the .npy header says it is {text_bytes} bytes long; at most "
                              f"{MAX_NPY_HEADER_BYTES} are accepted")
    text = await reader.read_exactly(text_bytes, what="the .npy header")
    dtype, shape, fortran_order = parse_npy_header(text, utf8=version == (3, 0))
    return NpyHeader(dtype, shape, fortran_order, header_bytes=len(NPY_MAGIC) + 2 + size_bytes + text_bytes)


def parse_npy_header(text: bytes, *, utf8: bool) -> tuple[np.dtype, tuple[int, ...], bool]:
    """``(dtype, shape, fortran_order)`` from the header's text: a Python literal dict."""
    long_number = _LONG_NUMBER.search(text)
    if long_number is not None:
        # before Python reads it: past 4300 digits that is an error of its own
        raise errors.BadInput(f"body: the .npy header has a number of {len(long_number.group())} digits; "
                              f"no dimension has more than {len(str(MAX_DIMENSION))}")
    try:
        header = ast.literal_eval(text.decode("utf-8" if utf8 else "latin-1"))
    except UnicodeDecodeError as e:
        raise errors.BadInput(f"body: the .npy header is not valid UTF-8: {e}") from None
    except (ValueError, SyntaxError, RecursionError) as e:
        raise errors.BadInput(f"body: the .npy header is not a literal dict: {type(e).__name__}: "
                              f"{str(e):.200}") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        keys = sorted(map(repr, header)) if isinstance(header, dict) else type(header).__name__
        raise errors.BadInput(f"body: the .npy header must be a dict of 'descr', 'fortran_order' and "
                              f"'shape', got {keys!s:.200}")
    descr, fortran_order, shape = header["descr"], header["fortran_order"], header["shape"]
    # Plain numeric type strings only ('<f4', '|u1', '?'...): numpy's own parser of dtype strings
    # accepts far more, and some of it (comma strings) fails in ways no caller expects.
    if not isinstance(descr, str) or _PLAIN_DESCR.fullmatch(descr) is None:
        raise errors.BadInput(f"body: .npy dtype {descr!r:.80} is not accepted: only plain numeric dtypes "
                              "(bool, int, uint, float, complex) are")
    try:
        dtype = np.dtype(descr)
    except Exception as e:  # noqa: BLE001 - whatever numpy makes of it, it is bad input
        raise errors.BadInput(f"body: .npy dtype {descr!r}: {e}") from None
    if dtype.kind not in PLAIN_DTYPE_KINDS or dtype.hasobject or dtype.shape or dtype.names:
        raise errors.BadInput(f"body: .npy dtype {descr!r} is not accepted: only plain numeric dtypes "
                              "(bool, int, uint, float, complex) are")
    if not isinstance(fortran_order, bool):
        raise errors.BadInput(f"body: .npy fortran_order must be True or False, got {fortran_order!r:.40}")
    if not isinstance(shape, tuple) or not all(type(d) is int for d in shape):
        raise errors.BadInput(f"body: .npy shape must be a tuple of integers, got {shape!r:.120}")
    if len(shape) > protocol.MAX_DIMS:
        raise errors.BadInput(f"body: .npy shape has {len(shape)} dimensions; at most {protocol.MAX_DIMS} "
                              "are accepted")
    for d in shape:
        if not 0 <= d <= MAX_DIMENSION:
            raise errors.BadInput(f"body: .npy shape {shape!r:.120} has dimension {d!r:.40}; each must be "
                                  f"from 0 to 2**63-1")
    return dtype, shape, fortran_order


def check_npy_size(header: NpyHeader, *, body_bytes: int | None, max_body_bytes: int) -> None:
    """The declared array against the limit and the body's length, before anything is allocated."""
    total = header.header_bytes + header.data_bytes
    if total > max_body_bytes:
        raise errors.BodyTooLarge(f"body: the .npy header declares {header.describe()}, over the limit of "
                                  f"{max_body_bytes} bytes per body")
    if body_bytes is not None and total != body_bytes:
        after = body_bytes - header.header_bytes
        problem = "is truncated" if after < header.data_bytes else "has bytes after the array"
        raise errors.BadInput(f"body: the .npy header declares {header.describe()}, but the body {problem}: "
                              f"{after} bytes follow the header")


async def read_npy_data(reader: BodyReader, header: NpyHeader) -> np.ndarray:
    """The array: its bytes go from the socket into its own memory, piece by piece."""
    order: Literal["C", "F"] = "F" if header.fortran_order else "C"
    if header.data_bytes == 0:
        array = np.empty(header.shape, dtype=header.dtype, order=order)
    else:
        flat = np.empty(header.data_bytes, dtype=np.uint8)
        await reader.read_into(flat.data, what=f"the array the .npy header declares "
                                                      f"({header.describe()})")
        array = flat.view(header.dtype).reshape(header.shape, order=order)
    await reader.expect_end(after="the array the .npy header declares")
    return array


# --- JSON -------------------------------------------------------------------------------------


def parse_ref(body: bytes) -> str:
    """The ref of a JSON ``{"ref": "<ref>"}`` body."""
    if not body:
        raise errors.BadInput('body: empty; send JSON {"ref": "<ref>"}')
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.BadInput(f"body: JSON must be UTF-8: {e}") from None
    if _nested_deeper_than(text, MAX_JSON_DEPTH):
        raise errors.BadInput(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels; expected "
                              '{"ref": "<ref>"}')
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise errors.BadInput(f"body: not valid JSON: {e}") from None
    except ValueError:  # Python refuses to read integers of more digits than its limit
        raise errors.BadInput(f"body: a number in the JSON has more than {sys.get_int_max_str_digits()} "
                              "digits") from None
    if not isinstance(doc, dict) or set(doc) != {"ref"}:
        raise errors.BadInput('body: expected a JSON object {"ref": "<ref>"}')
    ref = doc["ref"]
    if not isinstance(ref, str) or not ref or len(ref) > wire.MAX_REF_CHARS:
        raise errors.BadInput(f"ref: must be a non-empty string of at most {wire.MAX_REF_CHARS} characters")
    return ref


def _nested_deeper_than(text: str, limit: int) -> bool:
    """Whether JSON ``text`` opens more than ``limit`` arrays/objects inside each other (one pass)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False
