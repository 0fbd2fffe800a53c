"""Prometheus metrics of the sidecar.

Every metric takes the registry it lives in (tests build a fresh one and read it
back). Pool and object gauges are read from the live data plane at scrape time by
a collector, so there is no second copy of that state to keep in step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from faastube.locations import Location
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from faastube_sidecar.dataplane import DataPlane, MemoryView, TransferObserver
from faastube_sidecar.identity import Identity

# From a metadata round trip (tens of us) to a multi-GiB copy (seconds).
_LATENCY_BUCKETS = (20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3,
                    0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def gpu_label(location: Location) -> str:
    """GPU 3 -> '3'; the host pool is labelled 'host'."""
    return "host" if location.gpu is None else str(location.gpu)


class SidecarMetrics(TransferObserver):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_seconds = Histogram(
            "faastube_request_seconds", "Time to serve one request that has a reply (notifies are not timed), by op", ["op"],
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.requests = Counter(
            "faastube_requests_total", "Requests served, by op and result (ok or an error code)",
            ["op", "result"], registry=registry)
        self.transfer_bytes = Counter(
            "faastube_transfer_bytes_total", "Bytes copied by the sidecar or its clients, by path",
            ["path"], registry=registry)
        self.transfer_seconds = Histogram(
            "faastube_transfer_seconds", "Duration of one copy, by path", ["path"],
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.transfer_routes = Counter(
            "faastube_transfer_routes_total", "Sidecar copies by the exact route taken (a slow path shows here)",
            ["route"], registry=registry)
        # Per-function data passing; label values are bounded by the functions placed on this node.
        self.function_bytes = Counter(
            "faastube_function_transfer_bytes_total", "Bytes the sidecar copied for a function",
            ["namespace", "workflow", "function"], registry=registry)
        self.function_rate = Gauge(
            "faastube_function_transfer_rate_bytes_per_second", "Achieved rate of a function's last copy",
            ["namespace", "workflow", "function"], registry=registry)
        self.frames_rejected = Counter(
            "faastube_frames_rejected_total", "Frames refused before dispatch, by reason",
            ["reason"], registry=registry)
        self.connections = Gauge(
            "faastube_connections", "Client connections open now", registry=registry)
        self.objects_expired = Counter(
            "faastube_objects_expired_total", "Objects released because their ttl ran out", registry=registry)

    def transfer(self, path: str, nbytes: int, seconds: float, *, route: str = "",
                 requester: Identity | None = None) -> None:
        self.transfer_bytes.labels(path).inc(nbytes)
        if seconds > 0:
            self.transfer_seconds.labels(path).observe(seconds)
        if route:
            self.transfer_routes.labels(route).inc()
        if requester is not None:
            who = (requester.namespace, requester.workflow, requester.function)
            self.function_bytes.labels(*who).inc(nbytes)
            if seconds > 0:
                self.function_rate.labels(*who).set(nbytes / seconds)

    def watch(self, dataplane: DataPlane) -> None:
        self.registry.register(PoolCollector(lambda: dataplane))


class PoolCollector(Collector):
    """Pool and object gauges, read from the data plane when scraped."""

    def __init__(self, get_dataplane: Callable[[], DataPlane]) -> None:
        self._get = get_dataplane

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        dataplane = self._get()
        reserved = GaugeMetricFamily("faastube_pool_reserved_bytes", "Bytes the pools hold from the device",
                                     labels=["gpu"])
        used = GaugeMetricFamily("faastube_pool_used_bytes", "Bytes of the pools given to objects", labels=["gpu"])
        limit = GaugeMetricFamily("faastube_pool_limit_bytes", "Most bytes the pools may reserve", labels=["gpu"])
        quota = GaugeMetricFamily("faastube_pool_quota_bytes", "Most bytes one workflow may reserve",
                                  labels=["gpu"])
        slabs = GaugeMetricFamily("faastube_pool_slabs", "Slabs the pools hold", labels=["gpu"])
        refusals = GaugeMetricFamily("faastube_pool_refusals", "Slabs refused by the limit or a quota since start",
                                     labels=["gpu"])
        objects = GaugeMetricFamily("faastube_objects", "Object replicas held, by location", labels=["gpu"])
        by_domain = GaugeMetricFamily("faastube_pool_workflow_reserved_bytes",
                                      "Bytes each workflow's pools hold", labels=["gpu", "namespace", "workflow"])
        draining = GaugeMetricFamily("faastube_objects_draining", "Released objects still leased by readers")
        # The loop refreshes this snapshot every sweep; a scrape runs on another thread and must
        # never walk the live tables.
        snap = dataplane.snapshot
        counts = dict(snap.objects_by_location)
        budgets = {b.location: b for b in snap.budgets}
        for stats in snap.pools:
            label = gpu_label(stats.location)
            budget = budgets[stats.location]
            reserved.add_metric([label], stats.reserved_bytes)
            used.add_metric([label], stats.used_bytes)
            limit.add_metric([label], budget.max_bytes)
            quota.add_metric([label], budget.quota_bytes)
            slabs.add_metric([label], stats.slabs)
            refusals.add_metric([label], budget.refusals)
            objects.add_metric([label], counts.get(stats.location, 0))
            for domain, held in budget.by_domain:
                by_domain.add_metric([label, domain.namespace, domain.workflow], held)
        draining.add_metric([], snap.draining)
        yield from (reserved, used, limit, quota, slabs, refusals, objects, by_domain, draining)
        yield from memory_families(snap.memory)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


def memory_families(mem: MemoryView) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The memory policy's decisions (``elastic``): caps, targets, reservations, releases, moves."""
    policy = GaugeMetricFamily("faastube_memory_policy_info", "The pools' memory policy (value 1)",
                               labels=["policy"])
    policy.add_metric([mem.policy], 1)
    cap = GaugeMetricFamily("faastube_pool_cap_bytes",
                            "Most the pools may hold now: the limit, or a share of the device's free memory "
                            "plus what they hold (elastic policies)", labels=["gpu"])
    for loc, value in mem.caps:
        cap.add_metric([gpu_label(loc)], value)
    free = GaugeMetricFamily("faastube_device_free_bytes", "The device's free memory (NVML)", labels=["gpu"])
    for loc, value in mem.device_free:
        free.add_metric([gpu_label(loc)], value)
    target = GaugeMetricFamily("faastube_pool_target_bytes",
                               "What a workflow's pool keeps when idle: its functions' reservations, at least "
                               "the floor while memory is plentiful", labels=["gpu", "namespace", "workflow"])
    for domain, loc, value in mem.targets:
        target.add_metric([gpu_label(loc), domain.namespace, domain.workflow], value)
    reserved = GaugeMetricFamily("faastube_pool_function_reserved_bytes",
                                 "A function's reservation: p99 size x p99 concurrency, until no call within "
                                 "its p99 interval", labels=["gpu", "namespace", "workflow", "function"])
    for domain, function, loc, value in mem.reservations:
        reserved.add_metric([gpu_label(loc), domain.namespace, domain.workflow, function], value)
    releases = CounterMetricFamily("faastube_pool_releases", "Slabs given back, by reason: idle (static), "
                                   "target (beyond the reservations), pressure, cap, evicted",
                                   labels=["gpu", "reason"])
    for loc, reason, n in mem.releases:
        releases.add_metric([gpu_label(loc), reason], n)
    evictions = CounterMetricFamily("faastube_evictions", "Objects moved out of a GPU, by where to and in "
                                    "which order (queue: by the gateway's hints; lru: least recently used)",
                                    labels=["gpu", "to", "order"])
    for a, b, order, n in mem.evictions:
        evictions.add_metric([gpu_label(a), gpu_label(b), order], n)
    evicted_bytes = CounterMetricFamily("faastube_evicted_bytes", "Bytes moved out of a GPU", labels=["gpu"])
    for loc, n in mem.evicted_bytes_total:
        evicted_bytes.add_metric([gpu_label(loc)], n)
    restores = CounterMetricFamily("faastube_restores", "Evicted objects brought back to their GPU, by "
                                   "trigger (proactive: before their read; read: a get waited for it)",
                                   labels=["gpu", "trigger"])
    for loc, trigger, n in mem.restores:
        restores.add_metric([gpu_label(loc), trigger], n)
    away = GaugeMetricFamily("faastube_objects_evicted", "Objects away from their GPU now", labels=["gpu"])
    away_bytes = GaugeMetricFamily("faastube_objects_evicted_bytes", "Bytes away from their GPU now",
                                   labels=["gpu"])
    for home, count, nbytes in mem.evicted_now:
        away.add_metric([gpu_label(home)], count)
        away_bytes.add_metric([gpu_label(home)], nbytes)
    aborted = CounterMetricFamily("faastube_eviction_aborts", "Moves cancelled because a read started meanwhile")
    aborted.add_metric([], mem.aborted)
    failed = CounterMetricFamily("faastube_eviction_room_failures",
                                 "Requests for which no object could move out in time (they failed)")
    failed.add_metric([], mem.failed_room)
    borrowed = CounterMetricFamily("faastube_pool_over_cap",
                                   "Requests that grew a pool past its cap because nothing could move out "
                                   "(what was left was in use), within the device's free memory")
    borrowed.add_metric([], mem.borrowed)
    yield from (policy, cap, free, target, reserved, releases, evictions, evicted_bytes, restores, away,
                away_bytes, aborted, failed, borrowed)
