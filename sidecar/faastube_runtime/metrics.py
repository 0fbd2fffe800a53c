"""The gateway's Prometheus metrics, on a registry of its own (tests read values back)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from faastube_runtime import dag

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class GatewayMetrics:
    registry: CollectorRegistry
    requests: Counter
    request_seconds: Histogram
    stage_seconds: Histogram
    in_flight: Gauge
    input_bytes: Gauge
    function_seconds: Histogram
    retries: Counter
    freed_refs: Counter
    function_concurrency: Gauge
    desired_replicas: Gauge
    function_replicas: Gauge
    batch_size: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> GatewayMetrics:
        r = registry if registry is not None else CollectorRegistry()
        return cls(
            registry=r,
            requests=Counter("faastube_gateway_requests_total", "Requests by outcome",
                             ["workflow", "outcome"], registry=r),
            request_seconds=Histogram("faastube_gateway_request_duration_seconds",
                                      "End-to-end latency of successful requests", ["workflow"],
                                      buckets=_LATENCY_BUCKETS_S, registry=r),
            stage_seconds=Histogram("faastube_gateway_request_stage_seconds",
                                    "Latency of successful requests along the critical path, by stage",
                                    ["workflow", "stage"], buckets=_LATENCY_BUCKETS_S, registry=r),
            in_flight=Gauge("faastube_gateway_in_flight_requests", "Requests being served",
                            ["workflow"], registry=r),
            input_bytes=Gauge("faastube_gateway_input_in_flight_bytes",
                              "Declared sizes of the input arrays of the requests in flight",
                              ["workflow"], registry=r),
            function_seconds=Histogram("faastube_gateway_function_seconds",
                                       "Per-call time of a function, by part",
                                       ["workflow", "function", "part"], buckets=_LATENCY_BUCKETS_S,
                                       registry=r),
            retries=Counter("faastube_gateway_function_retries_total",
                            "Function calls attempted again after a failure or timeout",
                            ["workflow", "function"], registry=r),
            freed_refs=Counter("faastube_gateway_freed_refs_total",
                               "Objects the gateway freed when requests ended", ["workflow"], registry=r),
            function_concurrency=Gauge("faastube_gateway_function_concurrency",
                                       "Calls of a function running on a replica or waiting for one, "
                                       "averaged over the last autoscaling sample", ["workflow", "function"],
                                       registry=r),
            desired_replicas=Gauge("faastube_gateway_desired_replicas",
                                   "Replicas the autoscaler wants for a function", ["workflow", "function"],
                                   registry=r),
            function_replicas=Gauge("faastube_gateway_function_replicas",
                                    "Replicas of a function the gateway is sending calls to",
                                    ["workflow", "function"], registry=r),
            batch_size=Histogram("faastube_gateway_batch_size",
                                 "Calls in the handler call that served each successful call (a batch "
                                 "of n is observed once per call in it)",
                                 ["workflow", "function"], buckets=_BATCH_SIZE_BUCKETS, registry=r),
        )

    def observe_scale(self, workflow: str, function: str, *, concurrency: float, desired: int,
                      current: int) -> None:
        self.function_concurrency.labels(workflow, function).set(concurrency)
        self.desired_replicas.labels(workflow, function).set(desired)
        self.function_replicas.labels(workflow, function).set(current)

    def observe_success(self, workflow: str, trace: dag.RequestTrace, breakdown: dag.Breakdown) -> None:
        self.requests.labels(workflow, "ok").inc()
        self.request_seconds.labels(workflow).observe(breakdown.total_s)
        for stage, value in (("compute", breakdown.compute_s), ("data_passing", breakdown.data_passing_s),
                             ("queueing", breakdown.queueing_s), ("other", breakdown.other_s)):
            self.stage_seconds.labels(workflow, stage).observe(value)
        for call in trace.calls:
            for part, value in (("get", call.get_s), ("compute", call.compute_s), ("put", call.put_s),
                                ("queue", call.queue_s)):
                self.function_seconds.labels(workflow, call.function, part).observe(value)
            if call.attempts > 1:
                self.retries.labels(workflow, call.function).inc(call.attempts - 1)
            self.batch_size.labels(workflow, call.function).observe(call.batch_size)
