"""Cross-node passing, assembled: settings from the flags, the parts started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from faastube import protocol
from faastube_spec.gpunode import DEFAULT_NICS_PER_TRANSFER, PeerNetwork
from prometheus_client import CollectorRegistry

from faastube_sidecar.dataplane import DataPlane
from faastube_sidecar.network.auth import PeerAuth, load_secret
from faastube_sidecar.network.engine import NetworkEngine
from faastube_sidecar.network.metrics import NetworkMetrics
from faastube_sidecar.network.nixl import Agent
from faastube_sidecar.network.peers import ClusterLookup, Peer, PeerDirectory
from faastube_sidecar.network.reader import RemoteReader
from faastube_sidecar.network.rpc import PeerServer
from faastube_sidecar.network.service import Lender, expire_forever

logger = logging.getLogger(__name__)
DEFAULT_NETWORK_BANDWIDTH = 25e9 / 8       # a 25 Gb/s NIC, when none is named


@dataclass(frozen=True)
class NetworkSettings:
    node: str
    port: int                               # the peer service (0: any free port)
    secret_file: Path
    host: str = "0.0.0.0"
    advertise_address: str | None = None    # what peers dial (GpuNode status.network.address)
    peers: tuple[Peer, ...] = ()
    backend: str = "UCX"
    ucx_tls: str | None = None              # None: $UCX_TLS, else nixl.DEFAULT_UCX_TLS
    ucx_net_devices: str | None = None      # NICs UCX may use, several at once ("mlx5_0:1,mlx5_1:1")
    bandwidth_bytes_per_s: float = DEFAULT_NETWORK_BANDWIDTH
    lend_from_host: bool = False            # stage through pinned host memory (no GPUDirect on the NICs)
    nics_per_transfer: int = DEFAULT_NICS_PER_TRANSFER   # UCX rails: NICs one read stripes over


class NetworkPieces:
    def __init__(self, settings: NetworkSettings, dataplane: DataPlane, *, cluster: ClusterLookup | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        protocol.check_node(settings.node)
        auth = PeerAuth(load_secret(settings.secret_file), node=settings.node)
        if settings.ucx_net_devices:
            os.environ["UCX_NET_DEVICES"] = settings.ucx_net_devices
        os.environ["UCX_MAX_RNDV_RAILS"] = str(settings.nics_per_transfer)
        self.agent = Agent(f"faastube-{settings.node}-{os.getpid()}", backend=settings.backend,
                           ucx_tls=settings.ucx_tls)
        self.engine = NetworkEngine(self.agent, bandwidth_bytes_per_s=settings.bandwidth_bytes_per_s)
        metrics = NetworkMetrics(registry) if registry is not None else None
        self.lender = Lender(dataplane, self.agent, lend_from_host=settings.lend_from_host, metrics=metrics)
        self.reader = RemoteReader(dataplane, self.engine,
                                   PeerDirectory({p.node: p for p in settings.peers}, cluster=cluster), auth,
                                   metrics=metrics)
        self.server = PeerServer(self.lender, auth, host=settings.host, port=settings.port)
        self._dataplane = dataplane
        self._expiry: asyncio.Task[None] | None = None
        dataplane.node = settings.node
        dataplane.remote = self.reader

    @property
    def port(self) -> int:
        return self.server.port

    def published(self) -> PeerNetwork | None:
        """What the GpuNode says about us: where peers dial (None without an address to give)."""
        address = self.settings.advertise_address
        if address is None:
            logger.warning("cross-node passing: no --advertise-address (or $POD_IP): the GpuNode can't say "
                           "where peers reach this sidecar, so placement keeps workflows off other nodes")
            return None
        return PeerNetwork(address=address, peer_port=self.port, agent=self.agent.name,
                           nics_per_transfer=self.settings.nics_per_transfer)

    async def start(self) -> None:
        await self.server.start()
        self._expiry = asyncio.create_task(expire_forever(self.lender), name="faastube-lend-expiry")
        logger.info("cross-node passing: node %s, peer service on %s:%d, NIXL agent %s",
                    self.settings.node, self.settings.host, self.port, self.agent.name)

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        await self.server.stop()
        await self.reader.aclose()
        self.lender.close_all()
        self.engine.close()
        self.agent.close()
        self._dataplane.remote = None
