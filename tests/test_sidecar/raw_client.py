"""A hand-rolled protocol client for attacks: it keeps every descriptor the sidecar sends."""

from __future__ import annotations

import array
import os
import socket
from typing import Any

from faastube import protocol


class RawClient:
    def __init__(self, path: Any, *, workflow: str, function: str = "attacker", namespace: str = "default") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        self.next_id = 1
        self.fds: list[int] = []          # every descriptor received, never closed until close()
        self.buf = bytearray()
        reply = self.call({"op": "hello", "version": protocol.VERSION, "namespace": namespace,
                           "workflow": workflow, "function": function})
        assert reply[0] is protocol.Kind.REPLY, reply

    def send(self, body: dict[str, Any], *, kind: protocol.Kind = protocol.Kind.REQUEST) -> int:
        request_id = self.next_id
        self.next_id += 1
        self.sock.sendall(protocol.encode(kind, request_id, body))
        return request_id

    def call(self, body: dict[str, Any]) -> tuple[protocol.Kind, dict[str, Any], list[int]]:
        request_id = self.send(body)
        while True:
            header, reply, fds = self.read()
            if header.request_id == request_id:
                return header.kind, reply, fds

    def read(self) -> tuple[protocol.Header, dict[str, Any], list[int]]:
        fds: list[int] = []
        while True:
            if len(self.buf) >= protocol.HEADER_SIZE:
                header = protocol.decode_header(self.buf)
                end = protocol.HEADER_SIZE + header.body_bytes
                if len(self.buf) >= end:
                    body = protocol.decode_body(self.buf[protocol.HEADER_SIZE:end])
                    del self.buf[:end]
                    return header, body, fds
            data, anc, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(16 * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(got)
                    self.fds.extend(got)
            if not data:
                raise EOFError("sidecar hung up")
            self.buf += data

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.sock.close()


def memfd_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def read_all(fd: int) -> bytes:
    """Every byte behind a shared-memory descriptor, however it was opened."""
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def connect_raw(path: Any) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


_PENDING: dict[int, bytes] = {}     # socket fd -> bytes read past the last frame


def read_frame(s: socket.socket) -> tuple[protocol.Header, dict[str, Any]] | None:
    """The next frame on a raw socket (None: the peer hung up or went quiet)."""
    data = _PENDING.pop(s.fileno(), b"")
    try:
        while len(data) < protocol.HEADER_SIZE:
            chunk = s.recv(65536)
            if not chunk:
                return None
            data += chunk
        header = protocol.decode_header(data)
        end = protocol.HEADER_SIZE + header.body_bytes
        while len(data) < end:
            chunk = s.recv(65536)
            if not chunk:
                return None
            data += chunk
    except (TimeoutError, ConnectionResetError):
        return None
    if len(data) > end:
        _PENDING[s.fileno()] = data[end:]
    return header, protocol.decode_body(data[protocol.HEADER_SIZE:end])
