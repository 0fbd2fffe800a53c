"""Where each peer's sidecar answers: ``--peer NODE=HOST:PORT`` flags, or the cluster's GpuNodes.

On a cluster every sidecar publishes, in its GpuNode's status, the address and peer port
it serves lends on (``status.network``); the directory reads a node's GpuNode the first
time a ref names that node, and again when a call to it failed (the pod moved).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from faastube import errors, protocol

logger = logging.getLogger(__name__)
_ADDRESS = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9][-A-Za-z0-9.]*):(?P<port>\d{1,5})")


@dataclass(frozen=True)
class Peer:
    node: str
    address: str          # host:port of its peer service


def parse_address(text: str, *, what: str) -> str:
    m = _ADDRESS.fullmatch(text)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise errors.InvalidRequest(f"{what}: {text!r:.80} is not HOST:PORT (port 1-65535)")
    return text


def parse_peer_flag(text: str) -> Peer:
    """``NODE=HOST:PORT`` (the flag ``--peer``)."""
    node, sep, address = text.partition("=")
    if not sep:
        raise errors.InvalidRequest(f"--peer {text!r:.80}: expected NODE=HOST:PORT")
    return Peer(protocol.check_node(node), parse_address(address, what=f"--peer {node}"))


# A lookup of a node the static table doesn't have: its GpuNode's status.network, or None.
ClusterLookup = Callable[[str], "Peer | None"]


class PeerDirectory:
    def __init__(self, static: Mapping[str, Peer] = {}, *, cluster: ClusterLookup | None = None) -> None:
        self._static = dict(static)
        self._cluster = cluster
        self._found: dict[str, Peer] = {}

    def lookup(self, node: str) -> Peer:
        peer = self._static.get(node) or self._found.get(node)
        if peer is None and self._cluster is not None:
            peer = self._cluster(node)
            if peer is not None:
                self._found[node] = peer
        if peer is None:
            raise errors.Unavailable(f"no sidecar known for node {node!r}: not among --peer, and no GpuNode "
                                     f"of that name publishes a peer address (yet)")
        return peer

    def cached(self, node: str) -> bool:
        """True when ``lookup`` answers without asking the cluster (no blocking call)."""
        return node in self._static or node in self._found or self._cluster is None

    def stale(self, node: str) -> None:
        """A call to the node failed: look it up again next time (its sidecar may have moved)."""
        self._found.pop(node, None)


def gpunode_lookup(api: object) -> ClusterLookup:
    """A lookup through the Kubernetes API: the GpuNode named after the node, its status.network."""
    from faastube_spec import api as spec_api

    def lookup(node: str) -> Peer | None:
        try:
            obj = api.get_cluster_custom_object(spec_api.GROUP, spec_api.VERSION,  # type: ignore[attr-defined]
                                                spec_api.GPUNODE_PLURAL, node)
        except Exception as e:  # noqa: BLE001 - a missing or unreadable GpuNode: not known (yet)
            logger.info("GpuNode %s: %s", node, e)
            return None
        network = ((obj or {}).get("status") or {}).get("network") or {}
        address, port = network.get("address"), network.get("peerPort")
        if not isinstance(address, str) or not isinstance(port, int):
            return None
        host = f"[{address}]" if ":" in address else address
        try:
            return Peer(node, parse_address(f"{host}:{port}", what=f"GpuNode {node} status.network"))
        except errors.InvalidRequest as e:
            logger.warning("%s", e)
            return None

    return lookup
