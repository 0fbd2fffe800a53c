"""Frames over one Unix stream socket, with fd passing, as an asyncio Protocol.

The socket stays registered for reading for the connection's whole life, so a
request costs one wake-up, one recv and one send (the metadata round trip is the
latency floor of every `get`). asyncio transports can't carry SCM_RIGHTS, so a
reply with descriptors is written with sendmsg on the raw socket, and only when the
transport has nothing buffered (the write buffer limit is 0, so asyncio tells us
exactly when it is empty): frames never overtake each other.

This layer knows frames and file descriptors, nothing of what frames mean. The
handler it calls may answer at once (returns None) or return an awaitable; while
that runs, reading pauses, so replies leave in request order.

Backpressure: a peer that does not read its replies gets no more of its requests
read (reading pauses while replies wait to be written), so its socket fills and its
own sends block; replies that still pile up past `max_pending_bytes` close the
connection. A stalled half-frame is the server's to time out (`stalled_since`).

Descriptors given to `send` belong to this layer from then on: each is closed once
its frame is written (the kernel has given the peer its own copy), or when the
connection goes away before that.
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

from faastube import errors, protocol
from faastube.fds import close_all

logger = logging.getLogger(__name__)

_WARNED: dict[str, tuple[float, int]] = {}   # what -> (when last logged, occurrences since)
_WARN_INTERVAL_S = 10.0


def warn_now_and_then(what: str, message: str, *args: Any) -> None:
    """A warning about a misbehaving peer, at most once per interval per kind: a flood of bad
    clients must not turn into a flood of log lines (a blocked log pipe stalls the daemon)."""
    now = time.monotonic()
    last, suppressed = _WARNED.get(what, (float("-inf"), 0))
    if now - last < _WARN_INTERVAL_S:
        _WARNED[what] = (last, suppressed + 1)
        return
    _WARNED[what] = (now, 0)
    if suppressed:
        message += f" ({suppressed} more like it in the last {_WARN_INTERVAL_S:g}s not logged)"
    logger.warning(message, *args)


# Requests left waiting while the peer leaves our replies unread; past this it is cut off.
_MAX_UNREAD_REQUEST_BYTES = 64 << 10

FrameHandler = Callable[["FrameConnection", protocol.Header, bytes], Awaitable[None] | None]


class FrameConnection(asyncio.Protocol):
    def __init__(self, sock: socket.socket, handler: FrameHandler, *,
                 on_bad_header: Callable[[FrameConnection, int, errors.ProtocolError], None],
                 on_closed: Callable[[FrameConnection], None],
                 max_body_bytes: int = protocol.DEFAULT_MAX_BODY_BYTES,
                 max_pending_bytes: int = 4 << 20) -> None:
        self.sock = sock
        self._handler = handler
        self._on_bad_header = on_bad_header
        self._on_closed = on_closed
        self._max_body = max_body_bytes
        self._max_pending = max_pending_bytes
        self._buffer = bytearray()
        self._busy = False
        self._closing = False
        self._writable = True
        self._reading = True
        self._queued: collections.deque[tuple[bytes, Sequence[int]]] = collections.deque()
        self._queued_bytes = 0
        self.transport: asyncio.Transport | None = None
        self.state: Any = None          # the server's per-connection state
        self.opened_at = time.monotonic()
        # When the bytes now buffered started to wait for the rest of their frame (None: none wait).
        self.stalled_since: float | None = None

    # --- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=0)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._drain()

    def eof_received(self) -> bool:
        if self._buffer and not self._busy:
            logger.debug("stream ended inside a frame (%d bytes pending)", len(self._buffer))
        return False   # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for _, fds in self._queued:
            close_all(fds)
        self._queued.clear()
        self._queued_bytes = 0
        self._on_closed(self)

    def pause_writing(self) -> None:
        self._writable = False
        self._set_reading()

    def resume_writing(self) -> None:
        self._writable = True
        while self._queued and self._writable:
            data, fds = self._queued.popleft()
            self._queued_bytes -= len(data)
            self._write(data, fds)
        if self._writable and not self._closing:
            self._set_reading()
            self._drain()

    def _set_reading(self) -> None:
        """Read while nothing is awaited and our replies are leaving."""
        want = not self._busy and self._writable and not self._closing
        if want != self._reading and self.transport is not None:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # --- frames -------------------------------------------------------------------------------

    def _drain(self) -> None:
        while not self._busy and not self._closing and self._writable:
            if len(self._buffer) < protocol.HEADER_SIZE:
                break
            try:
                header = protocol.decode_header(self._buffer, max_body_bytes=self._max_body)
            except errors.ProtocolError as e:
                # The stream can't be split into frames any more: the owner answers, then we hang up.
                self._buffer.clear()
                self._on_bad_header(self, 0, e)
                self.close()
                return
            end = protocol.HEADER_SIZE + header.body_bytes
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[protocol.HEADER_SIZE:end])
            del self._buffer[:end]
            self.stalled_since = None
            try:
                pending = self._handler(self, header, body)
            except Exception as e:  # noqa: BLE001 - one bad frame must not take the connection's others
                warn_now_and_then("unservable", "a frame could not be served (%s: %s); answered with an error",
                                  type(e).__name__, e)
                self._on_bad_header(self, header.request_id, errors.ProtocolError(
                    f"request {header.request_id} could not be served ({type(e).__name__})"))
                continue
            if pending is not None:
                self._busy = True
                task = asyncio.ensure_future(pending)
                task.add_done_callback(self._resume)
        if self._buffer and self.stalled_since is None:
            self.stalled_since = time.monotonic()
        if not self._writable and len(self._buffer) > _MAX_UNREAD_REQUEST_BYTES:
            # It pipelines requests and reads none of the replies: what it already sent would only
            # sit here. A client that reads its replies never gets near this.
            warn_now_and_then("unread", "closing a connection that sent %d bytes of requests without reading "
                              "replies", len(self._buffer))
            self._buffer.clear()
            self.close()
            return
        self._set_reading()

    def _resume(self, task: asyncio.Future[None]) -> None:
        self._busy = False
        if not task.cancelled() and task.exception() is not None:
            logger.error("frame handler failed", exc_info=task.exception())
            self.close()
            return
        if self.transport is not None and not self._closing:
            self._drain()

    def send(self, kind: protocol.Kind, request_id: int, body: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
        """Queue a frame; the fds are ours to close from here on."""
        if self._closing:
            close_all(fds)
            return
        if len(fds) > protocol.MAX_FDS_PER_FRAME:
            close_all(fds)
            raise errors.InternalError(f"{len(fds)} fds exceed {protocol.MAX_FDS_PER_FRAME} per frame")
        data = protocol.encode(kind, request_id, body)
        if self._writable and not self._queued:
            self._write(data, fds)
            return
        self._queued.append((data, fds))
        self._queued_bytes += len(data)
        buffered = self._queued_bytes + (self.transport.get_write_buffer_size() if self.transport else 0)
        if buffered > self._max_pending:
            warn_now_and_then("backlog", "closing a connection whose peer left %d bytes of replies unread", buffered)
            self.close()

    def _write(self, data: bytes, fds: Sequence[int]) -> None:
        if self.transport is None:
            close_all(fds)
            return
        if not fds:
            self.transport.write(data)
            return
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            # The transport's buffer is empty here, so this can't overtake earlier frames.
            sent = self.sock.sendmsg([data], ancillary)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            logger.debug("sendmsg failed: %s", e)
            close_all(fds)
            self.close()
            return
        if sent == 0:
            # Nothing went out (socket full): the fds must ride on the first byte, so retry later.
            self._queued.appendleft((data, fds))
            self._queued_bytes += len(data)
            self._writable = False
            asyncio.get_running_loop().call_later(0.001, self.resume_writing)
            return
        close_all(fds)   # the peer holds its own copies now
        if sent < len(data):
            self.transport.write(data[sent:])

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def close_after(self, delay_s: float) -> None:
        """Stop reading now and close shortly (lets a final error frame reach the peer first)."""
        self._closing = True
        if self.transport is not None:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(delay_s, self.transport.close)
