"""Arrival generators: realised rate, inter-arrival CV, determinism, validation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from faastube_runtime.arrivals import (
    ArrivalsInvalid,
    ArrivalTrace,
    Bursty,
    Periodic,
    Poisson,
    Sporadic,
    from_minute_counts,
    make_process,
    offsets,
    paced,
)

DURATION_S = 20_000.0


@pytest.mark.parametrize("process", [Poisson(2.0), Sporadic(2.0), Periodic(2.0), Bursty(2.0)],
                         ids=lambda p: p.shape)
def test_the_realised_rate_matches_the_asked_mean_rate(process) -> None:  # type: ignore[no-untyped-def]
    trace = process.generate(DURATION_S, seed=7)
    assert trace.mean_rate_per_s == pytest.approx(2.0, rel=0.1)
    times = np.asarray(trace.times_s)
    assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < DURATION_S


def test_poisson_gaps_have_cv_one() -> None:
    assert Poisson(5.0).generate(DURATION_S, seed=1).inter_arrival_cv == pytest.approx(1.0, abs=0.05)


def test_periodic_gaps_have_cv_near_zero_like_timer_triggers() -> None:
    trace = Periodic(1.0, jitter_fraction=0.05).generate(5_000, seed=1)
    # Independent jitter on both ends of a gap: CV = sqrt(2) * jitter.
    assert trace.inter_arrival_cv == pytest.approx(np.sqrt(2) * 0.05, rel=0.15)
    assert Periodic(1.0, jitter_fraction=0.0).generate(100, seed=1).inter_arrival_cv == pytest.approx(0, abs=1e-9)


def test_sporadic_gaps_are_heavy_tailed_with_the_asked_cv() -> None:
    trace = Sporadic(1.0, cv=2.0).generate(100_000, seed=3)
    assert trace.inter_arrival_cv == pytest.approx(2.0, rel=0.25)
    gaps = trace.inter_arrivals_s()
    # Long idle gaps: the median gap is well below the mean, the tail far above it.
    assert np.median(gaps) < 0.6 * gaps.mean() and gaps.max() > 20 * gaps.mean()


def test_bursty_arrivals_cluster_in_on_phases() -> None:
    process = Bursty(2.0, mean_on_s=5.0, mean_off_s=20.0)
    trace = process.generate(DURATION_S, seed=5)
    assert trace.inter_arrival_cv > 1.5
    counts = trace.per_window_counts(1.0)
    # Most one-second windows are silent; the busy ones run near the peak rate.
    assert np.mean(counts == 0) > 0.6
    assert counts[counts > 0].mean() == pytest.approx(process.peak_rate_per_s, rel=0.3)


@pytest.mark.parametrize("shape", ["poisson", "sporadic", "periodic", "bursty"])
def test_a_seed_fixes_the_trace_and_another_seed_changes_it(shape: str) -> None:
    process = make_process(shape, 3.0)
    a, b = process.generate(500, seed=11), process.generate(500, seed=11)
    assert a == b
    assert process.generate(500, seed=12).times_s != a.times_s


def test_minute_counts_replay_the_trace_format() -> None:
    trace = from_minute_counts([3, 0, 5], seed=2)
    assert trace.duration_s == 180.0 and len(trace) == 8
    assert list(trace.per_window_counts(60.0)) == [3, 0, 5]
    with pytest.raises(ArrivalsInvalid, match=r"counts\[1\] must be a non-negative integer"):
        from_minute_counts([1, -2], seed=0)


@pytest.mark.parametrize("build, message", [
    (lambda: Poisson(0), "mean_rate_per_s must be a positive number"),
    (lambda: Sporadic(1.0, cv=-1), "cv must be a positive number"),
    (lambda: Periodic(1.0, jitter_fraction=0.7), r"jitter_fraction must be in \[0, 0.5\)"),
    (lambda: Bursty(1.0, mean_off_s=float("nan")), "mean_off_s must be a positive number"),
    (lambda: make_process("weekly", 1.0), "unknown arrival shape 'weekly'"),
    (lambda: Poisson(1.0).generate(-5, seed=0), "duration_s must be a positive number"),
])
def test_bad_parameters_name_the_parameter(build, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ArrivalsInvalid, match=message):
        build()


def test_paced_yields_each_arrival_when_it_falls_due() -> None:
    trace = ArrivalTrace("test", (0.0, 0.02, 0.05), 0.1)

    async def collect() -> list[tuple[int, float, float]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        return [(i, at, loop.time() - start) async for i, at in paced(trace)]

    got = asyncio.run(collect())
    assert [(i, at) for i, at, _ in got] == [(0, 0.0), (1, 0.02), (2, 0.05)]
    for _, at, elapsed in got:
        assert elapsed >= at - 0.002


@pytest.mark.parametrize("shape", ["poisson", "sporadic", "periodic", "bursty"])
def test_offsets_give_a_fixed_number_of_send_times_from_zero(shape: str) -> None:
    got = offsets(shape, count=500, rate_per_s=10.0, seed=4)
    assert len(got) == 500 and got[0] == 0.0 and got == sorted(got)
    assert got == offsets(shape, count=500, rate_per_s=10.0, seed=4)
    # About count / rate seconds of load; bursty and sporadic runs vary more around it.
    if shape in ("poisson", "periodic"):
        assert got[-1] == pytest.approx(500 / 10.0, rel=0.15)
    assert 0 < got[-1] < 500 / 10.0 * 3


def test_offsets_validate_the_count() -> None:
    assert offsets("poisson", count=0, rate_per_s=1.0, seed=0) == []
    with pytest.raises(ArrivalsInvalid, match="count must be a non-negative integer"):
        offsets("poisson", count=-1, rate_per_s=1.0, seed=0)
