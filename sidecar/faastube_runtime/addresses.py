"""Where a worker listens and where the gateway reaches it: a Unix socket or a TCP port.

Local mode uses Unix sockets (no ports to pick, private to the machine); in a
cluster each worker is its own pod and the gateway reaches it over TCP at the
pod's IP. The text forms are ``unix:/path`` (or a bare absolute path) and
``tcp://host:port``; the gateway's endpoint flags also take ``http://host:port``.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass
from typing import Literal

import aiohttp

from faastube_runtime import errors

Scheme = Literal["unix", "tcp"]
# sockaddr_un.sun_path is 108 bytes including the terminating NUL
MAX_UNIX_PATH_BYTES = 107


@dataclass(frozen=True, slots=True)
class Address:
    scheme: Scheme
    path: str = ""  # unix
    host: str = ""  # tcp: a name or an IP literal (IPv6 without brackets)
    port: int = 0  # tcp

    @classmethod
    def unix(cls, path: str) -> Address:
        return cls("unix", path=path)

    @classmethod
    def tcp(cls, host: str, port: int) -> Address:
        return cls("tcp", host=host, port=port)

    def _host_text(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.scheme == "unix" else f"tcp://{self._host_text()}:{self.port}"

    @property
    def base_url(self) -> str:
        """The URL prefix of HTTP requests to this address (the host is ignored over Unix)."""
        return "http://worker" if self.scheme == "unix" else f"http://{self._host_text()}:{self.port}"

    def connector(self) -> aiohttp.BaseConnector:
        if self.scheme == "unix":
            return aiohttp.UnixConnector(path=self.path)
        return aiohttp.TCPConnector()


def _unix(path: str, field: str) -> Address:
    if not path:
        raise errors.BadInput(f"{field}: empty Unix socket path")
    if len(path.encode()) > MAX_UNIX_PATH_BYTES:
        raise errors.BadInput(f"{field}: Unix socket path {path!r} is longer than "
                              f"{MAX_UNIX_PATH_BYTES} bytes")
    return Address.unix(path)


def _host_port(netloc: str, field: str, *, allow_any_port: bool) -> Address:
    parsed = urllib.parse.urlsplit(f"//{netloc}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError as e:  # a port that is not a number or out of range
        raise errors.BadInput(f"{field}: bad port in {netloc!r}: {e}") from None
    if not host:
        raise errors.BadInput(f"{field}: no host in {netloc!r}")
    if port is None:
        raise errors.BadInput(f"{field}: no port in {netloc!r} (write host:port)")
    if port == 0 and not allow_any_port:
        raise errors.BadInput(f"{field}: port 0 is not a reachable port")
    if parsed.username is not None or parsed.password is not None:
        raise errors.BadInput(f"{field}: user info is not allowed in {netloc!r}")
    if "[" in netloc:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise errors.BadInput(f"{field}: {host!r} in brackets is not an IPv6 address") from None
    return Address.tcp(host, port)


def parse_address(text: str, *, field: str, listen: bool = False) -> Address:
    """``unix:/path``, ``/path``, ``tcp://host:port`` or (not for listening) ``http://host:port``.

    ``listen`` allows port 0 (any free port); errors name ``field``.
    """
    text = text.strip()
    if not text:
        raise errors.BadInput(f"{field}: empty address")
    if text.startswith("unix:"):
        return _unix(text[len("unix:"):], field)
    if text.startswith("/"):
        return _unix(text, field)
    schemes = ("tcp",) if listen else ("tcp", "http")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in schemes:
        forms = "unix:/path, /path or tcp://host:port" + ("" if listen else " or http://host:port")
        raise errors.BadInput(f"{field}: {text!r} is not an address ({forms})")
    netloc, slash, tail = rest.partition("/")
    if slash and tail:
        raise errors.BadInput(f"{field}: {text!r} has a path; give only host:port")
    if "?" in netloc or "#" in netloc:
        raise errors.BadInput(f"{field}: {text!r} has a query or fragment; give only host:port")
    return _host_port(netloc, field, allow_any_port=listen)


def parse_host_port(text: str, *, field: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6 literals) with a port in 1..65535."""
    address = _host_port(text.strip(), field, allow_any_port=False)
    return address.host, address.port
