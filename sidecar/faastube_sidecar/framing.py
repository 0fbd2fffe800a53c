"""Frames over one non-blocking Unix stream socket, with fd passing.

asyncio's stream transports can't carry SCM_RIGHTS, so this small layer reads and
writes the raw socket through the loop's readiness callbacks. It knows frames and
file descriptors, nothing of what the frames mean.
"""

from __future__ import annotations

import array
import asyncio
import socket
from typing import Any, Mapping, Sequence

from faastube import errors, protocol

_READ_CHUNK = 64 << 10


class FrameConnection:
    def __init__(self, sock: socket.socket, *, max_body_bytes: int = protocol.DEFAULT_MAX_BODY_BYTES) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._max_body = max_body_bytes
        self._send_lock = asyncio.Lock()

    async def read_frame(self) -> tuple[protocol.Header, bytes] | None:
        """The next frame, or None at a clean end of stream.

        Raises ProtocolError for a header that can't be trusted (the caller must
        close: the stream can no longer be split into frames) and ConnectionError
        for a stream cut mid-frame.
        """
        header = None
        while True:
            if header is None and len(self._buffer) >= protocol.HEADER_SIZE:
                header = protocol.decode_header(self._buffer, max_body_bytes=self._max_body)
            if header is not None and len(self._buffer) >= protocol.HEADER_SIZE + header.body_bytes:
                end = protocol.HEADER_SIZE + header.body_bytes
                body = bytes(self._buffer[protocol.HEADER_SIZE:end])
                del self._buffer[:end]
                return header, body
            chunk = await self._loop.sock_recv(self.sock, _READ_CHUNK)
            if not chunk:
                if self._buffer:
                    raise ConnectionError(f"stream ended inside a frame ({len(self._buffer)} bytes pending)")
                return None
            self._buffer += chunk

    async def send(self, kind: protocol.Kind, request_id: int, body: Mapping[str, Any],
                   fds: Sequence[int] = ()) -> None:
        data = protocol.encode(kind, request_id, body)
        async with self._send_lock:
            if not fds:
                await self._loop.sock_sendall(self.sock, data)
                return
            if len(fds) > protocol.MAX_FDS_PER_FRAME:
                raise errors.InternalError(f"{len(fds)} fds exceed {protocol.MAX_FDS_PER_FRAME} per frame")
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            while True:
                try:
                    # The fds ride on the first byte; what's left goes out as plain data.
                    sent = self.sock.sendmsg([data], ancillary)
                    break
                except BlockingIOError:
                    await self._writable()
            if sent < len(data):
                await self._loop.sock_sendall(self.sock, data[sent:])

    async def _writable(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = self.sock.fileno()
        self._loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self._loop.remove_writer(fd)

    def close(self) -> None:
        self.sock.close()
