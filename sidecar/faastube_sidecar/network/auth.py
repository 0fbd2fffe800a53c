"""Sidecars authenticate each other with a shared secret (a Kubernetes Secret on a cluster).

Every call carries the caller's node, a timestamp, a nonce and an HMAC-SHA256 over them,
the method and the body. The receiver refuses a wrong MAC, a clock more than ``skew_s``
away, and a nonce it saw within that window (a replayed call). Pure: time and nonces
come in as arguments, so tests drive it with a fake clock.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from faastube import protocol
from faastube.errors import FaastubeError

NODE_KEY = "x-faastube-node"
TIME_KEY = "x-faastube-time"
NONCE_KEY = "x-faastube-nonce"
MAC_KEY = "x-faastube-mac"
MIN_SECRET_BYTES = 32
_MAX_NONCES = 1 << 16


class PeerAuthError(FaastubeError):
    """A peer's call is not authentic (wrong secret, stale, replayed or malformed): refused."""


class PeerSecretError(FaastubeError):
    """The shared secret can't be used (missing, unreadable, too short): fix the setup."""


def load_secret(path: Path) -> bytes:
    """The secret file's bytes (trailing newline dropped), at least MIN_SECRET_BYTES of them."""
    try:
        data = path.read_bytes().rstrip(b"\r\n")
    except OSError as e:
        raise PeerSecretError(f"--peer-secret-file {path}: {e.strerror or e}") from e
    if len(data) < MIN_SECRET_BYTES:
        raise PeerSecretError(f"--peer-secret-file {path}: {len(data)} bytes; use at least {MIN_SECRET_BYTES} "
                              f"random bytes (e.g. `openssl rand -hex 32`)")
    return data


@dataclass(frozen=True)
class Signed:
    node: str
    time_s: float
    nonce: str
    mac: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((NODE_KEY, self.node), (TIME_KEY, f"{self.time_s:.6f}"), (NONCE_KEY, self.nonce), (MAC_KEY, self.mac))


class PeerAuth:
    def __init__(self, secret: bytes, *, node: str, skew_s: float = 30.0) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise PeerSecretError(f"the peer secret has {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed")
        self._secret = secret
        self.node = protocol.check_node(node)
        self.skew_s = skew_s
        self._seen: OrderedDict[str, float] = OrderedDict()    # nonce -> when it stops mattering

    def _mac(self, method: str, node: str, time_text: str, nonce: str, body: bytes) -> str:
        message = b"\n".join((method.encode(), node.encode(), time_text.encode(), nonce.encode(),
                              hashlib.sha256(body).hexdigest().encode()))
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, method: str, body: bytes, *, now_s: float) -> Signed:
        nonce = secrets.token_hex(16)
        time_text = f"{now_s:.6f}"
        return Signed(self.node, now_s, nonce, self._mac(method, self.node, time_text, nonce, body))

    def verify(self, method: str, body: bytes, metadata: Mapping[str, str], *, now_s: float) -> str:
        """The calling node's name, or PeerAuthError saying why the call is refused."""
        try:
            node, time_text, nonce, mac = (metadata[k] for k in (NODE_KEY, TIME_KEY, NONCE_KEY, MAC_KEY))
        except KeyError as e:
            raise PeerAuthError(f"{method}: missing {e.args[0]} (not a FaaSTube sidecar, or an old one)") from None
        try:
            protocol.check_node(node)
            sent_s = float(time_text)
        except (FaastubeError, ValueError):
            raise PeerAuthError(f"{method}: malformed node or time in the call's metadata") from None
        expected = self._mac(method, node, time_text, nonce, body)
        if not hmac.compare_digest(expected, mac):
            raise PeerAuthError(f"{method} from {node!r:.60}: bad signature (a different --peer-secret-file?)")
        if abs(now_s - sent_s) > self.skew_s:
            raise PeerAuthError(f"{method} from {node}: its clock is {now_s - sent_s:+.1f}s off ours "
                                f"(more than {self.skew_s:g}s): sync the nodes' clocks")
        self._forget(now_s)
        if nonce in self._seen:
            raise PeerAuthError(f"{method} from {node}: a replayed call")
        self._seen[nonce] = sent_s + 2 * self.skew_s
        return node

    def _forget(self, now_s: float) -> None:
        while self._seen and (len(self._seen) >= _MAX_NONCES or next(iter(self._seen.values())) < now_s):
            self._seen.popitem(last=False)
