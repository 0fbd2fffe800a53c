"""Summaries of a run's latencies: percentiles overall and per stage, as a table; SLO attainment."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from faastube_spec.workflow import Workflow

from faastube_runtime.loadgen import RequestResult
from faastube_runtime.local_scaling import FunctionScaling

STAGES = ("total_s", "compute_s", "data_passing_s", "queueing_s", "other_s")
STAGE_LABELS = {"total_s": "end-to-end (gateway)", "compute_s": "compute",
                "data_passing_s": "data passing", "queueing_s": "queueing", "other_s": "other"}


@dataclass(frozen=True, slots=True)
class Percentiles:
    p50_s: float
    p99_s: float
    mean_s: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        if not values:
            return cls(float("nan"), float("nan"), float("nan"))
        a = np.asarray(values, dtype=float)
        return cls(float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.mean()))


@dataclass(frozen=True, slots=True)
class RunSummary:
    requests: int
    ok: int
    failures: dict[int, int]  # HTTP status (0: no answer) -> count
    duration_s: float
    client_latency: Percentiles
    stages: dict[str, Percentiles]

    @property
    def throughput_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"requests": self.requests, "ok": self.ok,
                "failures": {str(k): v for k, v in self.failures.items()},
                "duration_s": self.duration_s, "throughput_per_s": self.throughput_per_s,
                "client_latency": _pdict(self.client_latency),
                "stages": {k: _pdict(v) for k, v in self.stages.items()}}


def _pdict(p: Percentiles) -> dict[str, float]:
    return {"p50_s": p.p50_s, "p99_s": p.p99_s, "mean_s": p.mean_s}


def summarize(results: Sequence[RequestResult], *, duration_s: float) -> RunSummary:
    ok = [r for r in results if r.ok]
    stages = {stage: Percentiles.of([r.breakdown[stage] for r in ok if r.breakdown and stage in r.breakdown])
              for stage in STAGES}
    return RunSummary(requests=len(results), ok=len(ok),
                      failures=dict(Counter(r.status for r in results if not r.ok)),
                      duration_s=duration_s, client_latency=Percentiles.of([r.latency_s for r in ok]),
                      stages=stages)


@dataclass(frozen=True, slots=True)
class SloAttainment:
    """How many requests answered within the workflow's SLO, as the client saw them.

    A failed request never counts as within. ``p99_s`` is the client p99 of the answered
    requests (NaN when none was answered)."""

    slo_s: float
    within: int
    requests: int
    p99_s: float

    @classmethod
    def of(cls, results: Sequence[RequestResult], *, slo_s: float) -> SloAttainment:
        ok = [r.latency_s for r in results if r.ok]
        return cls(slo_s=slo_s, within=sum(1 for latency in ok if latency <= slo_s),
                   requests=len(results), p99_s=Percentiles.of(ok).p99_s)

    @property
    def percent(self) -> float:
        return 100.0 * self.within / self.requests if self.requests else 100.0

    def as_dict(self) -> dict[str, object]:
        return {"slo_s": self.slo_s, "within": self.within, "requests": self.requests,
                "attainment_percent": self.percent, "p99_s": None if math.isnan(self.p99_s) else self.p99_s}


def format_slo(slo: SloAttainment) -> str:
    """One line: ``SLO 500 ms: 3/4 requests within (75.0%); p99 612.3 ms, over the SLO``."""
    line = f"SLO {slo.slo_s * 1e3:g} ms: {slo.within}/{slo.requests} requests within ({slo.percent:.1f}%); "
    if math.isnan(slo.p99_s):
        return line + "p99 - (no request answered)"
    verdict = "within" if slo.p99_s <= slo.slo_s else "over"
    return line + f"p99 {slo.p99_s * 1e3:.1f} ms, {verdict} the SLO"


def format_table(summary: RunSummary) -> str:
    def ms(value: float) -> str:
        return f"{'-':>10}" if math.isnan(value) else f"{value * 1e3:10.1f}"

    rows = [f"{'latency (ms)':<22}{'p50':>10}{'p99':>10}{'mean':>10}",
            (f"{'client (incl. HTTP)':<22}{ms(summary.client_latency.p50_s)}"
             f"{ms(summary.client_latency.p99_s)}{ms(summary.client_latency.mean_s)}")]
    for stage in STAGES:
        p = summary.stages[stage]
        rows.append(f"{STAGE_LABELS[stage]:<22}{ms(p.p50_s)}{ms(p.p99_s)}{ms(p.mean_s)}")
    failed = ", ".join(f"{n} x HTTP {s or 'no answer'}" for s, n in sorted(summary.failures.items()))
    rows.append(f"{summary.ok}/{summary.requests} ok in {summary.duration_s:.2f}s "
                f"({summary.throughput_per_s:.1f} req/s)" + (f"; failed: {failed}" if failed else ""))
    rows.append("stages are along each request's critical path; 'other' is transport and scheduling")
    return "\n".join(rows)


def format_scaling(workflow: Workflow, scaling: Mapping[str, FunctionScaling], *, autoscale: bool) -> str:
    """Workers per function over the run: at the start, the most reached, at the end, scale events."""
    rows = [f"{'replicas':<22}{'start':>7}{'most':>7}{'end':>7}  bounds / events"]
    for fn in workflow.functions:
        s = scaling[fn.name]
        low, high = fn.replica_range
        if fn.autoscaled and autoscale:
            note = (f"{low}..{high}; {s.scale_ups} up, {s.scale_downs} down"
                    + (f", {s.failed_starts} failed starts" if s.failed_starts else ""))
        elif fn.autoscaled:
            note = f"{low}..{high}, not scaled (--no-autoscale)"
        else:
            note = "fixed"
        rows.append(f"{fn.name:<22}{s.initial:>7}{s.most:>7}{s.final:>7}  {note}")
    return "\n".join(rows)
def format_warmup(warmup: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """One line per function: how long its replicas took to get warm (the slowest), and what ran.

    ``warmup`` is function -> each replica's warm-up as its worker's ``/healthz`` reported it.
    """
    lines = ["warm-up (slowest replica per function):"]
    width = max((len(name) for name in warmup), default=0)
    for name, reports in warmup.items():
        if not reports:
            continue
        slowest = max(reports, key=lambda r: float(r.get("total_s") or 0.0))
        steps = [f"{label} {float(slowest[key]):.2f}s" for key, label in
                 (("hook_s", "hook"), ("call_s", "call"), ("batch_call_s", "full batch"))
                 if slowest.get(key) is not None]
        note = str(slowest.get("note") or "")
        detail = "; ".join(part for part in (", ".join(steps), note) if part)
        lines.append(f"  {name:<{width}}  {float(slowest.get('total_s') or 0.0):7.2f}s"
                     + (f"  ({detail})" if detail else ""))
    return "\n".join(lines)
