"""Prometheus metrics of cross-node passing (the bytes themselves count under
``faastube_transfer_bytes_total{path="network"}``, with every other path)."""

from __future__ import annotations

from collections.abc import Callable

from faastube import errors
from prometheus_client import CollectorRegistry, Counter, Gauge


def read_result(exc: BaseException | None) -> str:
    """A bounded label for how a read of another node's object ended."""
    if exc is None:
        return "ok"
    for kind, label in ((errors.PermissionDenied, "refused"), (errors.RefNotFound, "not_found"),
                        (errors.RetryableError, "unavailable"), (errors.InvalidRequest, "invalid")):
        if isinstance(exc, kind):
            return label
    return "error"


class NetworkMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reads = Counter("faastube_network_reads_total",
                             "Reads of other nodes' objects by this node's sidecar, by result "
                             "(ok, unavailable, refused, not_found, invalid, error)", ["result"], registry=registry)
        self.lends = Counter("faastube_network_lends_total",
                             "Reads of this node's objects lent to peers, by how they ended (closed, timed_out)",
                             ["how"], registry=registry)
        self.lends_open = Gauge("faastube_network_lends_open", "Reads lent to peers and not closed yet",
                                registry=registry)

    def watch_lends(self, count: Callable[[], int]) -> None:
        self.lends_open.set_function(count)
