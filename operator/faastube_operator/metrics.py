"""Prometheus metrics of the operator, built on an explicit registry (tests use a fresh one)."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Histogram

RESULTS = ("success", "invalid", "unschedulable", "error")


@dataclasses.dataclass(frozen=True)
class OperatorMetrics:
    reconciliations: Counter
    placement_duration: Histogram
    placement_cost: Histogram
    replacements: Counter
    stale_gpunodes: Counter

    @classmethod
    def build(cls, registry: CollectorRegistry) -> OperatorMetrics:
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
        )

    def reconciled(self, result: str) -> None:
        if result not in RESULTS:
            raise ValueError(f"result: {result!r} is not one of {RESULTS}")
        self.reconciliations.labels(result=result).inc()
