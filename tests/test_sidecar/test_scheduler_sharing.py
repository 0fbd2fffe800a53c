"""The transfer scheduler against the deterministic link model: isolation, SLO sharing, fairness."""

from __future__ import annotations

import pytest
from faastube_sidecar.transfers import linkmodel, scheduler
from faastube_sidecar.transfers.scheduler import (
    HOST,
    FunctionIdentity,
    LinkId,
    LinkSpec,
    SchedulerSettings,
    TransferRequest,
    TransferResult,
    TransferScheduler,
    make_route,
)

GB = 1e9
H2D0 = LinkId("h2d:0")
FIFO = SchedulerSettings(chunk_bytes=1 << 62, max_inflight_chunks_per_link=1 << 30)


def one_link(bandwidth: float = 55 * GB, *, settings: SchedulerSettings | None = None,
             issue_delay_s: float = 20e-6) -> tuple[linkmodel.LinkModel, TransferScheduler]:
    model = linkmodel.LinkModel({H2D0: linkmodel.LinkParams(bandwidth)}, issue_delay_s=issue_delay_s)
    sched = TransferScheduler([LinkSpec(H2D0, bandwidth)], executor=model, clock=model,
                              settings=settings)
    return model, sched


def h2d(tid: str, fn: str, size: int, **kw: float) -> TransferRequest:
    return TransferRequest(tid, FunctionIdentity("wf", fn), make_route([((HOST, 0), 1.0)], size), **kw)


def run_isolation(settings: SchedulerSettings | None) -> dict[str, TransferResult]:
    model, sched = one_link(settings=settings)
    done: dict[str, TransferResult] = {}
    sched.submit(h2d("bulk", "b", 4 << 30), lambda r: done.__setitem__(r.transfer_id, r))
    model.at(0.010, lambda: sched.submit(h2d("small", "a", 1 << 20),
                                         lambda r: done.__setitem__(r.transfer_id, r)))
    model.run()
    return done


def solo_bulk_s(settings: SchedulerSettings | None) -> float:
    model, sched = one_link(settings=settings)
    done: list[TransferResult] = []
    sched.submit(h2d("bulk", "b", 4 << 30), done.append)
    model.run()
    return done[0].duration_s


def test_small_transfer_behind_bulk_finishes_within_a_millisecond_with_few_chunks_in_flight() -> None:
    done = run_isolation(None)
    assert done["small"].duration_s < 1e-3
    assert done["small"].path_label == "h2d-direct"


def test_small_transfer_behind_bulk_waits_for_the_whole_bulk_in_fifo() -> None:
    done = run_isolation(FIFO)
    # The bulk needs ~78 ms; the small one arrived at 10 ms and waits for the rest of it.
    assert done["small"].duration_s > 50e-3
    assert done["small"].finished_s >= done["bulk"].finished_s


def test_bulk_keeps_at_least_90_percent_of_its_unchunked_solo_bandwidth() -> None:
    unchunked = solo_bulk_s(FIFO)
    shared = run_isolation(None)["bulk"].duration_s
    assert unchunked / shared >= 0.90


def test_three_slo_functions_meet_rate_least_and_the_tightest_gets_the_spare() -> None:
    model, sched = one_link(50 * GB)
    done: dict[str, TransferResult] = {}
    keep = lambda r: done.__setitem__(r.transfer_id, r)
    # rate_least: a 1 GB/(100-20 ms) = 12.5 GB/s, b 1 GB/200 ms = 5, c 2 GB/400 ms = 5.
    adm = {
        "a": sched.submit(h2d("a", "a", 10**9, slo_s=0.100, expected_compute_s=0.020), keep),
        "b": sched.submit(h2d("b", "b", 10**9, slo_s=0.200), keep),
        "c": sched.submit(h2d("c", "c", 2 * 10**9, slo_s=0.400), keep),
    }
    assert all(a.slo_guaranteed for a in adm.values())
    assert adm["a"].rate_least_bytes_per_s == pytest.approx(12.5 * GB)
    model.run()
    # a has the tightest deadline: 12.5 + spare (50 - 22.5) = 40 GB/s.
    assert done["a"].rate_bytes_per_s == pytest.approx(40 * GB, rel=0.10)
    t_a = done["a"].finished_s
    for tid, least in (("b", 5 * GB), ("c", 5 * GB)):
        assert model.bytes_done(tid, by_s=t_a) / t_a >= 0.95 * least
        assert done[tid].met_deadline
    assert done["a"].met_deadline
    # Then b is the tightest and gets the spare before c.
    assert done["b"].finished_s < done["c"].finished_s


def test_an_impossible_slo_is_reported_and_runs_best_effort() -> None:
    model, sched = one_link(10 * GB)
    done: list[TransferResult] = []
    adm = sched.submit(h2d("x", "x", 10**9, slo_s=0.050), done.append)  # needs 20 GB/s
    assert not adm.slo_guaranteed
    assert "SLO impossible" in adm.reason and "h2d:0" in adm.reason
    no_time = sched.submit(h2d("y", "y", 10**6, slo_s=0.010, expected_compute_s=0.020), done.append)
    assert not no_time.slo_guaranteed and "no time" in no_time.reason
    model.run()
    assert {r.transfer_id for r in done} == {"x", "y"}
    assert sched.stats()[FunctionIdentity("wf", "x")].deadline_misses_total == 0  # no deadline promised


def test_oversubscribed_link_is_reported_on_admission() -> None:
    model, sched = one_link(10 * GB)
    sched.submit(h2d("a", "a", 6 * 10**8, slo_s=0.100))  # 6 GB/s
    adm = sched.submit(h2d("b", "b", 6 * 10**8, slo_s=0.100))
    assert adm.slo_guaranteed and adm.oversubscribed_links == (H2D0,)
    model.run()


def test_transfers_without_slo_share_the_link_equally_by_bytes() -> None:
    model, sched = one_link(40 * GB)
    done: dict[str, TransferResult] = {}
    for name in ("p", "q", "r"):
        sched.submit(h2d(name, name, 3 << 30), lambda r: done.__setitem__(r.transfer_id, r))
    model.run(until_s=0.05)
    got = [model.bytes_done(n, by_s=0.05) for n in ("p", "q", "r")]
    # The first submitter filled the in-flight window alone; after that, round robin.
    assert max(got) - min(got) <= 4 * (4 << 20)
    model.run()
    assert len(done) == 3


def test_best_effort_keeps_a_floor_while_slo_transfers_run() -> None:
    model, sched = one_link(40 * GB)
    sched.submit(h2d("slo", "s", 4 * 10**9, slo_s=1.0))
    sched.submit(h2d("be", "e", 4 * 10**9))
    assert sched.weights(H2D0)["be"] == pytest.approx(4 * GB)
    model.run(until_s=0.05)
    share = model.bytes_done("be", by_s=0.05) / (0.05 * 40 * GB)
    assert share == pytest.approx(0.10, abs=0.02)
    model.run()


def test_per_function_stats_count_bytes_queueing_and_rate() -> None:
    model, sched = one_link(50 * GB)
    sched.submit(h2d("a1", "a", 100 << 20))
    sched.submit(h2d("a2", "a", 100 << 20))
    sched.submit(h2d("b1", "b", 1 << 20))
    model.run()
    stats = sched.stats()
    a = stats[FunctionIdentity("wf", "a")]
    assert a.transfers_total == 2 and a.bytes_total == 200 << 20
    assert 0 < a.achieved_rate_bytes_per_s <= 50 * GB
    b = stats[FunctionIdentity("wf", "b")]
    assert b.queueing_delay_s_total >= 0 and b.bytes_total == 1 << 20
    assert not sched.busy


def test_chunks_in_flight_never_exceed_the_per_link_limit() -> None:
    settings = SchedulerSettings(chunk_bytes=1 << 20, max_inflight_chunks_per_link=3)
    inner = linkmodel.LinkModel({H2D0: linkmodel.LinkParams(10 * GB)})
    inflight: list[int] = [0]
    peak: list[int] = [0]

    class Counting:
        def issue(self, chunk: scheduler.Chunk, on_done: scheduler.ChunkDone) -> None:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])

            def done(c: scheduler.Chunk) -> None:
                inflight[0] -= 1
                on_done(c)
            inner.issue(chunk, done)

    sched = TransferScheduler([LinkSpec(H2D0, 10 * GB)], executor=Counting(), clock=inner,
                              settings=settings)
    for i in range(4):
        sched.submit(h2d(f"t{i}", "f", 20 << 20))
    inner.run()
    assert peak[0] == 3 and inflight[0] == 0 and not sched.busy
