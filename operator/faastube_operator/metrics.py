"""Prometheus metrics of the operator, built on an explicit registry (tests use a fresh one)."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Histogram

RESULTS = ("success", "invalid", "unschedulable", "error")
SCALE_DIRECTIONS = ("up", "down")
SCALE_RESULTS = ("applied", "failed")
# Why a gateway's GET /scale gave nothing to act on: no answer (connection refused, timeout,
# DNS), an HTTP error status, or an answer that is not the /scale document.
SCRAPE_FAILURES = ("unreachable", "http-error", "invalid-answer")


@dataclasses.dataclass(frozen=True)
class OperatorMetrics:
    reconciliations: Counter
    placement_duration: Histogram
    placement_cost: Histogram
    replacements: Counter
    stale_gpunodes: Counter
    scale_actions: Counter
    gateway_scrape_failures: Counter
    autoscaling_round_duration: Histogram

    @classmethod
    def build(cls, registry: CollectorRegistry) -> OperatorMetrics:
        metrics = cls._build(registry)
        # Every label value from the start, so that a rate over them reads 0, not "no data".
        for direction in SCALE_DIRECTIONS:
            for result in SCALE_RESULTS:
                metrics.scale_actions.labels(direction=direction, result=result)
        for reason in SCRAPE_FAILURES:
            metrics.gateway_scrape_failures.labels(reason=reason)
        return metrics

    @classmethod
    def _build(cls, registry: CollectorRegistry) -> OperatorMetrics:
        return cls(
            reconciliations=Counter(
                "faastube_operator_reconciliations_total",
                "Workflow reconciliations by result (success, invalid, unschedulable, error).",
                ["result"], registry=registry),
            placement_duration=Histogram(
                "faastube_operator_placement_duration_seconds",
                "Wall time of one placement decision.",
                buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
                registry=registry),
            placement_cost=Histogram(
                "faastube_operator_placement_cost_seconds",
                "Estimated data-passing cost of the chosen placement, per request.",
                buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
                registry=registry),
            replacements=Counter(
                "faastube_operator_replacements_requested_total",
                "Workflows marked for re-placement after a GpuNode change.",
                registry=registry),
            stale_gpunodes=Counter(
                "faastube_operator_gpunodes_marked_stale_total",
                "GpuNodes marked NotReady because their sidecar's heartbeat stopped.",
                registry=registry),
            scale_actions=Counter(
                "faastube_operator_scale_actions_total",
                "Function Deployments whose replicas the scaling loop set, by direction (up, down) "
                "and result (applied, failed).",
                ["direction", "result"], registry=registry),
            gateway_scrape_failures=Counter(
                "faastube_operator_gateway_scrape_failures_total",
                "GET /scale of a workflow's gateway that gave no decision, by reason (unreachable, "
                "http-error, invalid-answer); its functions keep their replicas.",
                ["reason"], registry=registry),
            autoscaling_round_duration=Histogram(
                "faastube_operator_autoscaling_round_duration_seconds",
                "Wall time of one round of the scaling loop on the active replica.",
                buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
                registry=registry),
        )

    def reconciled(self, result: str) -> None:
        if result not in RESULTS:
            raise ValueError(f"result: {result!r} is not one of {RESULTS}")
        self.reconciliations.labels(result=result).inc()

    def scaled(self, direction: str, *, applied: bool) -> None:
        if direction not in SCALE_DIRECTIONS:
            raise ValueError(f"direction: {direction!r} is not one of {SCALE_DIRECTIONS}")
        self.scale_actions.labels(direction=direction, result="applied" if applied else "failed").inc()

    def scrape_failed(self, reason: str) -> None:
        if reason not in SCRAPE_FAILURES:
            raise ValueError(f"reason: {reason!r} is not one of {SCRAPE_FAILURES}")
        self.gateway_scrape_failures.labels(reason=reason).inc()
